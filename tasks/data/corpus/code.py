"""The code part of the built-in corpus: small Python-like programs, each followed by its output.

Each snippet ends in `# output: <what it prints>`, so a model can learn to run tiny programs
(arithmetic tables, loops, string and list operations, branches) from examples. The eval items
(tiny_code) are snippets of the same families drawn first; no training snippet contains one, so
the model must compute the output, not recall it. Distractors are outputs of *nearby* programs
(another operator, one more iteration, the other branch) so that guessing the type is not enough.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

OUTPUT = "# output:"
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "lamp", "cup", "star", "moon", "rain",
         "box", "key", "hat", "pen", "car", "bus", "map", "egg", "milk", "rose", "ship", "cake",
         "door", "bell", "leaf", "coin", "kite", "nest")
FUNCTIONS = ("f", "g", "calc", "combine", "mix", "apply", "step", "work", "blend", "join_up")
PARAMS = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("left", "right"), ("first", "second"))
NUMBERS = ("x", "n", "count", "value", "num", "size")
STRINGS = ("word", "name", "text", "s", "label", "item")
LISTS = ("nums", "values", "data", "items", "scores", "row")
TOTALS = ("total", "acc", "result", "score")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Snippet:
    family: str
    body: str
    output: str
    distractors: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.body}\n{OUTPUT} {self.output}"


def _wrong(rng: random.Random, gold: str, candidates: list[str], fallback: Callable[[], str]) -> tuple[str, ...]:
    """Three distinct wrong answers, preferring the family's near misses."""
    unique = [c for c in dict.fromkeys(candidates) if c != gold]
    picked = rng.sample(unique, min(3, len(unique)))
    while len(picked) < 3:
        extra = fallback()
        if extra != gold and extra not in picked:
            picked.append(extra)
    return tuple(picked)


def _near_numbers(rng: random.Random, gold: int) -> Callable[[], str]:
    return lambda: str(gold + rng.choice((-3, -2, -1, 1, 2, 3, 4)))


def _function_call(rng):
    name, (a, b) = rng.choice(FUNCTIONS), rng.choice(PARAMS)
    op, x, y = rng.choice(tuple(OPS)), rng.randint(0, 9), rng.randint(0, 9)
    gold = OPS[op](x, y)
    body = f"def {name}({a}, {b}):\n    return {a} {op} {b}\n\nprint({name}({x}, {y}))"
    near = [str(fn(x, y)) for fn in OPS.values()] + [str(gold + 1), str(gold - 1), str(y - x)]
    return body, str(gold), near, _near_numbers(rng, gold)


def _variables(rng):
    u, w = rng.sample(NUMBERS, 2)
    op, x, y = rng.choice(tuple(OPS)), rng.randint(0, 9), rng.randint(0, 9)
    gold = OPS[op](x, y)
    body = f"{u} = {x}\n{w} = {y}\nprint({u} {op} {w})"
    near = [str(fn(x, y)) for fn in OPS.values()] + [str(gold + 1), str(gold - 1)]
    return body, str(gold), near, _near_numbers(rng, gold)


def _loop_total(rng):
    acc, n, k = rng.choice(TOTALS), rng.randint(1, 6), rng.randint(1, 9)
    body = f"{acc} = 0\nfor i in range({n}):\n    {acc} = {acc} + {k}\nprint({acc})"
    near = [str(n + k), str((n + 1) * k), str((n - 1) * k), str(n * k + 1)]
    return body, str(n * k), near, _near_numbers(rng, n * k)


def _range_list(rng):
    start = rng.randint(0, 5)
    stop = start + rng.randint(2, 5)
    body = f"print(list(range({start}, {stop})))"

    def show(lo: int, hi: int) -> str:
        return str(list(range(lo, hi)))

    near = [show(start, stop + 1), show(start + 1, stop), show(start, stop - 1), show(start + 1, stop + 1)]
    return body, show(start, stop), near, lambda: show(start, stop + rng.randint(2, 3))


def _upper(rng):
    var, word, other = rng.choice(STRINGS), *rng.sample(WORDS, 2)
    body = f'{var} = "{word}"\nprint({var}.upper())'
    near = [word, word.capitalize(), other.upper(), word[::-1].upper()]
    return body, word.upper(), near, lambda: rng.choice(WORDS).upper()


def _concat(rng):
    (u, v), (w1, w2) = rng.sample(STRINGS, 2), rng.sample(WORDS, 2)
    body = f'{u} = "{w1}"\n{v} = "{w2}"\nprint({u} + {v})'
    near = [w2 + w1, w1 + w1, w2 + w2, f"{w1} {w2}"]
    return body, w1 + w2, near, lambda: rng.choice(WORDS) + w2


