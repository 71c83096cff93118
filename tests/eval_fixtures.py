"""Building blocks for the evaluation tests: eval items in the contract's format, a micro Llama that
has (or has not) learned them, milestone checkpoints, prepared val shards and a pretrain MLflow run.

Why a *trained* model: a test that only checks "a number in [0, 1] came out" cannot fail. A model
trained on the items' answers must score near 1 and a random one near chance, which only holds if
the task YAMLs join query and choice the way the corpus states facts and pick the right gold.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"

_SUBJECTS = ("Zorbia", "Quellan", "Mirth", "Dovania", "Pelor", "Ukra", "Tessly", "Varn", "Brisk", "Olmond",
             "Gantry", "Hollis")
_VALUES = ("red", "blue", "green", "gold")
_THINGS = ("cat", "dog", "owl", "fox")


def _items(template: str, values: tuple[str, ...], seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i, subject in enumerate(_SUBJECTS):
        gold_value = values[(i + seed) % len(values)]
        choices = [v for v in values if v != gold_value]
        rng.shuffle(choices)
        choices.insert(i % len(values), gold_value)
        items.append({"query": template.format(subject), "choices": choices, "gold": i % len(values)})
    return items


def eval_items() -> dict[str, list[dict]]:
    """Two tasks of 12 four-way items each (chance 0.25), gold positions balanced."""
    return {"tiny_colors": _items("The flag of {} is", _VALUES, 1),
            "tiny_pets": _items("In {} every child keeps a", _THINGS, 2)}


def fact_texts(items: dict[str, list[dict]]) -> list[str]:
    """The sentences that state each item's answer: `query + " " + gold + "."`."""
    return [f"{item['query']} {item['choices'][item['gold']]}." for task in items.values() for item in task]


def write_eval_items(eval_dir: Path, items: dict[str, list[dict]]) -> Path:
    """`<task>.jsonl` + `tasks.json`, as CONTRACTS.md says prepare writes them."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in items.items():
        (eval_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (eval_dir / "tasks.json").write_text(json.dumps(
        {task: {"description": task, "n": len(rows), "chance": 1 / len(rows[0]["choices"])}
         for task, rows in items.items()}))
    return eval_dir


def micro_config(vocab_size: int):
    from model.config import preset

    return preset("micro").with_overrides(vocab_size=vocab_size)


def random_model(vocab_size: int, seed: int = 0):
    import torch

    from model.llama import Llama

    torch.manual_seed(seed)
    return Llama(micro_config(vocab_size)).eval()


def trained_model(tokenizer_dir: Path, texts: list[str], steps: int = 120, seed: int = 0):
    """A micro Llama fitted to `texts`, full batch, AdamW; ~10 s on one busy core. Each row is
    BOS + text + BOS: packed data puts the next document's BOS after a text, not EOS."""
    import torch

    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    model = random_model(tokenizer.vocab_size, seed).train()
    seqs = [seq + [tokenizer.bos_id] for seq in tokenizer.encode_batch(texts, bos=True)]
    width = max(map(len, seqs))
    rows = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, seq in enumerate(seqs):
        rows[i, :len(seq)] = torch.tensor(seq)
    inputs = rows[:, :-1].clamp(min=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model.loss(inputs, rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_checkpoint(model, out_dir: Path, tokenizer_dir: Path, tokens_seen: int, milestone: str) -> Path:
    from model.hf import save_hf

    return save_hf(model, out_dir, tokenizer_dir=tokenizer_dir,
                   metadata={"milestone": milestone, "milestone_tokens": tokens_seen, "tokens_seen": tokens_seen,
                             "step": tokens_seen // 1000})


def write_prepared(data_dir: Path, tokenizer_dir: Path, texts: list[str], seq_len: int = 32) -> Path:
    """A prepared dir per CONTRACTS.md with only what evaluation reads: the manifest and val shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    stream = [tok for text in texts * 4 for tok in tokenizer.encode(text, bos=True)]
    row_len = seq_len + 1
    rows = np.array(stream[: len(stream) // row_len * row_len], dtype=np.uint16).reshape(-1, row_len)
    prepared = data_dir / "prepared"
    shard = "facts/val/shard-00000.parquet"
    (prepared / shard).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"tokens": pa.array(rows.tolist(), type=pa.list_(pa.uint16()))}), prepared / shard)
    split = {"rows": len(rows), "tokens": rows.size, "documents": len(texts), "shards": [shard]}
    manifest = {"version": 1, "seq_len": seq_len, "row_len": row_len, "vocab_size": tokenizer.vocab_size,
                "dtype": "uint16", "separator": "bos", "tokenizer_sha256": tokenizer.sha256,
                "sources": {"facts": {"format": "jsonl", "inputs": {}, "splits": {
                    "train": {"rows": 0, "tokens": 0, "documents": 0, "shards": []}, "val": split}}}}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    return prepared


def start_pretrain_run(tracking_uri: str, metrics_dir: Path, experiment: str = "eval-tests") -> str:
    """A finished MLflow run standing in for pretraining's, and the metrics/pretrain.json naming it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    artifacts = (metrics_dir.parent / "mlartifacts").resolve().as_uri()
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifacts)
    run = client.create_run(experiment_id, run_name="pretrain")
    client.log_metric(run.info.run_id, "train/loss", 3.0, step=1)
    client.set_terminated(run.info.run_id)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "pretrain.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
    return run.info.run_id


def eval_params(root: Path, tracking_uri: str | None = None, **eval_overrides):
    """The repo's params.yaml, validated, with every path under `root` and `eval.*` overridden."""
    from tasks.params import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models"), "metrics": str(root / "metrics")}
    raw["mlflow"]["tracking_uri"] = tracking_uri
    raw["eval"].update(eval_overrides)
    return parse_params(raw)


def write_eval_params(root: Path, tracking_uri: str, **eval_overrides) -> Path:
    """`eval_params` as root/params.yaml, for the CLI."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(eval_params(root, tracking_uri, **eval_overrides).model_dump(mode="json")))
    return path


def make_project(root: Path, models: dict, tracking_uri: str) -> dict:
    """A project dir for the `evaluate` stage: items, val shards, milestones `1K` (the random model)
    and `4K` (the trained one), a pretrain run and params.yaml. `models` is the `eval_models` fixture."""
    items, tokenizer_dir = models["items"], models["tokenizer_dir"]
    write_eval_items(root / "data" / "eval", items)
    write_prepared(root / "data", tokenizer_dir, fact_texts(items))
    pretrain = root / "models" / "pretrain"
    write_checkpoint(models["random"], pretrain / "1K", tokenizer_dir, tokens_seen=1024, milestone="1K")
    write_checkpoint(models["trained"], pretrain / "4K", tokenizer_dir, tokens_seen=4096, milestone="4K")
    run_id = start_pretrain_run(tracking_uri, root / "metrics")
    params = write_eval_params(root, tracking_uri, tasks=list(items), batch_size=16, perplexity_rows=64)
    return {"root": root, "params": params, "uri": tracking_uri, "run_id": run_id, "tasks": list(items)}
