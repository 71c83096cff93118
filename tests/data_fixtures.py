"""Corpus files in the exact layouts of the real datasets, written by the tests themselves.

- SlimPajama-627B: `train/chunk<N>/example_train_<i>.jsonl.zst`, rows
  `{"text": ..., "meta": {"redpajama_set_name": "RedPajama<Set>"}}`.
- Starcoderdata: one folder per language, `<language>/train-0000i-of-0000n.parquet` with the
  columns `max_stars_repo_path, max_stars_repo_name, max_stars_count, id, content`.

Texts are seeded pseudo-English so every test sees the same bytes; rows from the excluded
`RedPajamaGithub` set carry `GITHUB_MARKER` so a test can prove none reach the shards.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from tasks.params import Params

ROOT = Path(__file__).resolve().parents[1]
GITHUB_MARKER = "zqxgithubmarkerzqx"
SLIMPAJAMA_SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia", "RedPajamaBook",
                   "RedPajamaArXiv", "RedPajamaStackExchange"]
_WORDS = ("the river town keeps a small library where old maps and letters wait for readers who "
          "walk in from the hills every morning with questions about weather stars boats and bread").split()


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def document(rng: random.Random) -> str:
    return " ".join(sentence(rng, rng.randint(5, 20)) for _ in range(rng.randint(1, 8)))


def slimpajama_rows(seed: int, n: int, github_every: int = 5) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if github_every and i % github_every == github_every - 1:
            rows.append({"text": f"def f{i}():\n    return '{GITHUB_MARKER}'\n",
                         "meta": {"redpajama_set_name": "RedPajamaGithub"}})
        else:
            rows.append({"text": document(rng), "meta": {"redpajama_set_name": rng.choice(SLIMPAJAMA_SETS)}})
    return rows


def write_jsonl(path: Path, lines: list, compression: str | None = None) -> Path:
    """`lines` are dicts (serialized) or raw bytes (written as is, for broken rows)."""
    payload = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "zst":
        import zstandard

        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    elif compression == "gz":
        import gzip

        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def write_slimpajama(root: Path, chunks: int = 2, files_per_chunk: int = 2, rows_per_file: int = 40) -> Path:
    """The SlimPajama train layout under `root`; returns the `train/` dir."""
    train = root / "train"
    for c in range(1, chunks + 1):
        for i in range(files_per_chunk):
            rows = slimpajama_rows(seed=c * 1000 + i, n=rows_per_file)
            write_jsonl(train / f"chunk{c}" / f"example_train_{i}.jsonl.zst", rows, "zst")
    return train


def program(rng: random.Random, language: str, i: int) -> str:
    name = f"{rng.choice(_WORDS)}_{i}"
    if language == "python":
        return (f"def {name}(x):\n    total = 0\n    for k in range(x):\n"
                f"        total += k * {rng.randint(2, 9)}\n    return total\n")
    if language == "rust":
        return f"fn {name}(x: u32) -> u32 {{\n    (0..x).map(|k| k * {rng.randint(2, 9)}).sum()\n}}\n"
    return f"function {name}(x) {{\n  return x * {rng.randint(2, 9)};\n}}\n"


def write_starcoderdata(root: Path, languages=("python", "rust", "javascript"), files: int = 2,
                        rows_per_file: int = 30) -> Path:
    """The Starcoderdata layout under `root` (one folder per language); returns `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for language in languages:
        rng = random.Random(language)
        for f in range(files):
            contents = [program(rng, language, f * rows_per_file + i) for i in range(rows_per_file)]
            table = pa.table({
                "max_stars_repo_path": [f"src/{language}/{i}.src" for i in range(rows_per_file)],
                "max_stars_repo_name": [f"user/{language}-repo" for _ in range(rows_per_file)],
                "max_stars_count": pa.array([rng.randint(0, 500) for _ in range(rows_per_file)], pa.int64()),
                "id": [f"{language}-{f}-{i}" for i in range(rows_per_file)],
                "content": contents,
            })
            (root / language).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / language / f"train-{f:05d}-of-{files:05d}.parquet")
    return root


def make_params(tmp_path: Path, sources: list[dict], **data) -> Params:
    """The repo's params.yaml with `data.sources` (and any other `data.*`) replaced and every
    path under `tmp_path`, validated exactly as the CLI validates it."""
    from tasks.params import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {"data": str(tmp_path / "data"), "models": str(tmp_path / "models"),
                    "metrics": str(tmp_path / "metrics")}
    raw["data"].update(data)
    raw["data"]["sources"] = sources
    raw["tokenizer"]["train_sources"] = [s["name"] for s in sources]
    return parse_params(raw)


def write_params(tmp_path: Path, sources: list[dict], **data) -> Path:
    """Like `make_params`, as a YAML file for the CLI."""
    params = make_params(tmp_path, sources, **data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path
