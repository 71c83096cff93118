"""The seven TinyLlama benchmarks offline: original-schema files -> lm-eval's own task configs.

Adapter tests use small rows written here; the end-to-end ones use the real files in
../shared/assets/eval and skip when it is absent (the project never requires it).
"""

import json

import pytest
import torch
import yaml
from eval_fixtures import ASSETS, ROOT, random_model, write_checkpoint

from tasks.errors import UserError
from tasks.evaluate.harness import load_checkpoint, run_lm_eval
from tasks.evaluate.lm_eval_offline import (
    OFFLINE_TASKS,
    arc_rows,
    boolq_rows,
    hellaswag_jsonl_rows,
    hellaswag_text_rows,
    load_offline_rows,
    openbookqa_rows,
    packaged_yaml,
    piqa_rows,
    winogrande_rows,
)
from tasks.evaluate.tasksets import build_taskset
from tasks.params import parse_params

EVAL_ASSETS = ASSETS / "eval"
needs_assets = pytest.mark.skipif(not EVAL_ASSETS.is_dir(), reason="../shared/assets/eval not present")
SEVEN = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"]
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split"}


def _params(tmp_path, **eval_overrides):
    raw = yaml.safe_load((ROOT / "configs" / "tinyllama-1.1b.yaml").read_text())
    raw["paths"] = {"data": str(tmp_path / "data"), "models": str(tmp_path / "models"),
                    "metrics": str(tmp_path / "metrics")}
    raw["eval"].update({"device": "cpu", **eval_overrides})
    return parse_params(raw)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ai2(stem, labels, key):
    return {"id": "q1",
            "question": {"stem": stem, "choices": [{"text": f"t{label}", "label": label} for label in labels]},
            "answerKey": key}


def test_arc_and_openbookqa_rows(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [_ai2("Why?", ["1", "2", "3"], "3")])
    assert arc_rows(path) == [{"id": "q1", "question": "Why?",
                               "choices": {"text": ["t1", "t2", "t3"], "label": ["1", "2", "3"]}, "answerKey": "3"}]
    assert openbookqa_rows(path)[0]["question_stem"] == "Why?"
    _jsonl(path, [{"id": "q", "question": "flat", "answerKey": "A"}])
    with pytest.raises(UserError, match=r"a.jsonl:1: missing field 'question.stem'"):
        arc_rows(path)


def test_piqa_labels_come_from_the_aligned_lst(tmp_path):
    path = _jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    assert [r["label"] for r in piqa_rows(path)] == [1, 0]
    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(UserError, match="1 labels for 2 rows"):
        piqa_rows(path)


def test_boolq_superglue_and_google_schemas(tmp_path):
    superglue = _jsonl(tmp_path / "val.jsonl", [{"question": "q", "passage": "T -- p", "idx": 0, "label": "true"},
                                                {"question": "q", "passage": "T -- p", "idx": 1, "label": "false"}])
    assert [r["label"] for r in boolq_rows(superglue)] == [1, 0]
    google = _jsonl(tmp_path / "dev.jsonl", [{"question": "q", "title": "T", "answer": False, "passage": "p"}])
    assert boolq_rows(google)[0] == {"question": "q", "passage": "T -- p", "idx": 0, "label": 0}
    _jsonl(superglue, [{"question": "q", "passage": "p", "label": "maybe"}])
    with pytest.raises(UserError, match="is not true/false"):
        boolq_rows(superglue)


def test_winogrande_from_llm_foundry_rebuilds_what_lm_eval_scores(tmp_path):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

    row = {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                               "The trophy did not fit in the suitcase because the suitcase"],
           "continuation": "was too big.", "gold": 0}
    doc = winogrande_rows(_jsonl(tmp_path / "dev.jsonl", [row]))[0]
    assert doc == {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
                   "option1": "trophy", "option2": "suitcase", "answer": "1"}
    assert doc_to_choice(doc) == row["context_options"]
    assert (doc_to_target(doc), doc_to_text(doc)) == (row["continuation"], row["gold"])


def test_hellaswag_text_format(tmp_path):
    text = "Roof shingle removal: A man is sitting on a roof. he\n3\nis a.\nis b.\nis c.\nstarts d.\n"
    (tmp_path / "val.txt").write_text(text)
    row = hellaswag_text_rows(tmp_path / "val.txt")[0]
    assert (row["activity_label"], row["ctx_a"], row["ctx_b"], row["label"]) == \
        ("Roof shingle removal", "A man is sitting on a roof.", "he", "3")
    (tmp_path / "val.txt").write_text(text + "extra\n")
    with pytest.raises(UserError, match="not a multiple of 6"):
        hellaswag_text_rows(tmp_path / "val.txt")


def test_missing_task_file_names_the_task(tmp_path):
    (tmp_path / "eval" / "piqa").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no validation file for task 'piqa' in .*piqa"):
        load_offline_rows(OFFLINE_TASKS["piqa"], tmp_path / "eval")
    with pytest.raises(UserError, match=r"no test file for task 'arc_easy'"):
        build_taskset(_params(tmp_path, data_dir=str(tmp_path / "eval"), tasks=["arc_easy"]), tmp_path / "inc")


