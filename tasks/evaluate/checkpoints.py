"""Which model dirs get scored, and what identifies them: pretraining milestones under
`{paths.models}/pretrain/<milestone>/`, and any other HF dir (a chat variant, a quantized model).

A checkpoint is identified by the sha256 of its weights, not by its name: retraining with other
settings rewrites `100K/` with new weights, and its old scores must not be reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.files import read_json, sha256_file, sha256_json
from tasks.layout import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, Layout


@dataclass(frozen=True)
class Checkpoint:
    name: str
    directory: Path
    tokens_seen: int         # pretraining tokens behind the weights: the MLflow step of its eval metrics
    weights_sha256: str


def _shards(index: dict) -> list[str]:
    return sorted(set(index.get("weight_map", {}).values()))


def _weights_sha256(directory: Path) -> str:
    if (directory / WEIGHTS_FILE).is_file():
        return sha256_file(directory / WEIGHTS_FILE)
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        shards = _shards(json.loads((directory / WEIGHTS_INDEX_FILE).read_text()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if not shards or missing:
            raise UserError(f"checkpoint {directory}: weight shard {missing[0] if missing else '(none)'} is missing")
        return sha256_json({s: sha256_file(directory / s) for s in shards})
    raise UserError(f"checkpoint {directory}: no weights ({WEIGHTS_FILE} missing)")


def sealed_weights_sha256(files: dict[str, str], read_index: Callable[[], dict]) -> str | None:
    """`Checkpoint.weights_sha256` of a sealed dir, from its seal's record (each file's sha256) without
    reading the weights; `read_index` reads the dir's sharded-weights index when it has one. None when the
    record lists no complete weights."""
    if WEIGHTS_FILE in files:
        return files[WEIGHTS_FILE]
    if WEIGHTS_INDEX_FILE in files:
        shards = _shards(read_index())
        if shards and all(s in files for s in shards):
            return sha256_json({s: files[s] for s in shards})
    return None


def read_checkpoint(directory: Path, name: str | None = None) -> Checkpoint:
    """Any HF Llama dir; `name` defaults to the milestone name in its config.json (else the dir name), and
    its tokens to the `tinyllama.tokens_seen` recorded there (0 when the dir has none)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"checkpoint {directory}: no {CONFIG_FILE} (not a HF checkpoint dir)")
    meta = read_json(config_path).get("tinyllama") or {}
    return Checkpoint(name=name or str(meta.get("milestone", directory.name)), directory=directory,
                      tokens_seen=int(meta.get("tokens_seen", 0)), weights_sha256=_weights_sha256(directory))


def read_milestone(directory: Path) -> Checkpoint:
    """A pretraining milestone: its config.json must say how many tokens it has seen."""
    checkpoint = read_checkpoint(directory)
    if not (read_json(Path(directory) / CONFIG_FILE).get("tinyllama") or {}).get("tokens_seen"):
        raise UserError(f"{Path(directory) / CONFIG_FILE}: no tinyllama.tokens_seen (not a pretrain milestone)")
    return checkpoint


def find_milestones(layout: Layout) -> list[Checkpoint]:
    """Every milestone dir, in token order; temp dirs of an export in progress (".name.tmp-…") skipped."""
    root = layout.pretrain_dir
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not dirs:
        raise UserError(f"{root}: no milestone checkpoints (run `tinyllama pretrain` first)")
    return sorted((read_milestone(d) for d in dirs), key=lambda m: m.tokens_seen)
