"""Milestone checkpoints under `{paths.models}/pretrain/<milestone>/` and what identifies them.

A milestone is identified by the sha256 of its weights, not by its name: retraining with other
settings rewrites `100K/` with new weights, and its old scores must not be reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.files import sha256_file, sha256_json

WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class Milestone:
    name: str
    directory: Path
    tokens_seen: int         # the MLflow step of its eval metrics
    milestone_tokens: int
    weights_sha256: str


def _weights_sha256(directory: Path) -> str:
    if (directory / WEIGHTS_FILE).is_file():
        return sha256_file(directory / WEIGHTS_FILE)
    if (directory / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((directory / WEIGHTS_INDEX).read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if not shards or missing:
            raise UserError(f"checkpoint {directory}: weight shard {missing[0] if missing else '(none)'} is missing")
        return sha256_json({s: sha256_file(directory / s) for s in shards})
    raise UserError(f"checkpoint {directory}: no weights ({WEIGHTS_FILE} missing)")


def read_milestone(directory: Path) -> Milestone:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"checkpoint {directory}: no config.json (not a HF checkpoint dir)")
    try:
        meta = json.loads(config_path.read_text()).get("tinyllama") or {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    if "tokens_seen" not in meta:
        raise UserError(f"{config_path}: no tinyllama.tokens_seen (not a pretrain milestone)")
    return Milestone(name=str(meta.get("milestone", directory.name)), directory=directory,
                     tokens_seen=int(meta["tokens_seen"]),
                     milestone_tokens=int(meta.get("milestone_tokens", meta["tokens_seen"])),
                     weights_sha256=_weights_sha256(directory))


def find_milestones(models_dir: Path) -> list[Milestone]:
    """Every milestone dir, in token order; temp dirs of an export in progress (".name.tmp-…") skipped."""
    root = Path(models_dir) / "pretrain"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not dirs:
        raise UserError(f"{root}: no milestone checkpoints (run `tinyllama pretrain` first)")
    return sorted((read_milestone(d) for d in dirs), key=lambda m: m.tokens_seen)
