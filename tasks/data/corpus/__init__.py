"""The embedded default corpus: a deterministic world of facts and small programs, with held-out eval items.

The tiny profile must run on a fresh machine with nothing downloaded *and* visibly learn, so the
corpus is generated in-process from a seed: a natural-language part (people, their properties and
relations in varied sentences), a code part (small programs with their outputs), and four
multiple-choice tasks whose items never appear verbatim in either part. Same seed and sizes →
byte-identical documents and items (only string-seeded `random.Random`s, no hash or set order).

    corpus = build_corpus(seed=1234, entities=60, programs=1500)
    corpus.text_documents, corpus.code_documents   # list[str] each
    write_eval_items(corpus, "data/eval")          # <task>.jsonl + tasks.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.data.corpus.code import code_documents, eval_snippets
from tasks.data.corpus.items import EvalTask, eval_tasks, write_tasks
from tasks.data.corpus.text import text_documents
from tasks.data.corpus.world import MAX_ITEMS_PER_TASK, MAX_PEOPLE, make_world
from tasks.errors import UserError

MIN_PEOPLE = 4
"""Fewer people leave a task without items."""

__all__ = ["Corpus", "EvalTask", "build_corpus", "write_eval_items", "MIN_PEOPLE", "MAX_PEOPLE"]


@dataclass(frozen=True)
class Corpus:
    text_documents: list[str]
    code_documents: list[str]
    eval_tasks: dict[str, EvalTask]


def build_corpus(seed: int, entities: int, programs: int) -> Corpus:
    """Generate the corpus: `entities` people (~26 KB of text each), `programs` code documents."""
    if not MIN_PEOPLE <= entities <= MAX_PEOPLE:
        raise UserError(f"data.builtin.entities: {entities!r} is out of range ({MIN_PEOPLE}..{MAX_PEOPLE})")
    if programs < 1:
        raise UserError(f"data.builtin.programs: {programs!r} must be at least 1")
    world = make_world(seed, entities)
    snippets = eval_snippets(seed, MAX_ITEMS_PER_TASK)
    return Corpus(text_documents(world, seed), code_documents(seed, programs, snippets),
                  eval_tasks(world, snippets, seed))


def write_eval_items(corpus: Corpus, out_dir: str | Path) -> dict[str, Path]:
    """Write `<task>.jsonl` for every task, then `tasks.json` (docs/CONTRACTS.md), each atomically."""
    return write_tasks(corpus.eval_tasks, out_dir)
