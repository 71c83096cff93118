"""The tiny profile's chat data, generated from the embedded world (`data.builtin`): SFT
conversations, DPO preference pairs and the chat evaluation's questions.

What it must teach is the mapping from a question to the fact it asks for, not a few strings, so:
- the people are split once, from the seed: the evaluation's people (`EVAL_PEOPLE_FRACTION`) are
  never named in any SFT or DPO example, so a right answer comes from what pretraining taught;
- every question SFT and DPO ask uses a `train` wording of the template set (wordings.py), many per
  fact; the evaluation asks the same facts in `train` wordings (the "seen" column) and in
  `held-out` wordings no example uses (the "held-out" column), with and without the system prompt,
  plus a follow-up about the person named in the turn before (the "multi-turn" column);
- every answer has one shape, "The <relation> of <person> …" (`ANSWER_FORMS`): the first words name
  the relation the question asks for, which is the decision to learn, and the person is copied from
  the question after them. Measured on the tiny profile (chat-1M, SFT only, 200 held-out questions):
  answers in a phrasing drawn at random from the person's statements 42.5%, always subject-first
  ("X is a writer.") 2.0%, the bare value ("A pig.") 2.0%, this shape 75.5%;
- a DPO pair's rejected answer mostly states another relation of the same person ("The home of
  X is in Seville." asked for X's hobby), the failure a wording-matching model makes, and otherwise
  a wrong value of the asked relation in the chosen answer's phrasing.

Nothing here may leak the pretraining eval items (tasks/data/corpus/world.py): an answer form is
used for a fact only where `World.phrasings` allows it (never a held-out or reserved phrasing; the
fact's other statements otherwise), and composed (two-hop) facts are never stated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tasks.data.corpus.vocab import RELATION_BY_NAME, RELATIONS, render
from tasks.data.corpus.world import World, make_world
from tasks.params import ChatSourceParams, Params
from tasks.sft.formats import Preference
from tasks.sft.reading import SourceRead
from tasks.sft.wordings import FOLLOW_UPS, SYSTEM, wordings

COLUMNS = ("seen", "held-out", "multi-turn")
EVAL_PEOPLE_FRACTION = 1 / 3
SFT_WORDINGS_PER_FACT = 4   # single-question conversations per fact, each in another train wording
FOLLOW_UP_CONVERSATIONS = 2  # per person: every relation asked in turn, after the first by a follow-up
PAIRS_PER_FACT = 3           # DPO pairs per fact: all but the last reject another relation's statement
EVAL_WORDINGS = 5            # questions per eval fact and column, each in another wording
SYSTEM_EVERY = 3             # one SFT conversation / DPO pair in this many starts with the system message
# Each relation's answer: the corpus's "The … of {p}" statement; job has none, so its question's noun phrase
# ("the job of {p}") makes one.
ANSWER_FORMS = {
    "city": "The home of {p} is in {v}.",
    "job": "The job of {p} is {v}.",
    "pet": "The pet of {p} is a {v}.",
    "colour": "The favourite colour of {p} is {v}.",
    "hobby": "The hobby of {p} is {v}.",
}


@dataclass(frozen=True)
class ChatEvalItem:
    messages: tuple[dict, ...]   # ends with the user's question
    answer: str                  # the gold value the reply must contain
    wrong: tuple[str, ...] = ()  # other values of the relation: a reply naming one of them is wrong
    column: str = "held-out"     # seen | held-out | multi-turn (a file's items count as held-out)


@dataclass(frozen=True)
class WorldChat:
    sft: list[tuple[dict, ...]]
    dpo: list[Preference]
    eval: list[ChatEvalItem]
    eval_people: tuple[str, ...]


def _people(world: World, rng: random.Random) -> tuple[list[int], list[int]]:
    """(chat people, eval people)."""
    order = list(range(len(world.people)))
    rng.shuffle(order)
    n_eval = round(len(order) * EVAL_PEOPLE_FRACTION)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _ask(world: World, person: int, template: str) -> dict:
    return _user(template.format(p=world.people[person].name))


def _answer(world: World, person: int, relation: str, rng: random.Random, value: str | None = None) -> dict:
    """The fact in its answer form, or (where that statement is this fact's held-out phrasing) another
    statement training may use for this person (`value`: a false one)."""
    who = world.people[person]
    allowed, form = world.phrasings(person, relation, questions=False), ANSWER_FORMS[relation]
    fallback = rng.choice(allowed)  # drawn for every answer: the data does not reshuffle when a hold-out moves
    phrasing = form if form in allowed or form not in RELATION_BY_NAME[relation].statements else fallback
    return {"role": "assistant", "content": render(phrasing, who.name, value or who.value(relation))}


def _with_system(turns: list[dict], system: bool) -> tuple[dict, ...]:
    return tuple([{"role": "system", "content": SYSTEM}] * system + turns)


def _follow_up_turns(world: World, person: int, relations: list[str], rng: random.Random) -> list[dict]:
    """The first relation asked by name, each next one by a follow-up about the same person."""
    first, *rest = relations
    turns = [_ask(world, person, rng.choice(wordings(first, "train"))), _answer(world, person, first, rng)]
    for relation in rest:
        turns += [_user(rng.choice(FOLLOW_UPS[relation])), _answer(world, person, relation, rng)]
    return turns


def _sft(world: World, people: list[int], rng: random.Random) -> list[tuple[dict, ...]]:
    conversations = []
    for person in people:
        for relation in (r.name for r in RELATIONS):
            for template in rng.sample(wordings(relation, "train"), SFT_WORDINGS_PER_FACT):
                conversations.append([_ask(world, person, template), _answer(world, person, relation, rng)])
        for _ in range(FOLLOW_UP_CONVERSATIONS):
            conversations.append(_follow_up_turns(world, person, rng.sample([r.name for r in RELATIONS],
                                                                             len(RELATIONS)), rng))
    rng.shuffle(conversations)
    return [_with_system(turns, i % SYSTEM_EVERY == 0) for i, turns in enumerate(conversations)]


def _dpo(world: World, people: list[int], rng: random.Random) -> list[Preference]:
    """Chosen states the asked fact; rejected states another relation of the person, or (the last
    pair of a fact) the asked relation with a false value in the same phrasing."""
    pairs = []
    for person in people:
        for relation in (r.name for r in RELATIONS):
            gold = world.people[person].value(relation)
            others = rng.sample([r.name for r in RELATIONS if r.name != relation], PAIRS_PER_FACT - 1)
            for template, other in zip(rng.sample(wordings(relation, "train"), PAIRS_PER_FACT), others + [None]):
                wrong = rng.choice([v for v in RELATION_BY_NAME[relation].values if v != gold])
                state = rng.getstate()
                chosen = _answer(world, person, relation, rng)
                if other is None:
                    rng.setstate(state)  # the same phrasing for both: only the value differs
                    rejected = _answer(world, person, relation, rng, value=wrong)
                else:
                    rejected = _answer(world, person, other, rng)
                prompt = _with_system([_ask(world, person, template)], len(pairs) % SYSTEM_EVERY == 0)
                pairs.append(Preference(prompt, (chosen,), (rejected,)))
    rng.shuffle(pairs)
    return pairs


def _eval(world: World, people: list[int], rng: random.Random) -> list[ChatEvalItem]:
    """Per fact `EVAL_WORDINGS` questions in train and as many in held-out wordings (every other one
    with the system prompt), and one follow-up after a question about another of the person's facts."""
    items = []
    names = [r.name for r in RELATIONS]
    for person in people:
        for index, relation in enumerate(names):
            gold = world.people[person].value(relation)
            wrong = tuple(v for v in RELATION_BY_NAME[relation].values if v != gold)
            for column, split in (("seen", "train"), ("held-out", "held-out")):
                for n, template in enumerate(rng.sample(wordings(relation, split), EVAL_WORDINGS)):
                    items.append(ChatEvalItem(_with_system([_ask(world, person, template)], n % 2 == 0), gold,
                                              wrong, column))
            before = names[(index + 1) % len(names)]
            turns = _follow_up_turns(world, person, [before, relation], rng)[:-1]  # ends with the follow-up
            items.append(ChatEvalItem(_with_system(turns, index % 2 == 0), gold, wrong, "multi-turn"))
    return items


def world_chat(seed: int, entities: int) -> WorldChat:
    world = make_world(seed, entities)
    rng = random.Random(f"tinyllama-chat/{seed}")
    chat_people, eval_people = _people(world, rng)
    return WorldChat(_sft(world, chat_people, rng), _dpo(world, chat_people, rng), _eval(world, eval_people, rng),
                     tuple(world.people[p].name for p in eval_people))


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
