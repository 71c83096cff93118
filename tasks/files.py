"""Small file helpers the stages share: atomic writes and content hashes.

Why atomic: metrics, caches and checkpoints are read by DVC, MLflow and the next run; a crash
mid-write must leave the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> Path:
    """Write to a sibling temp file, fsync, then rename over `path`."""
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


def write_json_atomic(path: Path, data) -> Path:
    return write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
