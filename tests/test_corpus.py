"""The embedded corpus (tasks/data/corpus): deterministic, a few MB, facts repeated, eval items held out."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tasks.data.corpus import Corpus, build_corpus, write_eval_items
from tasks.data.corpus.vocab import CHAINS, RELATIONS, render
from tasks.data.corpus.world import make_world
from tasks.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"seed": 1234, "entities": 60, "programs": 1500}
SMALL = {"seed": 7, "entities": 8, "programs": 10}
NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"


def digest(corpus: Corpus) -> str:
    payload = json.dumps([corpus.text_documents, corpus.code_documents,
                          {name: [task.description, task.chance, task.items]
                           for name, task in corpus.eval_tasks.items()}])
    return hashlib.sha256(payload.encode()).hexdigest()


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(**DEFAULTS)


@pytest.fixture(scope="module")
def training_text(corpus) -> str:
    return "\n\n".join(corpus.text_documents + corpus.code_documents)


@pytest.fixture(scope="module")
def world():
    return make_world(DEFAULTS["seed"], DEFAULTS["entities"])


def test_same_seed_gives_identical_corpus(corpus):
    assert digest(build_corpus(**DEFAULTS)) == digest(corpus)


def test_same_seed_gives_identical_corpus_under_other_hash_seeds():
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_corpus import digest, SMALL; "
              "from tasks.data.corpus import build_corpus; print(digest(build_corpus(**SMALL)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(build_corpus(**SMALL))


def test_other_seed_gives_other_corpus():
    one, other = build_corpus(**SMALL), build_corpus(**{**SMALL, "seed": SMALL["seed"] + 1})
    assert one.text_documents != other.text_documents
    assert one.code_documents != other.code_documents
    assert one.eval_tasks["tiny_facts"].items != other.eval_tasks["tiny_facts"].items


def test_size_is_a_few_megabytes_mostly_text(corpus):
    text = sum(len(d.encode()) for d in corpus.text_documents)
    code = sum(len(d.encode()) for d in corpus.code_documents)
    assert 1_000_000 < text + code < 6_000_000
    assert text > code > 0
    assert len(corpus.code_documents) == DEFAULTS["programs"]
    assert all(doc.strip() for doc in corpus.text_documents + corpus.code_documents)


def test_sizes_follow_params(corpus):
    small = build_corpus(**SMALL)
    assert len(small.code_documents) == 10
    people = {name for doc in small.text_documents for name in re.findall(r"about (" + NAME + r")", doc)}
    assert len(people) == 8
    assert sum(map(len, small.text_documents)) < sum(map(len, corpus.text_documents)) / 5
    assert all(task.items for task in small.eval_tasks.values())


def test_task_names_match_params_yaml(corpus):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(params["eval"]["tasks"]) == sorted(corpus.eval_tasks)


def test_items_are_four_way_with_balanced_gold(corpus):
    for name, task in corpus.eval_tasks.items():
        assert task.chance == 0.25 and len(task.items) >= 80, name
        positions = Counter(item["gold"] for item in task.items)
        assert max(positions.values()) - min(positions.values()) <= 1, (name, positions)
        for item in task.items:
            assert set(item) == {"query", "choices", "gold"}
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4, item
            assert item["query"] and all(choice.strip() for choice in item["choices"]), item
        assert len({item["query"] for item in task.items}) == len(task.items), f"{name}: duplicate queries"


def test_distractors_have_the_answers_type(corpus):
    value_sets = [set(r.values) for r in RELATIONS] + [set(c.values) for c in CHAINS]
    for name in ("tiny_facts", "tiny_paraphrase", "tiny_two_hop"):
        for item in corpus.eval_tasks[name].items:
            assert any(set(item["choices"]) <= values for values in value_sets), item
    for item in corpus.eval_tasks["tiny_code"].items:
        gold = item["choices"][item["gold"]]
        if gold.lstrip("-").isdigit():
            assert all(c.lstrip("-").isdigit() for c in item["choices"]), item


def test_no_item_appears_verbatim_in_training(corpus, training_text):
    for name, task in corpus.eval_tasks.items():
        for item in task.items:
            answered = f"{item['query']} {item['choices'][item['gold']]}"
            assert answered not in training_text, (name, answered)


def test_reserved_phrasings_never_occur_in_training(training_text):
    for relation in RELATIONS:
        for phrasing in relation.reserved:
            query = phrasing[: -len(" {v}.")]
            pattern = re.escape(query).replace(re.escape("{p}"), NAME)
            assert not re.search(pattern, training_text), phrasing


def test_fact_items_use_seen_phrasings_and_stated_facts(world, training_text):
    for (person, relation), phrasing in list(world.holdout.fact_phrasing.items())[:40]:
        who = world.people[person]
        pattern = re.escape(phrasing).replace(re.escape("{p}"), NAME).replace(re.escape("{v}"), r"\w+")
        assert re.search(pattern, training_text), f"phrasing never seen in training: {phrasing}"
        stated = [t for t in world.phrasings(person, relation, questions=False)
                  if render(t, who.name, who.value(relation)) in training_text]
        assert len(stated) >= 2, (who.name, relation, stated)


def test_held_out_phrasings_bias_no_answer(world, training_text):
    """Each value follows each phrasing equally often, so holding a phrasing out for one person
    does not make that person's value rarer after it (which would push a model below chance)."""
    for relation in RELATIONS:
        for value in relation.values:
            owners = [p.name for p in world.people if p.value(relation.name) == value]
            counts = [sum(training_text.count(render(t, name, value)) for name in owners) for t in relation.statements]
            assert max(counts) - min(counts) <= 2, (relation.name, value, counts)


