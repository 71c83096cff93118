"""The natural-language part of the built-in corpus: little paragraphs that state the world's facts.

Every fact is stated many times (`ROUNDS` passes over the world) in varied phrasings and contexts —
a profile of one person, a city and its residents, question-and-answer drills, and
general knowledge (a city's country, a job's workplace, a pet's sound) — because a small model learns
a fact only from many differently worded repetitions. Every fact sentence goes through `World`'s
allowed phrasings, so held-out phrasings and hidden two-hop facts cannot leak into training text.
"""

from __future__ import annotations

import random
from collections import Counter

from tasks.data.corpus.vocab import CHAINS, RELATIONS, Chain, render
from tasks.data.corpus.world import World

ROUNDS = 64
"""Passes over the world; at 60 people this gives ~1.6 MB of text and each fact ~190 statements."""

INTROS = ("Here are some facts about {p}.", "")


class _Narrator:
    """Renders fact sentences for one world, drawing phrasings from a seeded generator."""

    def __init__(self, world: World, rng: random.Random):
        self.world, self.rng = world, rng
        self.used: Counter[tuple[str, str, str]] = Counter()

    def fact(self, person: int, relation: str, questions: bool = False) -> str:
        """The least used allowed phrasing for this (relation, value): every value then follows every
        phrasing equally often, so a phrasing held out for one person biases no answer."""
        who = self.world.people[person]
        value = who.value(relation)
        phrasings = self.world.phrasings(person, relation, questions)
        if not phrasings:
            return ""
        fewest = min(self.used[relation, value, t] for t in phrasings)
        phrasing = self.rng.choice([t for t in phrasings if self.used[relation, value, t] == fewest])
        self.used[relation, value, phrasing] += 1
        return render(phrasing, who.name, value)

    def bridge(self, chain: Chain, bridge: str, questions: bool = False) -> str:
        pool = [t for t in chain.bridge_statements if t.startswith("Q:") == questions]
        return render(self.rng.choice(pool), bridge=bridge, value=chain.of(bridge))

    def composed(self, person: int, chain: Chain, questions: bool = False) -> str:
        if not self.world.composed_allowed(person, chain.name):
            return ""
        who = self.world.people[person]
        pool = chain.questions if questions else chain.statements
        return render(self.rng.choice(pool), who.name, chain.of(who.value(chain.via)))


def _join(sentences: list[str]) -> str:
    return " ".join(s for s in sentences if s)


def _profile(n: _Narrator, person: int) -> str:
    """One person: all their facts in random order, each sometimes followed by its second hop."""
    name = n.world.people[person].name
    relations = [relation.name for relation in RELATIONS]
    n.rng.shuffle(relations)
    sentences = [n.rng.choice(INTROS).format(p=name)]
    for relation in relations:
        sentences.append(n.fact(person, relation))
        for chain in CHAINS:
            if chain.via == relation:
                if n.rng.random() < 0.5:
                    sentences.append(n.bridge(chain, n.world.people[person].value(relation)))
                if n.rng.random() < 0.7:
                    sentences.append(n.composed(person, chain))
    return _join(sentences)


def _city(n: _Narrator, city: str, residents: list[int]) -> str:
    """A city, its country and some residents: puts people next to their city's country."""
    country_chain = next(chain for chain in CHAINS if chain.via == "city")
    sentences = [n.bridge(country_chain, city), "Many people live there."]
    for person in n.rng.sample(residents, min(5, len(residents))):
        sentences.append(n.fact(person, "city"))
        sentences.append(n.fact(person, n.rng.choice([r.name for r in RELATIONS if r.name != "city"])))
    return _join(sentences)


def _questions(n: _Narrator, people: int) -> str:
    """A drill of questions and answers about random people and general knowledge."""
    lines = []
    for _ in range(n.rng.randint(6, 10)):
        person = n.rng.randrange(people)
        kind = n.rng.random()
        if kind < 0.7:
            lines.append(n.fact(person, n.rng.choice(RELATIONS).name, questions=True))
        elif kind < 0.85:
            lines.append(n.composed(person, n.rng.choice(CHAINS), questions=True))
        else:
            chain = n.rng.choice(CHAINS)
            lines.append(n.bridge(chain, n.rng.choice([b for b, _ in chain.mapping]), questions=True))
    return "\n".join(line for line in lines if line)


def _knowledge(n: _Narrator) -> str:
    """General knowledge: the second hop of every chain, stated plainly."""
    sentences = []
    for _ in range(n.rng.randint(6, 10)):
        chain = n.rng.choice(CHAINS)
        sentences.append(n.bridge(chain, n.rng.choice([b for b, _ in chain.mapping])))
    return _join(sentences)


def text_documents(world: World, seed: int) -> list[str]:
    """The whole natural-language part, in a seeded random document order."""
    n = _Narrator(world, random.Random(f"tinyllama-corpus/{seed}/text"))
    people = len(world.people)
    residents: dict[str, list[int]] = {}
    for index, person in enumerate(world.people):
        residents.setdefault(person.value("city"), []).append(index)
    documents = []
    for _ in range(ROUNDS):
        documents += [_profile(n, person) for person in range(people)]
        documents += [_city(n, city, residents[city]) for city in sorted(residents)]
        documents += [_questions(n, people) for _ in range(max(1, people // 6))]
        documents += [_knowledge(n) for _ in range(4)]
    n.rng.shuffle(documents)
    return [doc for doc in documents if doc]
