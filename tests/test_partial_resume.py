"""Resume of a sharded (FSDP2) checkpoint where each rank but the verifying rank 0 fetches only the shard
files holding its slices (tasks/train/partial_reads.py): two gloo ranks save, two fresh ranks restore the
same weights bit for bit, and rank 1 reads the headers plus its own file, not the whole checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORLD = 2


def _save_then_restore(rank: int, port: int, run_dir: str, out: str) -> None:
    import tempfile

    import torch.distributed as dist

    from model.config import micro
    from model.llama import Llama
    from tasks.files import read_json
    from tasks.layout import CHECKPOINT_FILE
    from tasks.train.checkpoint import SHARD_DIR, _load_sharded, checkpoint_name, gather_model, restore, save_checkpoint
    from tasks.train.parallel import Parallel, build_optimizer
    from tasks.train.partial_reads import shard_reader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        def fresh(seed: int):
            torch.manual_seed(seed)
            model = Llama(micro())
            parallel = Parallel(model, "fsdp", torch.device("cpu"), "fp32")
            return model, parallel, build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1)

        model, parallel, optimizer = fresh(0)
        parallel.loss(torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(rank))).backward()
        optimizer.step()
        save_checkpoint(run_dir, 1, model, optimizer, {"step": 1, "tokens_seen": 0, "loader": {}, "metrics": {}},
                        sharded=True, keep=2)
        saved = gather_model(model)

        resumed, _, resumed_optimizer = fresh(1)  # other weights, until restored
        record = restore(run_dir, resumed, resumed_optimizer, say=lambda line: None)
        restored = gather_model(resumed)
        again, _, again_optimizer = fresh(2)
        with tempfile.TemporaryDirectory() as scratch:
            reader = shard_reader(f"{run_dir}/{checkpoint_name(1)}", Path(scratch), record["files"], SHARD_DIR)
            _load_sharded(reader, again, again_optimizer, record["param_groups"])
        if rank == 1:
            seal = read_json(Path(run_dir) / checkpoint_name(1) / CHECKPOINT_FILE)
            shard_bytes = sum((Path(run_dir) / checkpoint_name(1) / name).stat().st_size
                              for name in seal["files"] if name.startswith(SHARD_DIR + "/"))
            Path(out).write_text(json.dumps({"fetched": reader.bytes_fetched, "shard_bytes": shard_bytes,
                                             "files": sorted(seal["files"])}))
        if rank == 0:
            assert record["step"] == 1
            for key, value in saved.items():
                assert torch.equal(restored[key], value), key
    finally:
        dist.destroy_process_group()


def test_each_rank_fetches_only_the_shards_holding_its_slices(tmp_path):
    import torch.multiprocessing as mp
    from servers import free_port

    out = tmp_path / "rank1.json"
    mp.spawn(_save_then_restore, args=(free_port(), str(tmp_path / "run"), str(out)), nprocs=WORLD, join=True)
    found = json.loads(out.read_text())
    assert sum(name.startswith("shards/") for name in found["files"]) == WORLD
    # its own file (about half the shard bytes) and every file's header, not the other rank's file
    assert 0 < found["fetched"] < 0.6 * found["shard_bytes"], found
