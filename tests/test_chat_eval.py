"""The chat evaluation: the frozen wording split, questions about people no chat example names, held-out
wordings no SFT/DPO example uses, DPO pairs that reject the wrong relation, the intervals, batched
greedy answers equal to one-at-a-time ones, and the table's columns."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import pytest

from tasks.data.corpus.vocab import RELATIONS, render
from tasks.sft.intervals import mcnemar_p, paired, wilson
from tasks.sft.wordings import FOLLOW_UPS, SPLIT_VERSION, all_wordings, wordings
from tasks.sft.world_chat import ANSWER_FORMS, COLUMNS, world_chat

# The split each version froze: a change of the template set, its order or the split that keeps the
# version fails here (bump SPLIT_VERSION and record the new fingerprint).
FROZEN = {"wordings-v1": "b6b888c244548ab1"}


def _fingerprint() -> str:
    text = "\n".join(f"{r.name}\t{t}" for r in RELATIONS for t in wordings(r.name, "held-out"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pattern(template: str) -> re.Pattern:
    before, after = template.split("{p}")
    return re.compile(re.escape(before) + r"(?P<p>.+)" + re.escape(after))


def _user_turns(chat) -> list[str]:
    turns = [m["content"] for c in chat.sft for m in c if m["role"] == "user"]
    return turns + [m["content"] for p in chat.dpo for m in p.prompt if m["role"] == "user"]


def test_the_split_is_frozen_per_version_and_covers_every_relation():
    assert _fingerprint() == FROZEN[SPLIT_VERSION]
    for relation in RELATIONS:
        train, held_out = wordings(relation.name, "train"), wordings(relation.name, "held-out")
        assert not set(train) & set(held_out) and set(train) | set(held_out) == set(all_wordings(relation.name))
        assert len(held_out) >= 10 and len(train) >= 10, relation.name
        assert all(t.count("{p}") == 1 for t in train + held_out)
        kinds = {t.split()[0] for t in held_out}  # direct, imperative, indirect, subject-first wordings
        assert {"What", "Tell", "Name"} & kinds and len(kinds) >= 4, (relation.name, kinds)
    with pytest.raises(ValueError, match="split"):
        wordings("city", "test")


def test_no_held_out_wording_occurs_in_any_sft_or_dpo_example():
    chat = world_chat(1234, 24)
    held_out = [_pattern(t) for r in RELATIONS for t in wordings(r.name, "held-out")]
    turns = _user_turns(chat)
    assert turns and not [(p.pattern, t) for t in turns for p in held_out if p.fullmatch(t)]
    seen = [_pattern(t) for r in RELATIONS for t in wordings(r.name, "train")]
    follow_ups = {t for ts in FOLLOW_UPS.values() for t in ts}
    assert all(t in follow_ups or any(p.fullmatch(t) for p in seen) for t in turns)  # only train wordings


def test_eval_asks_about_people_no_example_names_in_both_columns_and_a_follow_up():
    chat = world_chat(1234, 24)
    assert chat == world_chat(1234, 24) and chat != world_chat(1235, 24)
    counts = Counter(item.column for item in chat.eval)
    assert set(counts) == set(COLUMNS) and counts["seen"] >= 200 and counts["held-out"] >= 200
    examples = [m["content"] for c in chat.sft for m in c] + [m["content"] for p in chat.dpo
                                                              for m in p.prompt + p.chosen + p.rejected]
    assert chat.eval_people and not [n for n in chat.eval_people for text in examples if n in text]
    for item in chat.eval:
        question = item.messages[-1]["content"]
        split = {"seen": "train", "held-out": "held-out"}.get(item.column)
        if split:
            assert any(_pattern(t).fullmatch(question) for r in RELATIONS for t in wordings(r.name, split))
            assert _pattern_person(question) in chat.eval_people
        else:  # a follow-up after an answered question about one of the eval people
            assert item.messages[-2]["role"] == "assistant" and any(question in ts for ts in FOLLOW_UPS.values())
            assert any(n in item.messages[-3]["content"] for n in chat.eval_people)
        assert item.answer not in item.wrong and len(item.wrong) >= 5
    systems = Counter((item.column, item.messages[0]["role"] == "system") for item in chat.eval)
    assert all(systems[(column, True)] and systems[(column, False)] for column in COLUMNS)


def _pattern_person(question: str) -> str:
    for relation in RELATIONS:
        for template in all_wordings(relation.name):
            match = _pattern(template).fullmatch(question)
            if match:
                return match["p"]
    raise AssertionError(question)


def test_answers_name_the_relation_before_the_person():
    """Every answer is its relation's "The … of <person>" form, except where that statement is the fact's
    held-out phrasing; job's form is no statement of the corpus and none of its reserved phrasings."""
    from tasks.data.corpus.world import make_world

    chat, world = world_chat(1234, 24), make_world(1234, 24)
    for relation in RELATIONS:
        form = ANSWER_FORMS[relation.name]
        assert form.startswith("The ") and form not in relation.reserved
        assert (form in relation.statements) == (relation.name != "job"), relation.name
    answers = [m["content"] for c in chat.sft for m in c if m["role"] == "assistant"]
    answers += [p.chosen[0]["content"] for p in chat.dpo]
    forms = [re.compile(re.escape(f).replace(re.escape("{p}"), ".+").replace(re.escape("{v}"), r"\w+"))
             for f in ANSWER_FORMS.values()]
    in_form = [a for a in answers if any(form.fullmatch(a) for form in forms)]
    assert 0.7 < len(in_form) / len(answers) < 1  # the rest: facts whose form is held out (tiny_facts asks it)
    held_out = {render(t, world.people[p].name, world.people[p].value(r)) for (p, r), t in
                world.holdout.fact_phrasing.items()}
    assert not held_out & set(answers)


