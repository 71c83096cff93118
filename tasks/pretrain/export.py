"""A milestone's HF dir made from the run's sealed sharded checkpoint, off the training ranks.

Why: gathering a 1.1B model onto rank 0 (a collective), writing a 4.4 GB fp32 HF dir and uploading it kept
the other 15 ranks waiting in the next collective, under NCCL's watchdog. Here a milestone step is also a
checkpoint step (loop.py), every rank writes its own shard of that checkpoint as usual, and rank 0 hands
the conversion to a Ray task: it reads the sealed checkpoint (any node reaches the run's dir), assembles
the full weights with torch.distributed.checkpoint in a single process (no process group), writes the HF
dir and publishes it as the sealed `milestones/<name>/` of the run. Training goes on meanwhile; rank 0
collects finished exports between steps (`PendingExports`), logs where each one is stored to MLflow and
starts its eval.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.layout import join

# Seconds the conversion waits before starting: a test hook standing for a slow export (a big model, a slow
# bucket), to show the training ranks do not wait for it. Unset in real runs.
DELAY_ENV = "TINYLLAMA_EXPORT_DELAY_S"


def hf_from_sharded_checkpoint(run_uri: str, checkpoint: str, name: str, config: dict,
                               tokenizer_files: dict[str, bytes], metadata: dict) -> str:
    """Not collective: the model weights of the sealed sharded checkpoint `checkpoint` of the run as the
    sealed milestone `name`; returns its URI. Reads the checkpoint's shards (verified against the seal)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from model.config import LlamaConfig
    from model.hf import save_hf
    from model.llama import Llama
    from tasks.files import fetch_sealed
    from tasks.layout import CHECKPOINT_FILE
    from tasks.train.checkpoint import SHARD_DIR, milestone_uri, publish_milestone

    time.sleep(float(os.environ.get(DELAY_ENV, "0")))
    with tempfile.TemporaryDirectory(prefix=f"export-{name}-") as scratch:
        scratch = Path(scratch)
        local = fetch_sealed(join(run_uri, checkpoint), scratch / "checkpoint", CHECKPOINT_FILE)
        with torch.device("meta"):
            model = Llama(LlamaConfig(**config))
        state = {"model": {key: torch.empty(value.shape, dtype=value.dtype)
                           for key, value in model.state_dict().items()}}
        load(state, storage_reader=HuggingFaceStorageReader(str(local / SHARD_DIR)), no_dist=True)
        model.load_state_dict(state["model"], assign=True)
        model.reset_rope()
        tokenizer_dir = scratch / "tokenizer"
        tokenizer_dir.mkdir()
        for file_name, data in tokenizer_files.items():
            (tokenizer_dir / file_name).write_bytes(data)
        out = save_hf(model, scratch / "hf" / name, tokenizer_dir=tokenizer_dir, metadata=metadata)
        publish_milestone(out, run_uri, name, metadata)
    return milestone_uri(run_uri, name)


@dataclass
class PendingExports:
    """Rank 0's milestone exports still converting: (ObjectRef, name, metadata, checkpoint) each."""

    running: list[tuple] = field(default_factory=list)

    def submit(self, run_uri: str, checkpoint: str, name: str, config: dict, tokenizer_files: dict[str, bytes],
               metadata: dict) -> None:
        import ray

        # num_cpus=0: always placeable, even when training holds every CPU Ray counts (rank 0 may wait for it at
        # the end); a GPU node has cores to spare for it.
        task = ray.remote(num_cpus=0, max_retries=2)(hf_from_sharded_checkpoint).options(name=f"export-{name}")
        self.running.append((task.remote(run_uri, checkpoint, name, config, tokenizer_files, metadata),
                             name, metadata, checkpoint))

    def checkpoints(self) -> set[str]:
        """The checkpoints still being read: pruning old checkpoints must spare them."""
        return {checkpoint for _, _, _, checkpoint in self.running}

    def finished(self, wait: bool) -> list[tuple[str, str, dict]]:
        """(name, milestone URI, metadata) of the exports done by now; with `wait`, of all of them."""
        import ray

        if not self.running:
            return []
        refs = [ref for ref, _, _, _ in self.running]
        done, _ = ray.wait(refs, num_returns=len(refs) if wait else 1, timeout=None if wait else 0)
        found = [(name, ray.get(ref), metadata) for ref, name, metadata, _ in self.running if ref in done]
        self.running = [entry for entry in self.running if entry[0] not in done]
        return found
