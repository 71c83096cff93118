"""SFT rows: packing (block-diagonal attention) against padding, and an SFT step against a pretraining
step of the same preset, in one process, in the same minutes.

  .venv/bin/python benchmarks/sft.py --tokenizer models/tokenizer          # after `make run` (tiny tokenizer)
  .venv/bin/python benchmarks/sft.py --tokenizer models/tokenizer --quick  # smoke run: 1 round

Data: the tiny profile's world chat conversations (144, short) and, when ../shared/assets is present,
LLaMA-Factory's 999 Alpaca demo records (long, varied), each rendered in the zephyr template and
tokenized with `--tokenizer`, sequences longer than `--max-length` dropped (as `overlong: drop`).
One epoch of each set is a full training pass (forward, backward, AdamW) over micro-batches of
`--micro-batch` rows of the tiny preset (params.yaml's model):

  packed   best-fit-decreasing packed rows of max_length, attention kept inside each sequence
           (`Llama.loss(..., positions=...)`: RoPE restarts and a block-diagonal mask through SDPA)
  padded   one sequence per row, each micro-batch trimmed to its longest row, plain causal attention

and the step comparison: a packed SFT micro-batch against a pretraining micro-batch of the same shape
(`Llama.loss(rows)`, causal SDPA without a mask), the cost of the mask alone.
Rounds alternate the order of the contenders; medians are reported.

  .venv/bin/python benchmarks/sft.py --from-run DIR    # a finished pipeline run (DIR = its repo root)

reads what the stages themselves logged: the per-step `tokens_per_s` of the pretrain run and
`sft/tokens_per_s` of each variant's run (same Ray Train loop, same workers), medians over the steady
steps (the first two and the last, which validates, checkpoints and exports, left out). Those stages
run minutes apart and with different batches, so for the comparison itself:

  .venv/bin/python benchmarks/sft.py --ray --tokenizer models/tokenizer [--steps 30]

runs, in one Ray session, pretraining (synthetic prepared rows) and SFT (the world chat set, packed)
of the tiny preset through the stages' own code (`tasks.pretrain.stage.pretrain`, `tasks.sft.training.
train_job`: the one Ray Train loop, 2 workers × 1 thread) with the same shapes: 2 workers × 8 rows
× 256 positions per step. Order pretrain, SFT, pretrain, SFT; steady per-step medians from MLflow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared" / "assets" / "sft" / "llamafactory_alpaca_en_demo.json"


def sequences(tokenizer_dir: Path, max_length: int) -> dict[str, list]:
    from model.chat import template
    from model.tokenizer import Tokenizer
    from tasks.sft.formats import alpaca_row
    from tasks.sft.sequences import Encoder
    from tasks.sft.world_chat import world_chat

    encoder = Encoder(Tokenizer.load(tokenizer_dir), template("zephyr").source, max_length, "drop")
    sets = {"world chat": encoder.conversations(world_chat(1234, 24).sft).sequences}
    if ALPACA.is_file():
        sets["alpaca demo"] = encoder.conversations([alpaca_row(r) for r in json.loads(ALPACA.read_text())]).sequences
    return sets


def epoch(model, optimizer, rows, micro: int, packed: bool) -> float:
    import numpy as np
    import torch

    order = np.random.default_rng(0).permutation(len(rows))
    start = time.perf_counter()
    for first in range(0, len(order), micro):
        index = order[first:first + micro]
        length = rows.inputs.shape[1] if packed else int(rows.lengths[index].max())
        inputs = torch.from_numpy(rows.inputs[index, :length]).long()
        targets = torch.from_numpy(rows.targets[index, :length]).long()
        positions = torch.from_numpy(rows.positions[index, :length]).long() if packed else None
        model.loss(inputs, targets, positions=positions).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_pair(model, optimizer, rows, micro: int, repeats: int) -> tuple[float, float]:
    """Seconds per micro step: pretraining rows (causal, no mask) vs packed SFT rows (masked)."""
    import torch

    length = rows.inputs.shape[1]
    pretrain = torch.randint(3, model.config.vocab_size, (micro, length + 1))
    packed = [torch.from_numpy(getattr(rows, name)[:micro]).long() for name in ("inputs", "targets", "positions")]
    times = []
    for call in (lambda: model.loss(pretrain), lambda: model.loss(packed[0], packed[1], positions=packed[2])):
        call().backward()  # warm-up
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for _ in range(repeats):
            call().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start) / repeats)
    return times[0], times[1]


def steady_median(client, run_id: str, key: str) -> float:
    values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
    return statistics.median(values[2:-1] or values)


def from_run(root: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    pretrain = steady_median(client, json.loads((root / "metrics" / "pretrain.json").read_text())["mlflow_run_id"],
                             "tokens_per_s")
    report = {"pretrain_tokens_per_s": round(pretrain), "variants": {}}
    for name, entry in json.loads((root / "metrics" / "sft.json").read_text()).items():
        sft = steady_median(client, entry["mlflow_run_id"], "sft/tokens_per_s")
        report["variants"][name] = {"sft_tokens_per_s": round(sft), "ratio": round(sft / pretrain, 3)}
        print(f"{name}: SFT {sft:,.0f} tok/s vs pretraining {pretrain:,.0f} tok/s: {sft / pretrain:.3f}")
    return report


def ray_comparison(tokenizer_dir: Path, steps: int) -> dict:
    """Steady tokens/s of pretraining and packed SFT through the same Ray Train loop, same shapes."""
    import os
    import tempfile

    import torch
    from mlflow import MlflowClient

    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from conftest import write_prepared
    from pretrain import bench_params

    from model.hf import save_hf
    from model.llama import Llama
    from tasks.layout import Layout, with_absolute_paths
    from tasks.params import parse_params
    from tasks.pretrain.stage import pretrain
    from tasks.ray_cluster import ray_session
    from tasks.sft.jobs import plan_jobs
    from tasks.sft.training import train_job

    rates: dict[str, list[float]] = {"pretrain": [], "sft": []}
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        root = Path(tmp)
        params = bench_params(root, steps, "tiny")
        config = params.llama_config()
        write_prepared(root / "data", root / "models" / "tokenizer",
                       {s.name: 1 + 2 * i for i, s in enumerate(params.data.sources)}, seq_len=params.data.seq_len,
                       vocab_size=config.vocab_size, train_rows=4 * steps * 16, val_rows=256,
                       rows_per_shard=params.data.rows_per_shard)
        torch.manual_seed(0)
        save_hf(Llama(config), root / "models" / "pretrain" / "1", tokenizer_dir, metadata={"tokens_seen": 0})
        raw = params.model_dump(mode="json")
        variant = {"name": "bench", "base": "1", "sources": [{"name": "world", "format": "builtin"}], "lr": 1e-4,
                   "max_length": params.data.seq_len, "batch_size": 16, "micro_batch": 8, "val_fraction": 0.0}
        raw["sft"] = {"checkpoint_dir": str(root / "checkpoints-sft"), "variants": [variant]}
        sft_params = with_absolute_paths(parse_params(raw, "benchmark"))
        layout = Layout.from_params(sft_params)
        rows = plan_jobs(sft_params, layout, "sft")[0].data.items
        variant["epochs"] = steps * 16 / rows  # the same number of steps as pretraining
        raw["sft"]["variants"] = [variant]
        sft_params = with_absolute_paths(parse_params(raw, "benchmark"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        client = MlflowClient()
        with ray_session(params, "benchmark"):
            for _ in range(2):
                metrics = pretrain(params, resume="never")
                rates["pretrain"].append(steady_median(client, metrics["mlflow_run_id"], "tokens_per_s"))
                (job,) = plan_jobs(sft_params, layout, "sft")
                trained = train_job(sft_params, layout, job, parent_run=None, resume="never")
                rates["sft"].append(steady_median(client, trained["mlflow_run_id"], "sft/tokens_per_s"))
    pretrain_rate, sft_rate = statistics.median(rates["pretrain"]), statistics.median(rates["sft"])
    print(f"same loop, same shapes (2 workers × 8 × {params.data.seq_len} per step): pretraining "
          f"{pretrain_rate:,.0f} tok/s, packed SFT {sft_rate:,.0f} tok/s: {sft_rate / pretrain_rate:.3f} "
          f"(runs: {[round(r) for r in rates['pretrain']]} / {[round(r) for r in rates['sft']]})")
    return {"pretrain_tokens_per_s": round(pretrain_rate), "sft_tokens_per_s": round(sft_rate),
            "ratio": round(sft_rate / pretrain_rate, 3), "runs": {k: [round(r) for r in v] for k, v in rates.items()}}


def main() -> int:
    import torch

    from model.llama import Llama
    from tasks.params import load_params
    from tasks.sft.rows import pack, pad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "tokenizer")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "sft.json")
    parser.add_argument("--from-run", type=Path, default=None, metavar="DIR")
    parser.add_argument("--ray", action="store_true", help="pretraining vs SFT through the same Ray Train loop")
    parser.add_argument("--steps", type=int, default=30, help="--ray: optimizer steps of each run")
    args = parser.parse_args()
    if args.from_run is not None or args.ray:
        result = from_run(args.from_run) if args.from_run is not None else ray_comparison(args.tokenizer, args.steps)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_name("sft_from_run.json" if args.from_run else "sft_ray.json").write_text(
            json.dumps(result, indent=1))
        return 0
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Llama(load_params(ROOT / "params.yaml").llama_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    report = {"threads": args.threads, "max_length": args.max_length, "micro_batch": args.micro_batch,
              "rounds": rounds, "sets": {}}
    for name, seqs in sequences(args.tokenizer, args.max_length).items():
        layouts = {"packed": pack(seqs, args.max_length), "padded": pad(seqs, args.max_length)}
        real = sum(len(s.ids) - 1 for s in seqs)
        seconds = {k: [] for k in layouts}
        for r in range(rounds):
            for layout in (list(layouts) if r % 2 == 0 else list(reversed(layouts))):
                seconds[layout].append(epoch(model, optimizer, layouts[layout], args.micro_batch, layout == "packed"))
        entry = {"sequences": len(seqs), "real_tokens": real}
        for layout, rows in layouts.items():
            median = statistics.median(seconds[layout])
            entry[layout] = {"rows": len(rows), "epoch_s": round(median, 2), "real_tokens_per_s": round(real / median),
                             "rounds_s": [round(s, 2) for s in seconds[layout]]}
        entry["packed_speedup"] = round(entry["padded"]["epoch_s"] / entry["packed"]["epoch_s"], 2)
        report["sets"][name] = entry
        print(f"{name}: {len(seqs)} sequences, {real} tokens | packed {entry['packed']['rows']} rows "
              f"{entry['packed']['epoch_s']} s/epoch ({entry['packed']['real_tokens_per_s']} tok/s) | padded "
              f"{entry['padded']['rows']} rows {entry['padded']['epoch_s']} s/epoch "
              f"({entry['padded']['real_tokens_per_s']} tok/s) | packing {entry['packed_speedup']}x", flush=True)
    rows = pack(next(iter(sequences(args.tokenizer, args.max_length).values())), args.max_length)
    pairs = [step_pair(model, optimizer, rows, args.micro_batch, 3 if args.quick else 10) for _ in range(rounds)]
    pretrain_s, sft_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    report["step"] = {"pretrain_s": round(pretrain_s, 4), "sft_packed_s": round(sft_s, 4),
                      "sft_over_pretrain_tokens_per_s": round(pretrain_s / sft_s, 3)}
    print(f"micro step of {args.micro_batch}×{args.max_length}: pretraining {pretrain_s * 1000:.0f} ms, packed SFT "
          f"{sft_s * 1000:.0f} ms: SFT runs at {pretrain_s / sft_s:.2f}× pretraining's tokens/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