def test_two_hop_shows_each_composed_value_equally(world):
    for chain in CHAINS:
        shown = Counter(chain.of(p.value(chain.via)) for i, p in enumerate(world.people)
                        if world.composed_allowed(i, chain.name))
        assert set(shown) == set(chain.values) and len(set(shown.values())) == 1, (chain.name, shown)


def test_facts_are_repeated_many_times(world, training_text):
    for person in range(0, len(world.people), 12):
        who = world.people[person]
        for relation in RELATIONS:
            statements = sum(training_text.count(render(t, who.name, who.value(relation.name)))
                             for t in world.phrasings(person, relation.name, questions=False)
                             + world.phrasings(person, relation.name, questions=True))
            assert statements >= 30, (who.name, relation.name, statements)


def test_two_hop_facts_hidden_for_eval_people_and_shown_for_others(world, training_text):
    for chain in CHAINS:
        hidden = set(world.holdout.hidden_composed[chain.name])
        assert 0 < len(hidden) < len(world.people)
        for person, who in enumerate(world.people):
            value = chain.of(who.value(chain.via))
            said = any(render(t, who.name, value) in training_text for t in chain.phrasings)
            assert said != (person in hidden), (chain.name, who.name, value)
        for bridge, value in chain.mapping:
            assert any(render(t, bridge=bridge, value=value) in training_text for t in chain.bridge_statements)


def test_code_items_are_computed_not_recalled(corpus):
    snippets = "\n\n".join(corpus.code_documents)
    for item in corpus.eval_tasks["tiny_code"].items:
        assert item["query"].endswith("# output:")
        assert f"{item['query']} {item['choices'][item['gold']]}" not in snippets
    assert snippets.count("# output:") > 5 * len(corpus.code_documents) - 1


def _run(body: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(body, "<snippet>", "exec"), {})
    return printed.getvalue().strip()


def test_code_outputs_are_what_python_prints(corpus):
    checked = 0
    for doc in corpus.code_documents[:40]:
        body = []
        for line in doc.split("\n"):
            if line.startswith("# output: "):
                assert _run("\n".join(body)) == line.removeprefix("# output: "), "\n".join(body)
                body, checked = [], checked + 1
            else:
                body.append(line)
    assert checked >= 40 * 4
    for item in corpus.eval_tasks["tiny_code"].items:
        assert _run(item["query"].removesuffix("# output:")) == item["choices"][item["gold"]], item


def test_write_eval_items_files_match_contract(corpus, tmp_path):
    out = tmp_path / "eval"
    written = write_eval_items(corpus, out)
    registry = json.loads((out / "tasks.json").read_text())
    assert sorted(registry) == sorted(corpus.eval_tasks) == sorted(written)
    for name, task in corpus.eval_tasks.items():
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == task.items
        assert registry[name] == {"description": task.description, "n": len(task.items), "chance": 0.25}
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.jsonl" for n in written), "tasks.json"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    write_eval_items(corpus, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


@pytest.mark.parametrize("kwargs, field", [
    ({"entities": 0}, "data.builtin.entities"),
    ({"entities": 10**6}, "data.builtin.entities"),
    ({"programs": 0}, "data.builtin.programs"),
])
def test_bad_sizes_are_user_errors_naming_the_field(kwargs, field):
    with pytest.raises(UserError, match=re.escape(field)):
        build_corpus(**{**DEFAULTS, **kwargs})
