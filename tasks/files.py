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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, streamed: a local path or a URI (`s3://`, `hf://`, anything fsspec opens)."""
    digest = hashlib.sha256()
    if "://" in str(path):
        import fsspec

        opened = fsspec.open(str(path), "rb")
    else:
        opened = open(path, "rb")
    with opened as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(data) -> str:
    """The fingerprint of a JSON-able value (keys sorted; tuples and sets hashed as lists): what decides a
    run, a cache entry or a stage, hashed the one way every fingerprint in the project is."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


# -- dirs that may live on shared storage (a local path or a URI every node reaches) ------------------

def _fs(uri: str | Path):
    """The filesystem and path of `uri`; its cached listings dropped, as other nodes write there too."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri))
    fs.invalidate_cache(path)
    return fs, path


def exists(uri: str | Path) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def names_in(uri: str | Path) -> list[str]:
    """The entries directly under a dir (local or URI), sorted; [] when it does not exist."""
    fs, path = _fs(uri)
    if not fs.exists(path):
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def remove_tree(uri: str | Path) -> None:
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move_tree(source: str | Path, target: str | Path) -> None:
    """A rename on local disk; on an object store each file copied, then the source deleted (s3fs's own
    recursive move also tries to copy the "directory" key, which does not exist)."""
    fs, path = _fs(source)
    destination = _fs(target)[1].rstrip("/")
    if "://" not in str(source):
        fs.mv(path, destination, recursive=True)
        return
    for file in fs.find(path):
        fs.copy(file, destination + file[len(path.rstrip("/")):])
    fs.rm(path, recursive=True)


def upload(local_dir: Path, uri: str | Path, names: list[str]) -> None:
    """Copy the files `names` (relative paths) of a local dir to a dir on any storage."""
    fs, root = _fs(uri)
    for name in names:
        target = f"{root.rstrip('/')}/{name}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(Path(local_dir) / name), target)


def download(uri: str | Path, local_dir: Path, names: list[str]) -> Path:
    """Copy the files `names` of a dir on any storage into a local dir; returns the local dir."""
    fs, root = _fs(uri)
    for name in names:
        target = Path(local_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root.rstrip('/')}/{name}", str(target))
    return Path(local_dir)


# -- sealed dirs: files first, then one JSON seal listing every file's sha256, written last ---------------

class BrokenSeal(Exception):
    """A sealed dir that is incomplete (no seal) or corrupt (a file missing or not matching its sha256)."""


def seal_record(directory: Path, **extra) -> dict:
    """What a seal holds for the files of a local dir: each file's sha256 (plus `extra` fields)."""
    directory = Path(directory)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return {"files": {name: sha256_file(directory / name) for name in files}, **extra}


def verify_sealed(directory: Path, seal: str) -> dict:
    """The seal's record, once every file it lists is present in `directory` with its recorded sha256."""
    try:
        record = json.loads((Path(directory) / seal).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokenSeal(f"{seal} unreadable ({exc.__class__.__name__}: {exc})") from None
    for name, expected in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise BrokenSeal(f"{name} is missing")
        if sha256_file(path) != expected:
            raise BrokenSeal(f"{name} does not match its recorded sha256")
    return record


def fetch_sealed(uri: str, scratch: Path, seal: str) -> Path:
    """A local dir holding a sealed dir: the dir itself on local disk, else its sealed files downloaded
    into `scratch` (nothing is downloaded when the seal is missing or unreadable: verification says so)."""
    if "://" not in str(uri):
        return Path(uri)
    local = Path(scratch) / str(uri).rstrip("/").rsplit("/", 1)[-1]
    if not local.is_dir():
        local.mkdir(parents=True)
        try:
            record = read_json(f"{str(uri).rstrip('/')}/{seal}")
            download(uri, local, [*record.get("files", {}), seal])
        except (UserError, OSError, AttributeError):
            pass
    return local


def materialize_sealed(uri: str, seal: str, out_dir: Path) -> Path:
    """A verified copy of a sealed dir (local or remote) as the local dir `out_dir`, seal left out,
    written atomically (temp dir + rename); raises BrokenSeal."""
    import shutil
    import tempfile

    from model.atomic import atomic_dir

    with tempfile.TemporaryDirectory(prefix="sealed-") as scratch:
        source = fetch_sealed(uri, Path(scratch), seal)
        record = verify_sealed(source, seal)
        with atomic_dir(out_dir) as tmp:
            for relative in record["files"]:
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / relative, tmp / relative)
    return Path(out_dir)
