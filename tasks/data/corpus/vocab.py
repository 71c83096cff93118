"""The fixed vocabulary of the built-in world: value lists, relations, two-hop chains and their phrasings.

Kept as plain data apart from the generators so the phrasings can be read (and reviewed for the
held-out guarantees) in one place. Templates use `{p}` for a person, `{v}` for the value and `{b}`
for the bridge value of a chain. A template is a *cloze* when it ends in " {v}." — only clozes can
become eval queries, because the answer must be the continuation of the query.

Why the shape: few phrasings, each used for every person, so a ~3M-parameter model learns them
early and spends the rest of its tokens on the facts (with 6-7 phrasings per relation and chatty
stories it stayed at chance through 1M tokens). `reserved` phrasings never occur in training text
(they test whether a fact is known independently of how it was said). Jobs and pets all start with
a consonant so no article (`a`/`an`) leaks the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "Diego", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
    "Karla", "Louis", "Marta", "Nadia", "Oscar", "Paula", "Quinn", "Rosa", "Simon", "Tessa",
    "Umar", "Vera", "Walter", "Xenia", "Yusuf", "Zara", "Amir", "Bianca", "Carlos", "Dora",
    "Emil", "Fiona", "Gustav", "Hanna", "Ivan", "Julia", "Kofi", "Lidia", "Milo", "Nora",
    "Otto", "Petra", "Rafael", "Sofia", "Tomas", "Ursula", "Victor", "Wanda", "Yara", "Zeno",
    "Arturo", "Beatrix", "Cyrus", "Delia", "Erik", "Flora", "Gideon", "Helga", "Igor", "Judith",
)

LAST_NAMES = (
    "Moreno", "Fischer", "Tanaka", "Okafor", "Lindqvist", "Rossi", "Novak", "Dubois", "Kowalski", "Silva",
    "Haddad", "Petrov", "Jensen", "Costa", "Murphy", "Weber", "Suzuki", "Mendez", "Larsen", "Romano",
    "Becker", "Nakamura", "Adeyemi", "Horvat", "Garnier", "Ortega", "Brandt", "Castillo", "Ivanova", "Keller",
    "Vargas", "Holm", "Ferreira", "Yilmaz", "Marsh", "Quintero", "Sato", "Bauer", "Lopez", "Falk",
    "Moretti", "Duarte", "Kruger", "Pham", "Abbott", "Sandoval", "Ekstrom", "Barros", "Janssen", "Toth",
)

COUNTRY_CITIES = (
    ("France", ("Paris", "Lyon", "Marseille")),
    ("Italy", ("Rome", "Milan", "Naples")),
    ("Spain", ("Madrid", "Seville", "Valencia")),
    ("Germany", ("Berlin", "Munich", "Hamburg")),
    ("Japan", ("Tokyo", "Osaka", "Kyoto")),
    ("Brazil", ("Recife", "Salvador", "Curitiba")),
    ("Canada", ("Toronto", "Ottawa", "Calgary")),
    ("Egypt", ("Cairo", "Luxor", "Giza")),
)

JOB_WORKPLACES = (
    ("baker", "bakery"), ("teacher", "school"), ("doctor", "hospital"), ("farmer", "farm"),
    ("painter", "studio"), ("pilot", "airport"), ("nurse", "clinic"), ("singer", "theater"),
    ("writer", "library"), ("cook", "restaurant"), ("sailor", "harbor"), ("miner", "mine"),
    ("judge", "court"), ("banker", "bank"), ("gardener", "park"), ("mechanic", "garage"),
)

PET_SOUNDS = (
    ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("horse", "neigh"), ("frog", "ribbit"),
    ("snake", "hiss"), ("pig", "oink"), ("mouse", "squeak"), ("cow", "moo"), ("bee", "buzz"),
)

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
           "grey", "silver")

HOBBIES = ("swimming", "fishing", "dancing", "hiking", "cooking", "gardening", "reading", "cycling",
           "knitting", "skating", "climbing", "drawing")


@dataclass(frozen=True)
class Relation:
    """A property every person has: one value from `values`, stated in `statements` or `questions`."""

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    reserved: tuple[str, ...]

    @property
    def phrasings(self) -> tuple[str, ...]:
        return self.statements + self.questions


@dataclass(frozen=True)
class Chain:
    """A two-hop property: person --via--> bridge --mapping--> value (e.g. person → city → country).

    `bridge_statements` state the second hop (always in training); `statements`/`questions` state the
    composed fact directly, which training does only for some people so that the composition is learnable.
    """

    name: str
    via: str
    mapping: tuple[tuple[str, str], ...]
    bridge_statements: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]

    @property
    def phrasings(self) -> tuple[str, ...]:
        return self.statements + self.questions

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value for _, value in self.mapping))

    def of(self, bridge: str) -> str:
        return dict(self.mapping)[bridge]


RELATIONS = (
    Relation(
        name="city",
        values=tuple(city for _, cities in COUNTRY_CITIES for city in cities),
        statements=("{p} lives in {v}.", "The home of {p} is in {v}.", "{p} has a house in {v}."),
        questions=("Q: Where does {p} live? A: {v}.",),
        reserved=("The city that {p} calls home is {v}.", "If you want to visit {p}, you must travel to {v}."),
    ),
    Relation(
        name="job",
        values=tuple(job for job, _ in JOB_WORKPLACES),
        statements=("{p} is a {v}.", "{p} works as a {v}.", "{p} has a job as a {v}."),
        questions=("Q: What is the job of {p}? A: {v}.",),
        reserved=("{p} earns money by working as a {v}.", "The profession of {p} is that of a {v}."),
    ),
    Relation(
        name="pet",
        values=tuple(pet for pet, _ in PET_SOUNDS),
        statements=("{p} has a pet {v}.", "The pet of {p} is a {v}.", "{p} owns a {v}."),
        questions=("Q: What pet does {p} have? A: a {v}.",),
        reserved=("{p} takes care of a small animal, a {v}.", "The animal that lives with {p} is a {v}."),
    ),
    Relation(
        name="colour",
        values=COLOURS,
        statements=("The favourite colour of {p} is {v}.", "{p} likes the colour {v}.", "{p} often wears {v}."),
        questions=("Q: What colour does {p} like? A: {v}.",),
        reserved=("Of all colours, {p} prefers {v}.", "The colour that {p} enjoys most is {v}."),
    ),
    Relation(
        name="hobby",
        values=HOBBIES,
        statements=("{p} enjoys {v}.", "The hobby of {p} is {v}.", "In free time, {p} likes {v}."),
        questions=("Q: What is the hobby of {p}? A: {v}.",),
        reserved=("The favourite pastime of {p} is {v}.", "After work, {p} relaxes by {v}."),
    ),
)

CHAINS = (
    Chain(
        name="country",
        via="city",
        mapping=tuple((city, country) for country, cities in COUNTRY_CITIES for city in cities),
        bridge_statements=("{b} is a city in {v}.", "Q: In which country is {b}? A: {v}."),
        statements=("{p} lives in the country of {v}.", "The home country of {p} is {v}."),
        questions=("Q: In which country does {p} live? A: {v}.",),
    ),
    Chain(
        name="workplace",
        via="job",
        mapping=JOB_WORKPLACES,
        bridge_statements=("A {b} works at the {v}.", "Q: Where does a {b} work? A: at the {v}."),
        statements=("{p} works at the {v}.", "The workplace of {p} is the {v}."),
        questions=("Q: Where does {p} work? A: at the {v}.",),
    ),
    Chain(
        name="sound",
        via="pet",
        mapping=PET_SOUNDS,
        bridge_statements=("A {b} says {v}.", "Q: What does a {b} say? A: {v}."),
        statements=("The pet of {p} says {v}.", "At home, {p} often hears {v}."),
        questions=("Q: What does the pet of {p} say? A: {v}.",),
    ),
)

RELATION_BY_NAME = {relation.name: relation for relation in RELATIONS}

CLOZE_END = " {v}."


def is_cloze(template: str) -> bool:
    return template.endswith(CLOZE_END)


def cloze_query(template: str, person: str) -> str:
    """The question part of a cloze phrasing: everything before " <value>."."""
    return template[: -len(CLOZE_END)].format(p=person)


def render(template: str, person: str = "", value: str = "", bridge: str = "") -> str:
    text = template.format(p=person, v=value, b=bridge)
    return text[0].upper() + text[1:]
