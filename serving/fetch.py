"""A model dir on shared storage (`s3://...`, any fsspec URI) becomes a local dir before a replica loads it.

`serve deploy` to a cluster places replicas on GPU nodes that have none of the head's files, so the flow
first publishes the served dirs to shared storage (tasks/deploy/publish.py): the files, then
`SERVING_SEAL` (each file's sha256) written last, under a dir named by the seal's hash, whose contents
therefore never change. A replica copies such a dir into its node's cache (`published/` under
`$TINYLLAMA_MODEL_CACHE`, default ~/.cache/tinyllama/models) once, checks every file against the seal, and
renames the copy into place: a restarted replica, or a second one on the node, reuses it, and a copy cut
short is never loaded. A dir without its seal is refused (it is not published, or not yet). Local paths
are used as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.atomic import atomic_dir
from model.files import SERVING_SEAL, model_cache_root

PUBLISHED = "published"  # under the cache root: published dirs (registry versions go to <name>/<version>/)


def is_remote(ref: str) -> bool:
    return "://" in ref


def read_text(ref: str) -> str:
    """A small file (the lineage) on local disk or shared storage."""
    if not is_remote(ref):
        return Path(ref).read_text()
    import fsspec

    with fsspec.open(ref, "rt") as handle:
        return handle.read()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_model_dir(ref: str, cache: Path | None = None) -> Path:
    """`ref` itself when it is a local path, else the verified local copy of the published dir it names
    (made now when this node has none). Raises ValueError for a dir that is not published, OSError when
    a copied file does not match its seal (the replica fails and Serve starts another)."""
    if not is_remote(ref):
        return Path(ref)
    import fsspec

    name = ref.rstrip("/").rsplit("/", 1)[-1]
    key = hashlib.sha256(ref.rstrip("/").encode()).hexdigest()[:16]
    target = (cache or model_cache_root()) / PUBLISHED / key / name
    if (target / SERVING_SEAL).is_file():
        return target
    fs, root = fsspec.core.url_to_fs(ref)
    root = root.rstrip("/")
    try:
        seal = json.loads(fs.cat_file(f"{root}/{SERVING_SEAL}"))
        files = dict(seal["files"])
    except FileNotFoundError:
        raise ValueError(f"model: {ref} has no {SERVING_SEAL}: not a published model dir "
                         "(`serve deploy` through the flow publishes one)") from None
    with atomic_dir(target) as tmp:
        for name, expected in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{name}", str(path))
            if _sha256(path) != expected:
                raise OSError(f"{ref}/{name}: the copy does not match its sha256 in {SERVING_SEAL}")
        (tmp / SERVING_SEAL).write_text(json.dumps(seal))
    return target
