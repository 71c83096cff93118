"""The file helpers every stage shares: one atomic write, one JSON read, content hashes.

Why atomic: metrics, manifests, caches and checkpoints are read by DVC, MLflow and the next run; a
crash mid-write must leave the old file or the new one, never half of either. Locally that is a
sibling temp file, fsynced, renamed over the target (model/atomic.py does the same for whole dirs);
on an object store (`s3://`) a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from tasks.errors import UserError


def write_atomic(path: str | Path, data: bytes) -> str | Path:
    """Write `data` to a local path (temp + fsync + rename) or a URI (one PUT)."""
    if "://" in str(path):
        import fsspec

        fs, target = fsspec.core.url_to_fs(str(path))
        fs.pipe_file(target, data)
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data) -> str | Path:
    return write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, hint: str = ""):
    """The parsed file; a missing or malformed one is a `UserError` naming it (and `hint`, e.g. which
    stage writes it)."""
    suffix = f" ({hint})" if hint else ""
    try:
        if "://" in str(path):
            import fsspec

            with fsspec.open(str(path), "rb") as handle:
                raw = handle.read()
        else:
            raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing{suffix}") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}){suffix}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
