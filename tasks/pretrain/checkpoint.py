"""Resume checkpoints (through Ray Train) and milestone exports (HF dirs), for both DDP and FSDP2.

A resume checkpoint is a directory Ray Train persists under `{train.checkpoint_dir}/<run>/`:
  model.safetensors      full model state (gathered to rank 0; FSDP2 re-shards it on load)
  optimizer.safetensors  AdamW moments and step counts, keyed `state.<param>.<name>`
  rng.safetensors        torch RNG state(s) of rank 0 (every rank is seeded alike)
  checkpoint.json        step, tokens, loader state, optimizer param groups, metrics, and the
                         sha256 of each file above, so a truncated or half-uploaded
                         checkpoint is detected and skipped for the previous one.
Everything is safetensors + JSON: resuming never unpickles a file.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from tasks.files import sha256_file

CHECKPOINT_JSON = "checkpoint.json"
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE = "model.safetensors", "optimizer.safetensors", "rng.safetensors"
PREFIX = "checkpoint_"
_NAME = re.compile(PREFIX + r"\d{10}")  # not Ray's own checkpoint_manager_snapshot.json beside them
CORRUPT_PREFIX = "corrupt-"
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


class CorruptCheckpoint(Exception):
    pass


def _say(message: str) -> None:
    """On the worker's stderr, which Ray forwards to the driver's console (worker loggers may not be)."""
    print(message, file=sys.stderr, flush=True)


def checkpoint_name(step: int) -> str:
    """Zero-padded so names sort by step."""
    return f"{PREFIX}{step:010d}"


def gather_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full model state on rank 0's CPU (other ranks may get an empty dict)."""
    return get_model_state_dict(model, options=_GATHER)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {f"state.{fqn}.{name}": value.contiguous()
               for fqn, values in state["state"].items() for name, value in values.items()}
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        fqn, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": param_groups}


def save_local(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """Collective. Gathers model and optimizer state; rank 0 writes the checkpoint into `directory`
    (checkpoint.json last). Returns whether this rank wrote files (only rank 0 does)."""
    model_state = gather_model(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if dist.get_rank() != 0:
        return False
    tensors, param_groups = _flatten_optimizer(optimizer_state)
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(directory / MODEL_FILE))
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    save_file(_rng_state(), str(directory / RNG_FILE))
    record = dict(state, param_groups=param_groups,
                  files={name: sha256_file(directory / name) for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)})
    (directory / CHECKPOINT_JSON).write_text(json.dumps(record, indent=1))
    return True


def _read_verified(directory: Path) -> tuple[dict, dict, dict, dict]:
    try:
        record = json.loads((directory / CHECKPOINT_JSON).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptCheckpoint(f"{CHECKPOINT_JSON} unreadable ({exc.__class__.__name__}: {exc})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if sha256_file(path) != expected:
            raise CorruptCheckpoint(f"{name} does not match its recorded sha256")
    try:
        model_state, optimizer_tensors, rng = (load_file(str(directory / n)) for n in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE))
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise CorruptCheckpoint(f"unreadable safetensors ({exc})") from None
    return record, model_state, _unflatten_optimizer(optimizer_tensors, record["param_groups"]), rng


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint dirs of a run (local path or URI), newest first."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_uri)
    if not fs.exists(path):
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    return sorted((n for n in names if _NAME.fullmatch(n)), reverse=True)


def _fetch(run_uri: str, name: str, scratch: Path) -> Path:
    """A local directory holding the checkpoint (remote storage is downloaded into `scratch`)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(f"{run_uri.rstrip('/')}/{name}")
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    fs.get(path, str(scratch / name), recursive=True)
    return scratch / name


def _quarantine(run_uri: str, name: str) -> None:
    """Rename a corrupt checkpoint aside (kept for inspection) so a later save may reuse its name."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_uri)
    fs.mv(f"{path}/{name}", f"{path}/{CORRUPT_PREFIX}{name}", recursive=True)


def _load_newest_valid(run_uri: str) -> tuple[dict, dict, dict, dict] | None:
    """Rank 0: the newest checkpoint that verifies; every unusable one is logged and set aside."""
    with tempfile.TemporaryDirectory(prefix="resume-") as scratch:
        for name in list_checkpoints(run_uri):
            try:
                loaded = _read_verified(_fetch(run_uri, name, Path(scratch)))
            except CorruptCheckpoint as exc:
                _say(f"warning: resume checkpoint {name} is corrupt ({exc}); falling back to the previous one")
                _quarantine(run_uri, name)
                continue
            _say(f"resuming from {name} (step {loaded[0]['step']}, {loaded[0]['tokens_seen']} tokens seen)")
            return loaded
    return None


def restore(run_uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Collective. Loads the newest valid checkpoint of the run into model and optimizer on every
    rank (rank 0 reads, the others receive by broadcast); returns its checkpoint.json record, or
    None when there is nothing to resume from."""
    loaded = _load_newest_valid(run_uri) if dist.get_rank() == 0 else None
    box = [loaded[0] if loaded else None]
    dist.broadcast_object_list(box, src=0)
    record = box[0]
    if record is None:
        return None
    model_state, optimizer_state, rng = loaded[1:] if loaded else ({}, {}, {})
    set_model_state_dict(model, model_state, options=_SCATTER)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER)
    rng_box = [rng]
    dist.broadcast_object_list(rng_box, src=0)
    torch.set_rng_state(rng_box[0]["torch_cpu"])
    if "torch_cuda" in rng_box[0] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_box[0]["torch_cuda"])
    return record


def export_milestone(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path, metadata: dict) -> Path | None:
    """Collective. Rank 0 writes the current weights as an HF Llama dir (atomically, model.hf.save_hf);
    returns the dir on rank 0, None elsewhere."""
    from model.hf import save_hf
    from model.llama import Llama

    state = gather_model(model)
    if dist.get_rank() != 0:
        return None
    config = model.config
    with torch.device("meta"):
        plain = Llama(config)
    plain.load_state_dict(state, assign=True)
    plain.reset_rope()
    return save_hf(plain, out_dir, tokenizer_dir=tokenizer_dir, metadata=metadata)
