"""Resume checkpoints (through Ray Train) and milestone exports (HF dirs), for both DDP and FSDP2.

A resume checkpoint is a directory Ray Train persists under `{train.checkpoint_dir}/<run>/`.
Its model and AdamW state come in one of two layouts:
  full (DDP, every rank holds the whole state):
    model.safetensors      full model state, written by rank 0
    optimizer.safetensors  AdamW moments and step counts, keyed `state.<param>.<name>`
  sharded (FSDP2, the cluster profile: no rank ever holds the whole state):
    shards/shard-<rank+1>-model-00001-of-00001.safetensors
                           each rank's slices of model and optimizer state, written in parallel by
                           torch.distributed.checkpoint's safetensors writer, slice offsets in the
                           file's header. Ray Train merges the ranks' directories into one. Loading
                           re-slices, so a run may resume on another number of workers.
and in both:
  rng.safetensors        torch RNG state(s) of rank 0 (every rank is seeded alike)
  checkpoint.json        step, tokens, loader state, optimizer param groups, metrics, and the
                         sha256 of every file above (gathered from all ranks), so a truncated or
                         half-uploaded checkpoint is detected and skipped for the previous one.
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
from tasks.layout import WEIGHTS_FILE as MODEL_FILE

CHECKPOINT_JSON = "checkpoint.json"
OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"
SHARD_DIR = "shards"
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


def _save_full(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[dict]]:
    """Collective: gathers model and optimizer state; rank 0 writes them. Returns (files written,
    param groups), both empty on the other ranks, which the gather leaves empty-handed."""
    model_state = gather_model(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if dist.get_rank() != 0:
        return [], []
    tensors, param_groups = _flatten_optimizer(optimizer_state)
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(directory / MODEL_FILE))
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    return [MODEL_FILE, OPTIMIZER_FILE], param_groups


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """This rank's slices of model and optimizer state (DTensors), as the dict DCP saves or loads in place."""
    tensors, param_groups = _flatten_optimizer(get_optimizer_state_dict(model, optimizer))
    return {"model": get_model_state_dict(model), "optimizer": tensors}, param_groups


def _save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[dict]]:
    """Collective: every rank writes its own slices, in parallel, as safetensors under shards/."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    state, param_groups = _sharded_state(model, optimizer)
    save(state, storage_writer=HuggingFaceStorageWriter(str(directory / SHARD_DIR), save_distributed=True))
    return sorted(str(p.relative_to(directory)) for p in (directory / SHARD_DIR).glob("*.safetensors")), param_groups


def _load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Collective: every rank reads the slices it owns now (re-sliced if the world size changed)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    state, _ = _sharded_state(model, optimizer)
    load(state, storage_reader=HuggingFaceStorageReader(str(directory / SHARD_DIR)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(state["optimizer"], param_groups))


def save_local(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
               sharded: bool) -> bool:
    """Collective. Writes this rank's part of a checkpoint into `directory` (rank 0: also the RNG
    state and checkpoint.json, last, with the sha256 of every rank's files). Returns whether this
    rank wrote files, i.e. has a directory to hand to `ray.train.report`."""
    written, param_groups = (_save_sharded if sharded else _save_full)(directory, model, optimizer)
    hashes = {name: sha256_file(directory / name) for name in written}
    every_rank: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every_rank, hashes)
    if dist.get_rank() != 0:
        return bool(written)
    save_file(_rng_state(), str(directory / RNG_FILE))
    files = {name: digest for rank_hashes in every_rank for name, digest in rank_hashes.items()}
    files[RNG_FILE] = sha256_file(directory / RNG_FILE)
    record = dict(state, layout="sharded" if sharded else "full", param_groups=param_groups, files=files)
    (directory / CHECKPOINT_JSON).write_text(json.dumps(record, indent=1))
    return True


def _verified_record(directory: Path) -> dict:
    """checkpoint.json, once every file it lists is present with its recorded sha256."""
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
    return record


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
    if not (scratch / name).is_dir():
        fs.get(path, str(scratch / name), recursive=True)
    return scratch / name


def _quarantine(run_uri: str, name: str) -> None:
    """Rename a corrupt checkpoint aside (kept for inspection) so a later save may reuse its name."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_uri)
    fs.mv(f"{path}/{name}", f"{path}/{CORRUPT_PREFIX}{name}", recursive=True)


def _newest_valid(run_uri: str, scratch: Path) -> tuple[str, dict] | None:
    """Rank 0: (name, record) of the newest checkpoint that verifies; every unusable one is logged
    and set aside."""
    for name in list_checkpoints(run_uri):
        try:
            record = _verified_record(_fetch(run_uri, name, scratch))
        except CorruptCheckpoint as exc:
            _say(f"warning: resume checkpoint {name} is corrupt ({exc}); falling back to the previous one")
            _quarantine(run_uri, name)
            continue
        _say(f"resuming from {name} (step {record['step']}, {record['tokens_seen']} tokens seen)")
        return name, record
    return None


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def restore(run_uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Collective. Loads the newest valid checkpoint of the run into model, optimizer and RNG on
    every rank; returns its checkpoint.json record, or None when there is nothing to resume from.
    Rank 0 picks and verifies the checkpoint; a full one it reads and broadcasts, a sharded one
    every rank reads its own slices of."""
    with tempfile.TemporaryDirectory(prefix="resume-") as scratch:
        found = _newest_valid(run_uri, Path(scratch)) if dist.get_rank() == 0 else None
        found = _broadcast(found)
        if found is None:
            return None
        name, record = found
        first, sharded = dist.get_rank() == 0, record.get("layout") == "sharded"
        local = _fetch(run_uri, name, Path(scratch)) if first or sharded else None
        if sharded:
            _load_sharded(local, model, optimizer, record["param_groups"])
        else:
            model_state = load_file(str(local / MODEL_FILE)) if first else {}
            optimizer_state = (_unflatten_optimizer(load_file(str(local / OPTIMIZER_FILE)), record["param_groups"])
                               if first else {})
            set_model_state_dict(model, model_state, options=_SCATTER)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER)
        rng = _broadcast(load_file(str(local / RNG_FILE)) if first else None)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return record


def export_milestone(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path, metadata: dict,
                     **save_options) -> Path | None:
    """Collective. Rank 0 writes the current weights as an HF Llama dir (atomically, model.hf.save_hf,
    which also takes `save_options`: a chat model's template); returns the dir on rank 0, None elsewhere."""
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
    return save_hf(plain, out_dir, tokenizer_dir=tokenizer_dir, metadata=metadata, **save_options)
