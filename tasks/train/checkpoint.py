"""Resume checkpoints and milestone exports (HF dirs) in a run's dir, for both DDP and FSDP2.

Both live under the run's dir `{train.checkpoint_dir}/run-<fingerprint>/` (a local path or a URI
every node reaches, e.g. `s3://…`), outside DVC's outputs: DVC deletes a stage's outputs before it
reruns it, and a rerun after a crash must find every milestone and checkpoint already made. Both are
*sealed* dirs: the files first (each rank uploads its own), then one JSON file written last, listing
every file's sha256. A dir without a valid seal is incomplete or corrupt and never trusted.

This module writes and reads them itself rather than through Ray Train's checkpoint manager: Ray keeps
its own list of reported checkpoints (`checkpoint_manager_snapshot.json`), and a rerun whose newest
checkpoint had been set aside as corrupt died on "Path not found" when Ray's list still named it.

A resume checkpoint `checkpoint_<step>/` holds the model and AdamW state in one of two layouts:
  full (DDP, every rank holds the whole state):
    model.safetensors      full model state, written by rank 0
    optimizer.safetensors  AdamW moments and step counts, keyed `state.<param>.<name>`
  sharded (FSDP2, the cluster profile: no rank ever holds the whole state):
    shards/shard-<rank+1>-model-00001-of-00001.safetensors
                           each rank's slices of model and optimizer state, written in parallel by
                           torch.distributed.checkpoint's safetensors writer, slice offsets in the
                           file's header. Loading re-slices, so a run may resume on another number
                           of workers.
and in both:
  rng.safetensors        torch RNG state(s) of rank 0 (every rank is seeded alike)
  checkpoint.json        the seal: step, tokens, loader state, optimizer param groups, metrics, and
                         the sha256 of every file above (gathered from all ranks), so a truncated or
                         half-uploaded checkpoint is detected and skipped for the previous one.
A milestone `milestones/<name>/` is an HF Llama dir (model.safetensors, config.json, tokenizer files)
sealed by `milestone.json`; the stage copies every sealed milestone into `{paths.models}/pretrain/`.
Everything is safetensors + JSON: resuming never unpickles a file.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tasks.files import (
    BrokenSeal,
    exists,
    fetch_sealed,
    materialize_sealed,
    move_tree,
    names_in,
    read_json,
    remove_tree,
    seal_record,
    sha256_file,
    upload,
    verify_sealed,
    write_json_atomic,
)
from tasks.layout import CHECKPOINT_FILE, MILESTONE_SEAL, join
from tasks.layout import WEIGHTS_FILE as MODEL_FILE

MILESTONES_DIR = "milestones"
OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"
SHARD_DIR = "shards"
PREFIX = "checkpoint_"
_NAME = re.compile(PREFIX + r"\d{10}")  # not Ray's own files beside them (Ray Train keeps its run state there too)
CORRUPT_PREFIX = "corrupt-"
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


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


def _save_full(directory: Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[list[str], list[dict]]:
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


def _save_sharded(directory: Path, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> tuple[list[str], list[dict]]:
    """Collective: every rank writes its own slices, in parallel, as safetensors under shards/."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    state, param_groups = _sharded_state(model, optimizer)
    save(state, storage_writer=HuggingFaceStorageWriter(str(directory / SHARD_DIR), save_distributed=True))
    return sorted(str(p.relative_to(directory)) for p in (directory / SHARD_DIR).glob("*.safetensors")), param_groups


