"""The people of the built-in world and the plan of what training must never say about them.

The world is drawn once from the seed; the `Holdout` is drawn with it so the text generator and
the eval items agree on what is held out:
- tiny_facts: for some (person, relation) one *training* phrasing is never used for that person
  (the fact is still stated in the other phrasings, the phrasing for other people);
- tiny_paraphrase: a *reserved* phrasing, never used in training for anyone;
- tiny_two_hop: for most people per chain, the composed fact (e.g. their country) is never
  stated; it must be composed from their city and the city's country, as the others show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tasks.data.corpus.vocab import CHAINS, FIRST_NAMES, LAST_NAMES, RELATION_BY_NAME, RELATIONS, Chain, is_cloze

MAX_ITEMS_PER_TASK = 240
"""Enough items for a ±3-point standard error, few enough that a milestone eval takes seconds."""

ITEMS_PER_PERSON = 4
"""Relations asked per person in tiny_facts and in tiny_paraphrase (of 5): a small world still gives
~240 items, and a held-out phrasing removes only one of a fact's ~6 training phrasings."""

MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES)


@dataclass(frozen=True)
class Person:
    name: str
    values: tuple[tuple[str, str], ...]  # (relation name, value), in RELATIONS order

    def value(self, relation: str) -> str:
        return dict(self.values)[relation]


@dataclass(frozen=True)
class Holdout:
    fact_phrasing: dict[tuple[int, str], str]
    """(person index, relation) -> the training phrasing that tiny_facts asks and training skips."""
    paraphrase: tuple[tuple[int, str, str], ...]
    """(person index, relation, reserved phrasing) asked by tiny_paraphrase."""
    hidden_composed: dict[str, tuple[int, ...]]
    """chain name -> people whose composed fact training never states (asked by tiny_two_hop)."""


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    holdout: Holdout

    def phrasings(self, person: int, relation: str, questions: bool) -> tuple[str, ...]:
        """Training phrasings allowed for this fact (statements or questions), held-out ones removed."""
        spec = RELATION_BY_NAME[relation]
        pool = spec.questions if questions else spec.statements
        skip = self.holdout.fact_phrasing.get((person, relation))
        return tuple(t for t in pool if t != skip)

    def composed_allowed(self, person: int, chain: str) -> bool:
        return person not in self.holdout.hidden_composed[chain]


def _balanced(values: tuple[str, ...], count: int, rng: random.Random) -> list[str]:
    """Each value used equally often (±1), so no answer wins on frequency alone."""
    pool = [values[i % len(values)] for i in range(count)]
    rng.shuffle(pool)
    return pool


def _names(entities: int, rng: random.Random) -> list[str]:
    """Unique full names whose first names repeat as little as possible: a first name that
    identifies its person lets a small model key each fact on one token."""
    firsts = list(FIRST_NAMES)
    rng.shuffle(firsts)
    lasts = [rng.sample(LAST_NAMES, len(LAST_NAMES)) for _ in firsts]
    return [f"{firsts[i % len(firsts)]} {lasts[i % len(firsts)][i // len(firsts)]}" for i in range(entities)]


def _people(entities: int, rng: random.Random) -> tuple[Person, ...]:
    chosen = _names(entities, rng)
    columns = {relation.name: _balanced(relation.values, entities, rng) for relation in RELATIONS}
    return tuple(
        Person(name, tuple((relation.name, columns[relation.name][i]) for relation in RELATIONS))
        for i, name in enumerate(chosen))


def _holdout(people: tuple[Person, ...], rng: random.Random) -> Holdout:
    """Held-out phrasings are statements (whose use `text` balances per value; the one question
    phrasing could not be balanced), differ between people who share a value, and every composed value keeps
    the same number of people whose composition training states: otherwise a model that only
    learned which values follow a phrasing would be pushed *away* from the gold (below chance)."""
    fact_phrasing: dict[tuple[int, str], str] = {}
    paraphrase: list[tuple[int, str, str]] = []
    order = list(range(len(people)))
    rng.shuffle(order)
    for person in order:
        for name in rng.sample([r.name for r in RELATIONS], ITEMS_PER_PERSON):
            if len(fact_phrasing) < MAX_ITEMS_PER_TASK:
                value = people[person].value(name)
                taken = {t for (other, rel), t in fact_phrasing.items()
                         if rel == name and people[other].value(rel) == value}
                clozes = [t for t in RELATION_BY_NAME[name].statements if is_cloze(t)]
                fact_phrasing[(person, name)] = rng.choice([t for t in clozes if t not in taken] or clozes)
        for name in rng.sample([r.name for r in RELATIONS], ITEMS_PER_PERSON):
            if len(paraphrase) < MAX_ITEMS_PER_TASK:
                paraphrase.append((person, name, rng.choice(RELATION_BY_NAME[name].reserved)))
    return Holdout(fact_phrasing, tuple(paraphrase), {chain.name: _hidden(people, chain, rng) for chain in CHAINS})


def _hidden(people: tuple[Person, ...], chain: Chain, rng: random.Random) -> tuple[int, ...]:
    """Everyone but the same number `k` of people per composed value (half the smallest group)."""
    groups: dict[str, list[int]] = {}
    for index, person in enumerate(people):
        groups.setdefault(chain.of(person.value(chain.via)), []).append(index)
    shown_per_value = max(1, min(len(group) for group in groups.values()) // 2)
    shown = {index for value in sorted(groups) for index in rng.sample(groups[value], shown_per_value)}
    return tuple(index for index in range(len(people)) if index not in shown)


def make_world(seed: int, entities: int) -> World:
    rng = random.Random(f"tinyllama-corpus/{seed}/world")
    people = _people(entities, rng)
    return World(people, _holdout(people, rng))
