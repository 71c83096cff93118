"""Inputs a profile may name by URI (`tokenizer.model_file`, `eval.data_dir`, `sft.chat_eval.source`): read
from shared storage (s3:// through s3fs, or any fsspec protocol) with retries, never from a hub.

On a cluster no node has the laptop's `/data/...`; the 1.1B profile names these inputs on the bucket
every node reaches. A transient error (a dropped connection, a throttled request, a timeout) is retried
with backoff; a missing object is bad input and fails at once, naming the field.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tasks.errors import UserError
from tasks.layout import is_uri

log = logging.getLogger("tinyllama.inputs")
T = TypeVar("T")
ATTEMPTS, FIRST_DELAY_S = 4, 1.0


def with_retries(action: Callable[[], T], what: str, attempts: int = ATTEMPTS, delay_s: float = FIRST_DELAY_S) -> T:
    """`action()`, retried on transient I/O errors (OSError but FileNotFoundError/PermissionError, timeouts)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (FileNotFoundError, PermissionError):
            raise
        except (OSError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            log.warning("%s: %s; retrying in %.0f s (attempt %d of %d)", what, exc, delay_s, attempt + 1, attempts)
            time.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable")


def read_input_file(location: str, field: str) -> bytes:
    """The bytes of a local file or a URI; a missing one is a UserError naming `field`."""
    if not is_uri(location):
        path = Path(location)
        if not path.is_file():
            raise UserError(f"{field}: file not found: {location}")
        return path.read_bytes()
    import fsspec

    def read() -> bytes:
        with fsspec.open(location, "rb") as handle:
            return handle.read()

    try:
        return with_retries(read, f"{field} {location}")
    except FileNotFoundError:
        raise UserError(f"{field}: file not found: {location}") from None


def local_input_dir(location: str, field: str, cache_root: Path | None = None) -> Path:
    """A local dir as it is; a dir URI copied once into `cache_root` (default ~/.cache/tinyllama/inputs),
    keyed by the URI, atomically (temp dir, then rename), so a second call or process reuses the copy."""
    if not is_uri(location):
        path = Path(location)
        if not path.is_dir():
            raise UserError(f"{field}: {location} is not a directory")
        return path
    import fsspec

    cache_root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinyllama" / "inputs"
    target = cache_root / hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    files = with_retries(lambda: fs.find(root), f"{field} {location}")
    if not files:
        raise UserError(f"{field}: no files under {location}")
    scratch = cache_root / f".{target.name}.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    for remote in files:
        local = scratch / remote[len(root) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        with_retries(lambda remote=remote, local=local: fs.get_file(remote, str(local)), f"{field} {remote}")
    try:
        scratch.rename(target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(scratch, ignore_errors=True)
    return target