def _repeat(rng):
    word, times = rng.choice(WORDS), rng.randint(2, 3)
    body = f'print("{word}" * {times})'
    near = [word * (times + 1), word * (times - 1), rng.choice(WORDS) * times]
    return body, word * times, near, lambda: rng.choice(WORDS) * times


def _length(rng):
    var, word = rng.choice(STRINGS), rng.choice(WORDS)
    body = f'{var} = "{word}"\nprint(len({var}))'
    gold = len(word)
    near = [str(gold - 1), str(gold + 1), str(gold + 2), str(gold - 2)]
    return body, str(gold), near, _near_numbers(rng, gold)


def _numbers(rng, count: int) -> list[int]:
    return rng.sample(range(0, 20), count)


def _index(rng):
    var, values = rng.choice(LISTS), _numbers(rng, 4)
    i = rng.randrange(4)
    body = f"{var} = {values}\nprint({var}[{i}])"
    return body, str(values[i]), [str(v) for v in values], _near_numbers(rng, values[i])


def _extreme(rng):
    var, values, fn = rng.choice(LISTS), _numbers(rng, rng.randint(3, 5)), rng.choice((max, min))
    body = f"{var} = {values}\nprint({fn.__name__}({var}))"
    gold = fn(values)
    return body, str(gold), [str(v) for v in values], _near_numbers(rng, gold)


def _list_length(rng):
    var, values = rng.choice(LISTS), _numbers(rng, rng.randint(2, 7))
    body = f"{var} = {values}\nprint(len({var}))"
    gold = len(values)
    near = [str(gold - 1), str(gold + 1), str(gold + 2), str(gold - 2)]
    return body, str(gold), [n for n in near if int(n) > 0], _near_numbers(rng, gold + 3)


def _branch(rng):
    var, (x, t) = rng.choice(NUMBERS), rng.sample(range(10), 2)
    yes, no, *others = rng.sample(WORDS, 4)
    body = f'{var} = {x}\nif {var} > {t}:\n    print("{yes}")\nelse:\n    print("{no}")'
    gold, other = (yes, no) if x > t else (no, yes)
    return body, gold, [other, *others], lambda: rng.choice(WORDS)


def _letter(rng):
    var, word, at = rng.choice(STRINGS), rng.choice(WORDS), rng.choice((0, -1))
    body = f'{var} = "{word}"\nprint({var}[{at}])'
    gold = word[at]
    return body, gold, list(word), lambda: rng.choice("abcdefghijklmnopqrstuvwxyz")


FAMILIES = {
    "function_call": _function_call, "variables": _variables, "loop_total": _loop_total,
    "range_list": _range_list, "upper": _upper, "concat": _concat, "repeat": _repeat, "length": _length,
    "index": _index, "extreme": _extreme, "list_length": _list_length, "branch": _branch, "letter": _letter,
}


def make_snippet(family: str, rng: random.Random) -> Snippet:
    body, gold, near, fallback = FAMILIES[family](rng)
    return Snippet(family, body, gold, _wrong(rng, gold, near, fallback))


def eval_snippets(seed: int, count: int) -> list[Snippet]:
    """`count` distinct snippets, families in turn, drawn before (and kept out of) the training programs."""
    rng = random.Random(f"tinyllama-corpus/{seed}/code-eval")
    families, chosen, seen = sorted(FAMILIES), [], set()
    while len(chosen) < count:
        snippet = make_snippet(families[len(chosen) % len(families)], rng)
        if snippet.body not in seen:
            seen.add(snippet.body)
            chosen.append(snippet)
    return chosen


def code_documents(seed: int, programs: int, held_out: list[Snippet]) -> list[str]:
    """`programs` documents of 4–8 snippets each; any snippet containing a held-out one is redrawn."""
    rng = random.Random(f"tinyllama-corpus/{seed}/code")
    families = sorted(FAMILIES)
    forbidden: dict[str, list[str]] = {}
    for snippet in held_out:
        forbidden.setdefault(snippet.family, []).append(snippet.text)
    documents = []
    for _ in range(programs):
        parts, size = [], rng.randint(4, 8)
        while len(parts) < size:
            snippet = make_snippet(rng.choice(families), rng)
            if not any(text in snippet.text for text in forbidden.get(snippet.family, ())):
                parts.append(snippet.text)
        documents.append("\n\n".join(parts))
    return documents