def test_task_without_offline_copy_is_a_user_error(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(UserError, match="'mmlu' has no offline copy"):
        build_taskset(_params(tmp_path, data_dir=str(tmp_path / "eval"), tasks=["mmlu"]), tmp_path / "inc")
    with pytest.raises(UserError, match="eval.data_dir: .* is not a directory"):
        build_taskset(_params(tmp_path, data_dir=str(tmp_path / "nope"), tasks=["piqa"]), tmp_path / "inc")


@needs_assets
def test_hellaswag_text_matches_the_original_rows_after_lm_eval_preprocessing():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    original = hellaswag_jsonl_rows(EVAL_ASSETS / "hellaswag" / "hellaswag_val_first10_original-schema.jsonl")
    derived = hellaswag_text_rows(EVAL_ASSETS / "hellaswag" / "hellaswag_val_llamacpp-format_first500.txt")
    assert len(original) == 10 and len(derived) == 500
    a, b = (process_docs(datasets.Dataset.from_list(rows)) for rows in (original, derived[:10]))
    assert [(d["query"], d["choices"], d["gold"]) for d in a] == [(d["query"], d["choices"], d["gold"]) for d in b]


@needs_assets
def test_winogrande_real_rows_round_trip_through_lm_eval_preprocessing():
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

    path = EVAL_ASSETS / "winogrande" / "winogrande_dev_llmfoundry-format_first500.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    docs = winogrande_rows(path)
    assert len(docs) == len(raw) == 500
    assert docs[0] == {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                       "option1": "Sarah", "option2": "Maria", "answer": "2"}  # WinoGrande dev row 0
    for row, doc in zip(raw, docs):
        assert (doc_to_choice(doc), doc_to_target(doc), doc_to_text(doc)) == \
            (row["context_options"], row["continuation"], row["gold"])


@needs_assets
def test_generated_configs_change_only_the_data_location(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    build_taskset(_params(tmp_path, data_dir=str(EVAL_ASSETS), tasks=SEVEN), tmp_path / "inc")
    for name in SEVEN:
        ours = load_yaml(tmp_path / "inc" / name / f"{name}.yaml", resolve_func=False)
        theirs = load_yaml(packaged_yaml(OFFLINE_TASKS[name]), resolve_func=False)
        assert {k: v for k, v in ours.items() if k not in DATA_KEYS} == \
            {k: v for k, v in theirs.items() if k not in DATA_KEYS}, name
        assert ours["dataset_path"] == "json"


@pytest.fixture(scope="module")
def llama2_checkpoint(tmp_path_factory):
    """A random micro Llama with Llama 2's 32000-token vocabulary and its real tokenizer."""
    from model.tokenizer import save_tokenizer_dir

    root = tmp_path_factory.mktemp("llama2")
    tokenizer_dir = save_tokenizer_dir((ASSETS / "tokenizer" / "llama2c_tokenizer.model").read_bytes(),
                                       root / "tokenizer")
    return write_checkpoint(random_model(32000), root / "ckpt", tokenizer_dir, tokens_seen=1, milestone="r")


@needs_assets
def test_all_seven_run_offline_on_the_real_files(tmp_path, llama2_checkpoint):
    torch.set_num_threads(1)
    params = _params(tmp_path, data_dir=str(EVAL_ASSETS), tasks=SEVEN, limit=3, batch_size=8)
    taskset = build_taskset(params, tmp_path / "inc")
    assert not taskset.include_defaults  # nothing from the Hub: only the generated dir is indexed
    docs = {name: list(task.eval_docs) for name, task in taskset.task_manager().load(SEVEN)["tasks"].items()}
    assert sorted(docs) == sorted(SEVEN)
    arc = taskset.task_manager().load(["arc_easy"])["tasks"]["arc_easy"]
    first = docs["arc_easy"][0]
    assert arc.doc_to_text(first) == ("Question: Which statement best explains why photosynthesis is the "
                                      "foundation of most food webs?\nAnswer:")
    assert arc.doc_to_target(first) == 0
    assert [d["label"] for d in docs["piqa"][:3]] == [0, 1, 1]  # piqa_valid-labels_first500.lst
    assert docs["boolq"][0]["label"] == 0  # "false" in the SuperGLUE file
    assert len(docs["hellaswag"]) == 500 and len(docs["openbookqa"]) == 500

    scores = run_lm_eval(*load_checkpoint(llama2_checkpoint), taskset, params.eval)
    for name in SEVEN:
        assert scores[name].n == 3, name
        assert 0.0 <= scores[name].value <= 1.0, name
        assert scores[name].metric == ("acc" if name in ("boolq", "winogrande") else "acc_norm"), name
    chance = taskset.chance
    assert chance["boolq"] == chance["piqa"] == chance["winogrande"] == 0.5
    assert 0.25 <= chance["arc_challenge"] < 0.27 and chance["hellaswag"] == 0.25


def test_the_table_says_which_local_subset_stood_in_for_each_benchmark(tmp_path):
    """A 2-row (or 500-row) local file must never read like TinyLlama's full-split EVAL.md numbers."""
    from tasks.evaluate.stage import settings_note

    _jsonl(tmp_path / "eval" / "arc_easy" / "ARC-Easy-Test_first2.jsonl",
           [_ai2("Why?", ["A", "B"], "A"), _ai2("How?", ["A", "B"], "B")])
    params = _params(tmp_path, tasks=["arc_easy"], data_dir=str(tmp_path / "eval"))
    taskset = build_taskset(params, tmp_path / "include")
    note = settings_note(params, taskset)
    assert "arc_easy: ARC-Easy-Test_first2.jsonl, 2 rows of the test split" in note
    assert "not comparable" in note and "EVAL.md" in note