def _load_sharded(reader, model: torch.nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Collective: every rank reads the slices it owns now (re-sliced if the world size changed) through
    `reader` (a local copy on rank 0, which verified it whole; partial_reads.RemoteShardReader elsewhere)."""
    from torch.distributed.checkpoint import load

    state, _ = _sharded_state(model, optimizer)
    load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(state["optimizer"], param_groups))


def save_checkpoint(run_uri: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, sharded: bool, keep: int, spare: frozenset[str] = frozenset()) -> str:
    """Collective. Writes `checkpoint_<step>/` under the run dir: every rank uploads the files it wrote
    (rank 0 all of a full checkpoint, each rank its shard of a sharded one), then rank 0 writes the seal,
    checkpoint.json, and drops all but the newest `keep` checkpoints, sparing those named in `spare` (rank
    0's: checkpoints a milestone export still reads). Returns the checkpoint's name."""
    name = checkpoint_name(step)
    target = join(run_uri, name)
    if dist.get_rank() == 0:
        remove_tree(target)  # what an earlier attempt at this step left half-written
    dist.barrier()
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        local = Path(tmp)
        written, param_groups = (_save_sharded if sharded else _save_full)(local, model, optimizer)
        upload(local, target, written)
        hashes = {name_: sha256_file(local / name_) for name_ in written}
        every_rank: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every_rank, hashes)  # also the barrier: every rank's files are uploaded
        if dist.get_rank() == 0:
            save_file(_rng_state(), str(local / RNG_FILE))
            upload(local, target, [RNG_FILE])
            files = {n: digest for rank_hashes in every_rank for n, digest in rank_hashes.items()}
            files[RNG_FILE] = sha256_file(local / RNG_FILE)
            write_json_atomic(join(target, CHECKPOINT_FILE),
                              dict(state, layout="sharded" if sharded else "full", param_groups=param_groups,
                                   files=files))
            for old in list_checkpoints(run_uri)[keep:]:
                if old not in spare:
                    remove_tree(join(run_uri, old))
    dist.barrier()
    return name


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint dirs of a run (local path or URI), newest first."""
    return sorted((n for n in names_in(run_uri) if _NAME.fullmatch(n)), reverse=True)


def _quarantine(run_uri: str, name: str) -> None:
    """Move a corrupt checkpoint aside (kept for inspection) so a later save may reuse its name."""
    move_tree(join(run_uri, name), join(run_uri, CORRUPT_PREFIX + name))


def _newest_valid(run_uri: str, scratch: Path, say: Callable[[str], None]) -> tuple[str, dict] | None:
    """Rank 0: (name, record) of the newest checkpoint that verifies; every unusable one is reported
    and set aside."""
    for name in list_checkpoints(run_uri):
        try:
            record = verify_sealed(fetch_sealed(join(run_uri, name), scratch, CHECKPOINT_FILE), CHECKPOINT_FILE)
        except BrokenSeal as exc:
            say(f"warning: resume checkpoint {name} is corrupt ({exc}); falling back to the previous one")
            _quarantine(run_uri, name)
            continue
        say(f"resuming from {name} (step {record['step']}, {record['tokens_seen']} tokens seen)")
        return name, record
    return None


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def restore(run_uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            say: Callable[[str], None] = print) -> dict | None:
    """Collective. Loads the newest valid checkpoint of the run into model, optimizer and RNG on
    every rank; returns its checkpoint.json record, or None when there is nothing to resume from.
    Rank 0 picks and verifies the checkpoint; a full one it reads and broadcasts, a sharded one
    every rank reads its own slices of, the others fetching only the shard files that hold them
    (partial_reads.py)."""
    with tempfile.TemporaryDirectory(prefix="resume-") as scratch:
        found = _newest_valid(run_uri, Path(scratch), say) if dist.get_rank() == 0 else None
        found = _broadcast(found)
        if found is None:
            return None
        name, record = found
        first, sharded = dist.get_rank() == 0, record.get("layout") == "sharded"
        local = fetch_sealed(join(run_uri, name), Path(scratch), CHECKPOINT_FILE) if first else None
        if sharded:
            from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

            from tasks.train.partial_reads import shard_reader

            reader = (HuggingFaceStorageReader(str(local / SHARD_DIR)) if first
                      else shard_reader(join(run_uri, name), Path(scratch), record["files"], SHARD_DIR))
            _load_sharded(reader, model, optimizer, record["param_groups"])
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


def export_milestone(model: torch.nn.Module, run_uri: str, name: str, tokenizer_dir: Path,
                     metadata: dict, **save_options) -> Path | None:
    """Collective. Rank 0 writes the current weights as an HF Llama dir (model.hf.save_hf, which also
    takes `save_options`: a chat model's template) into a local temp dir and publishes it as the sealed
    `milestones/<name>/` of the run; returns that local dir on rank 0 (the caller logs it, then deletes
    it), None elsewhere."""
    from model.hf import save_hf
    from model.llama import Llama

    state = gather_model(model)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Llama(model.config)
    plain.load_state_dict(state, assign=True)
    plain.reset_rope()
    local = save_hf(plain, Path(tempfile.mkdtemp(prefix=f"milestone-{name}-")) / name, tokenizer_dir=tokenizer_dir,
                    metadata=metadata, **save_options)
    publish_milestone(local, run_uri, name, metadata)
    return local


def publish_milestone(local: Path, run_uri: str, name: str, metadata: dict) -> None:
    """A local HF dir as the sealed `milestones/<name>/` of a run: files first, the seal last, so a crash
    in between leaves a milestone `fetch_milestone` refuses."""
    target = join(run_uri, MILESTONES_DIR, name)
    remove_tree(target)
    record = seal_record(local, **metadata)
    upload(local, target, list(record["files"]))
    write_json_atomic(join(target, MILESTONE_SEAL), record)


def milestone_uri(run_uri: str, name: str) -> str:
    return join(run_uri, MILESTONES_DIR, name)


def sealed_milestones(run_uri: str) -> dict[str, dict]:
    """name -> seal record of every milestone of a run that was published whole."""
    found = {}
    for name in names_in(join(run_uri, MILESTONES_DIR)):
        if exists(join(run_uri, MILESTONES_DIR, name, MILESTONE_SEAL)):
            found[name] = read_json(join(run_uri, MILESTONES_DIR, name, MILESTONE_SEAL))
    return found


def fetch_milestone(run_uri: str, name: str, out_dir: Path) -> Path:
    """A sealed milestone of the run, verified, as the local HF dir `out_dir` (atomically: temp + rename)."""
    return materialize_sealed(milestone_uri(run_uri, name), MILESTONE_SEAL, out_dir)