def test_dpo_pairs_mostly_reject_another_relation_of_the_same_person():
    chat = world_chat(1234, 24)
    kinds = Counter()
    for pair in chat.dpo:
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        relation_of = {}
        for text in (chosen, rejected):
            relation_of[text] = {r.name for r in RELATIONS for v in r.values if re.search(rf"\b{v}\b", text)}
        assert len(relation_of[chosen]) == 1 and len(relation_of[rejected]) == 1
        kinds["relation" if relation_of[chosen] != relation_of[rejected] else "value"] += 1
        if relation_of[chosen] == relation_of[rejected]:  # same phrasing, a false value
            a, b = chosen.split(), rejected.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert kinds["relation"] > kinds["value"] > 0


def test_wilson_interval_and_mcnemar():
    assert wilson(0, 10)[0] == 0 and math.isclose(wilson(0, 10)[1], 1.96 ** 2 / (10 + 1.96 ** 2), rel_tol=1e-3)
    low, high = wilson(70, 100)
    assert low < 0.7 < high and math.isclose(1 - high, wilson(30, 100)[0], abs_tol=1e-12)
    assert wilson(140, 200)[1] - wilson(140, 200)[0] < high - low  # more questions, a narrower interval
    assert mcnemar_p(0, 6) == 2 / 2 ** 6 and mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    same = paired("1100", "1100")
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["p_mcnemar"] == 1
    better = paired("0" * 20 + "1" * 80, "1" * 100)
    assert better["c"] == 20 and better["b"] == 0 and better["ci95"][0] > 0 and better["p_mcnemar"] < 0.001
    with pytest.raises(ValueError, match="same"):
        paired("10", "1")


def test_batched_answers_equal_one_at_a_time_greedy_decoding(eval_models, small_tokenizer_dir):
    from model.chat import TEMPLATES, render, stop_strings, tokenize
    from model.generate import generate_stream
    from model.textstream import TextStream
    from model.tokenizer import Tokenizer
    from tasks.sft.chat_accuracy import answers

    tokenizer = Tokenizer.load(small_tokenizer_dir)
    model = eval_models["trained"]
    source = TEMPLATES["zephyr"].source
    conversations = [item.messages for item in world_chat(1234, 24).eval if len(item.messages) == 1][:12]
    expected = []
    for messages in conversations:
        prompt = list(tokenize(tokenizer, render(source, messages, add_generation_prompt=True)).ids)
        stream = TextStream(tokenizer, prompt, stop_strings(source))
        for token in generate_stream(model, prompt, 12, eos_id=tokenizer.eos_id):
            stream.push(token)
            if stream.done:
                break
        stream.finish()
        expected.append(stream.text.strip())
    assert answers(model, tokenizer, source, conversations, 12) == expected
    assert any(expected)


def test_the_table_shows_every_column_with_intervals_and_the_paired_difference():
    from tasks.sft.report import chat_table

    def row(marks: dict[str, str]) -> dict:
        chat = {c: {"accuracy": m.count("1") / len(m), "ci95": list(wilson(m.count("1"), len(m))), "answers": m,
                    "n": len(m), "correct": m.count("1")} for c, m in marks.items()}
        return {"tokens": 1000, "avg": 0.5, "chat": chat}

    sft = {"seen": "1100", "held-out": "1000", "multi-turn": "10"}
    dpo = {"seen": "1110", "held-out": "1100", "multi-turn": "11"}
    table = chat_table({"chat-x": {"base_milestone": "1M", "base": row({c: "0" * len(m) for c, m in sft.items()}),
                                   "sft": row(sft), "dpo": row(dpo)}}, [], "settings")
    assert "chat seen" in table and "chat held-out" in table and "chat multi-turn" in table
    assert f"| chat-x | 1M | SFT | 1K | 50.00 | 50.0 [{100 * wilson(2, 4)[0]:.1f}," in table
    assert "| chat-x | held-out | +25.0 [" in table and SPLIT_VERSION in table
