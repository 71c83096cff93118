"""Held-out multiple-choice eval items about the built-in world and programs, and their files.

Four tasks of graded difficulty (see `TASKS`), 4 choices each (chance 0.25), distractors of the same
type as the answer, gold positions balanced (each position gold for a quarter of the items ±1).
The query is the text before the answer; the evaluator scores `query + " " + choice`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tasks.data.corpus.code import OUTPUT, Snippet
from tasks.data.corpus.vocab import CHAINS, RELATION_BY_NAME, cloze_query, is_cloze
from tasks.data.corpus.world import MAX_ITEMS_PER_TASK, World
from tasks.files import write_atomic
from tasks.layout import EVAL_TASKS_FILE

CHOICES = 4

TASKS = {
    "tiny_facts": "a person's property asked in a phrasing seen in training for other people, "
                  "never for this person (the fact itself is stated in other phrasings)",
    "tiny_paraphrase": "a person's property asked in a phrasing reserved for evaluation, never in training",
    "tiny_two_hop": "a composed fact never stated for this person (country via city, workplace via job, "
                    "sound via pet); training states the composition only for other people",
    "tiny_code": "what a small program prints; no training program contains it",
}


@dataclass(frozen=True)
class EvalTask:
    description: str
    chance: float
    items: list[dict] = field(default_factory=list)


def _arrange(entries: list[tuple[str, str, tuple[str, ...]]], rng: random.Random) -> list[dict]:
    """(query, gold, wrongs) → items in a seeded order, gold at position i % CHOICES."""
    entries = list(entries)
    rng.shuffle(entries)
    items = []
    for i, (query, gold, wrongs) in enumerate(entries):
        choices = list(wrongs)
        rng.shuffle(choices)
        choices.insert(i % CHOICES, gold)
        items.append({"query": query, "choices": choices, "gold": i % CHOICES})
    return items


def _wrongs(values: tuple[str, ...], gold: str, rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample([v for v in values if v != gold], CHOICES - 1))


def _facts(world: World, rng: random.Random) -> list[tuple[str, str, tuple[str, ...]]]:
    entries = []
    for (person, relation), phrasing in world.holdout.fact_phrasing.items():
        gold = world.people[person].value(relation)
        entries.append((cloze_query(phrasing, world.people[person].name), gold,
                        _wrongs(RELATION_BY_NAME[relation].values, gold, rng)))
    return entries


def _paraphrases(world: World, rng: random.Random) -> list[tuple[str, str, tuple[str, ...]]]:
    entries = []
    for person, relation, phrasing in world.holdout.paraphrase:
        gold = world.people[person].value(relation)
        entries.append((cloze_query(phrasing, world.people[person].name), gold,
                        _wrongs(RELATION_BY_NAME[relation].values, gold, rng)))
    return entries


def _two_hops(world: World, rng: random.Random) -> list[tuple[str, str, tuple[str, ...]]]:
    entries = []
    for chain in CHAINS:
        clozes = [t for t in chain.phrasings if is_cloze(t)]
        for person in world.holdout.hidden_composed[chain.name][: MAX_ITEMS_PER_TASK // len(CHAINS)]:
            who = world.people[person]
            gold = chain.of(who.value(chain.via))
            entries.append((cloze_query(rng.choice(clozes), who.name), gold, _wrongs(chain.values, gold, rng)))
    return entries


def _code(snippets: list[Snippet]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(f"{s.body}\n{OUTPUT}", s.output, s.distractors) for s in snippets]


def eval_tasks(world: World, snippets: list[Snippet], seed: int) -> dict[str, EvalTask]:
    rng = random.Random(f"tinyllama-corpus/{seed}/items")
    entries = {"tiny_facts": _facts(world, rng), "tiny_paraphrase": _paraphrases(world, rng),
               "tiny_two_hop": _two_hops(world, rng), "tiny_code": _code(snippets)}
    return {name: EvalTask(TASKS[name], 1 / CHOICES, _arrange(entries[name], rng)) for name in TASKS}


def write_tasks(tasks: dict[str, EvalTask], out_dir: str | Path) -> dict[str, Path]:
    """`<task>.jsonl` per task, then `tasks.json` last: its presence means the set is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, task in tasks.items():
        lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in task.items)
        written[name] = out_dir / f"{name}.jsonl"
        write_atomic(written[name], lines.encode())
    summary = {name: {"description": task.description, "n": len(task.items), "chance": task.chance}
               for name, task in tasks.items()}
    write_atomic(out_dir / EVAL_TASKS_FILE, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return written
