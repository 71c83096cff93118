"""The tiny profile's chat data, generated from the embedded world (`data.builtin`): SFT
conversations, DPO preference pairs and the held-out chat-accuracy questions.

Every (person, relation) fact of the world goes to exactly one of three parts, drawn from the seed:
questions about `eval` facts are never asked in SFT or DPO data, so the chat accuracy measures
whether the chat model surfaces what pretraining taught it, not what alignment showed it. `dpo`
facts are not in the SFT data either, so the SFT model has something left to be corrected on.

Nothing here may leak the pretraining eval items (tasks/data/corpus/world.py): answers use only the
statement phrasings `World.phrasings` allows for that person (never a held-out or reserved one),
and composed (two-hop) facts are never stated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tasks.data.corpus.vocab import RELATION_BY_NAME, RELATIONS, render
from tasks.data.corpus.world import World, make_world
from tasks.params import ChatSourceParams, Params
from tasks.sft.formats import Preference
from tasks.sft.reading import SourceRead

QUESTIONS = {
    "city": ("Where does {p} live?", "In which city does {p} live?", "Which city is home to {p}?"),
    "job": ("What is the job of {p}?", "What does {p} do for a living?", "What work does {p} do?"),
    "pet": ("What pet does {p} have?", "Which animal does {p} keep as a pet?", "What kind of pet does {p} own?"),
    "colour": ("What colour does {p} like?", "What is the favourite colour of {p}?", "Which colour does {p} prefer?"),
    "hobby": ("What is the hobby of {p}?", "What does {p} enjoy doing?", "How does {p} spend free time?"),
}
SYSTEM = "You are a helpful assistant who knows everyone in town."
EVAL_FRACTION, DPO_FRACTION = 0.25, 0.25
PAIRS_PER_FACT = 3     # DPO pairs per fact: different question phrasings and wrong values
EVAL_PHRASINGS = 2     # held-out questions per eval fact, in different phrasings (less phrasing luck)
SYSTEM_EVERY = 3       # one SFT conversation in this many starts with the system message


@dataclass(frozen=True)
class ChatEvalItem:
    messages: tuple[dict, ...]   # ends with the user's question
    answer: str                  # the gold value the reply must contain
    wrong: tuple[str, ...] = ()  # other values of the relation: a reply naming one of them is wrong


@dataclass(frozen=True)
class WorldChat:
    sft: list[tuple[dict, ...]]
    dpo: list[Preference]
    eval: list[ChatEvalItem]


def _split(world: World, rng: random.Random) -> dict[str, list[tuple[int, str]]]:
    facts = [(person, relation.name) for person in range(len(world.people)) for relation in RELATIONS]
    rng.shuffle(facts)
    n_eval, n_dpo = round(len(facts) * EVAL_FRACTION), round(len(facts) * DPO_FRACTION)
    return {"eval": facts[:n_eval], "dpo": facts[n_eval:n_eval + n_dpo], "sft": facts[n_eval + n_dpo:]}


def _question(world: World, person: int, relation: str, rng: random.Random) -> dict:
    return {"role": "user", "content": rng.choice(QUESTIONS[relation]).format(p=world.people[person].name)}


def _answer(world: World, person: int, relation: str, rng: random.Random, value: str | None = None) -> dict:
    """A statement of the fact in a phrasing training may use for this person (`value`: a false one)."""
    who = world.people[person]
    phrasing = rng.choice(world.phrasings(person, relation, questions=False))
    return {"role": "assistant", "content": render(phrasing, who.name, value or who.value(relation))}


def _sft(world: World, facts: list[tuple[int, str]], rng: random.Random) -> list[tuple[dict, ...]]:
    """Two single-question conversations per fact, and per person one conversation asking all of
    their SFT facts in turn (the model must keep answering about the person last named)."""
    conversations = []
    for person, relation in facts:
        for _ in range(2):
            conversations.append([_question(world, person, relation, rng), _answer(world, person, relation, rng)])
    by_person: dict[int, list[str]] = {}
    for person, relation in facts:
        by_person.setdefault(person, []).append(relation)
    for person in sorted(by_person):
        turns = []
        for relation in by_person[person]:
            turns += [_question(world, person, relation, rng), _answer(world, person, relation, rng)]
        conversations.append(turns)
    rng.shuffle(conversations)
    system = {"role": "system", "content": SYSTEM}
    return [tuple([system] * (i % SYSTEM_EVERY == 0) + turns) for i, turns in enumerate(conversations)]


def _dpo(world: World, facts: list[tuple[int, str]], rng: random.Random) -> list[Preference]:
    """Chosen states the true value, rejected the same phrasing with a false one."""
    pairs = []
    for person, relation in facts:
        gold = world.people[person].value(relation)
        wrongs = rng.sample([v for v in RELATION_BY_NAME[relation].values if v != gold], PAIRS_PER_FACT)
        for wrong in wrongs:
            question = _question(world, person, relation, rng)
            state = rng.getstate()
            chosen = _answer(world, person, relation, rng)
            rng.setstate(state)  # the same phrasing for both: only the value differs
            rejected = _answer(world, person, relation, rng, value=wrong)
            pairs.append(Preference((question,), (chosen,), (rejected,)))
    rng.shuffle(pairs)
    return pairs


def _eval(world: World, facts: list[tuple[int, str]], rng: random.Random) -> list[ChatEvalItem]:
    items = []
    for person, relation in facts:
        gold = world.people[person].value(relation)
        wrong = tuple(v for v in RELATION_BY_NAME[relation].values if v != gold)
        name = world.people[person].name
        for question in rng.sample(QUESTIONS[relation], EVAL_PHRASINGS):
            items.append(ChatEvalItem(({"role": "user", "content": question.format(p=name)},), gold, wrong))
    return items


def world_chat(seed: int, entities: int) -> WorldChat:
    world = make_world(seed, entities)
    rng = random.Random(f"tinyllama-chat/{seed}")
    parts = _split(world, rng)
    return WorldChat(_sft(world, parts["sft"], rng), _dpo(world, parts["dpo"], rng), _eval(world, parts["eval"], rng))


def chat_for(params: Params) -> WorldChat:
    spec = params.data.builtin
    return world_chat(spec.seed, spec.entities)


def builtin_source(source: ChatSourceParams, preference: bool, params: Params) -> SourceRead:
    chat = chat_for(params)
    examples = chat.dpo if preference else chat.sft
    spec = params.data.builtin
    uri = f"builtin://chat-{'dpo' if preference else 'sft'}?seed={spec.seed}&entities={spec.entities}"
    examples = examples[:source.limit] if source.limit else examples
    return SourceRead(source.name, list(examples), {uri: "generated"}, rows=len(examples))
