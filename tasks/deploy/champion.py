"""Which weights to serve: a local model dir, or a registry reference resolved to one.

`models:/<name>@<alias>` and `models:/<name>/<version>` go through `tasks.registry.resolve_model`
(the MLflow Model Registry work, issue #13), which downloads the version's HF dir into a cache when
needed. A dir published on shared storage (`s3://.../serving/<sha256>/<name>`, tasks/deploy/publish.py) is
passed on as it is: each replica copies it to its own node (serving/fetch.py), as on a cluster.
"""

from __future__ import annotations

from pathlib import Path

from tasks.errors import UserError
from tasks.layout import CONFIG_FILE, is_uri

REGISTRY_PREFIX = "models:/"


def resolve(ref: str, tracking_uri: str | None, field: str = "--model") -> Path:
    if ref.startswith(REGISTRY_PREFIX):
        from tasks.registry import resolve_model

        return Path(resolve_model(ref, tracking_uri))
    path = Path(ref)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{field}: {ref} is not a model dir (no {CONFIG_FILE}) nor a models:/NAME@ALIAS reference")
    return path


def served_ref(ref: str, tracking_uri: str | None, field: str) -> str:
    """What a replica is told to load for `ref`: a published URI as it is, else the absolute local dir."""
    return ref if is_uri(ref) else str(resolve(ref, tracking_uri, field).resolve())
