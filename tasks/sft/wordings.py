"""The question wordings of the builtin world chat, and their frozen split into training and held-out.

A chat model that learned to map questions to facts answers a question in words it was never shown;
one that learned a handful of strings does not. So every question the world chat asks comes from one
template set, composed from sentence frames (direct and indirect questions, "Tell me…"/"Name…"
imperatives, possessives, the subject first or last) and each relation's nouns and verbs, and split
once, by a hash salted with `SPLIT_VERSION`, into `train` wordings (the only ones SFT and DPO data may
use) and `held-out` wordings (asked only by the chat evaluation). The split is frozen: changing a
template, a frame or the fraction changes the split of the templates concerned only, and changing
the version reshuffles all of them, so a result is always quoted with its version.

Follow-ups ("And what is their job?") ask about the person named earlier in the conversation; the
multi-turn check uses the training ones (it tests memory of the person, not wording).
"""

from __future__ import annotations

import hashlib
from functools import cache

from tasks.data.corpus.vocab import RELATIONS

SPLIT_VERSION = "wordings-v1"
HELD_OUT_FRACTION = 0.4

NOUNS = {   # what a relation is called: "the {noun} of {p}", "{p}'s {noun}"
    "city": ("city", "home city", "home town"),
    "job": ("job", "profession", "occupation"),
    "pet": ("pet", "pet animal", "animal"),
    "colour": ("favourite colour", "colour", "preferred colour"),
    "hobby": ("hobby", "pastime", "favourite pastime"),
}
NOUN_FRAMES = (
    "What is the {n} of {p}?", "What is {p}'s {n}?", "{p}'s {n} is what?", "The {n} of {p} is what?",
    "Tell me the {n} of {p}.", "Tell me {p}'s {n}.", "Name the {n} of {p}.", "Name {p}'s {n}.",
    "Do you know the {n} of {p}?", "Do you know {p}'s {n}?", "Can you tell me the {n} of {p}?",
    "I would like to know the {n} of {p}.", "Please give the {n} of {p}.", "Which {n} does {p} have?",
    "What {n} does {p} have?", "Say what the {n} of {p} is.", "I wonder what {p}'s {n} is.",
)
VERB_WORDINGS = {   # questions a relation's noun frames cannot make
    "city": ("Where does {p} live?", "In which city does {p} live?", "Which city is home to {p}?",
             "Tell me where {p} lives.", "Where is the home of {p}?", "{p} lives where?",
             "Which city does {p} live in?", "Where is {p}'s house?", "Do you know where {p} lives?"),
    "job": ("What does {p} do for a living?", "What work does {p} do?", "What does {p} work as?",
            "Tell me what {p} does for work.", "{p} works as what?", "How does {p} earn a living?",
            "Do you know what {p} does for work?"),
    "pet": ("Which animal does {p} keep as a pet?", "What kind of pet does {p} own?", "What animal lives with {p}?",
            "Tell me which pet {p} has.", "{p} owns which animal?", "What animal does {p} own?",
            "Do you know which pet {p} has?"),
    "colour": ("What colour does {p} like?", "Which colour does {p} prefer?", "Which colour does {p} like best?",
               "Tell me which colour {p} likes.", "{p} likes which colour?", "What colour does {p} often wear?",
               "Do you know which colour {p} likes?"),
    "hobby": ("What does {p} enjoy doing?", "How does {p} spend free time?", "What does {p} like doing?",
              "What does {p} do for fun?", "Tell me what {p} enjoys doing.", "What does {p} do in free time?",
              "Do you know what {p} enjoys doing?"),
}
FOLLOW_UPS = {   # about the person named earlier: training wordings only
    "city": ("And where do they live?", "What about their city?", "And which city is their home?"),
    "job": ("And what is their job?", "What about their job?", "And what do they do for a living?"),
    "pet": ("And what pet do they have?", "What about their pet?", "And which animal do they keep?"),
    "colour": ("And what colour do they like?", "What about their favourite colour?",
               "And which colour do they prefer?"),
    "hobby": ("And what is their hobby?", "What about their hobby?", "And what do they enjoy doing?"),
}
SYSTEM = "You are a helpful assistant who knows everyone in town."


def _held_out(relation: str, template: str) -> bool:
    digest = hashlib.sha256(f"{SPLIT_VERSION}/{relation}/{template}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < HELD_OUT_FRACTION


@cache
def all_wordings(relation: str) -> tuple[str, ...]:
    """Every question template of the relation (`{p}`: the person), in a fixed order."""
    composed = [frame.replace("{n}", noun) for frame in NOUN_FRAMES for noun in NOUNS[relation]]
    return tuple(dict.fromkeys(composed + list(VERB_WORDINGS[relation])))


@cache
def wordings(relation: str, split: str) -> tuple[str, ...]:
    """The relation's `train` or `held-out` templates."""
    if split not in ("train", "held-out"):
        raise ValueError(f"split: 'train' or 'held-out', got {split!r}")
    return tuple(t for t in all_wordings(relation) if _held_out(relation, t) == (split == "held-out"))


def split_sizes() -> dict[str, dict[str, int]]:
    """{relation: {"train": n, "held-out": n}}: what a report quotes with `SPLIT_VERSION`."""
    return {r.name: {s: len(wordings(r.name, s)) for s in ("train", "held-out")} for r in RELATIONS}
