"""Tiny-profile tasks: prepare's items as lm-eval YAMLs, scored by real lm-eval on real checkpoints.

The check that makes these tests able to fail: lm-eval's acc_norm must equal a direct computation
with our own model code (model.llama, model.tokenizer) item by item, and a model trained on the
answers must score near 1 while a random one does not.
"""

import json

import pytest
import torch
from eval_fixtures import eval_params, write_checkpoint, write_eval_items

from tasks.errors import UserError
from tasks.evaluate.harness import load_checkpoint, run_lm_eval
from tasks.evaluate.lm_eval_tiny import check_items, tiny_task_config
from tasks.evaluate.tasksets import build_taskset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _direct_acc_norm(checkpoint, items) -> float:
    """acc_norm as lm-eval defines it (argmax of loglik / len(choice)), computed with our model code:
    BOS + query is the context, `" " + choice` the scored continuation."""
    from model.hf import load_hf
    from model.tokenizer import Tokenizer

    model, tokenizer = load_hf(checkpoint), Tokenizer.load(checkpoint)
    hits = 0
    for item in items:
        context = tokenizer.encode(item["query"], bos=True)
        lls = []
        for choice in item["choices"]:
            full = tokenizer.encode(f"{item['query']} {choice}", bos=True)
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([full[:-1]])).float(), dim=-1)[0]
            lls.append(sum(logp[pos - 1, full[pos]].item() for pos in range(len(context), len(full))))
        normed = [ll / len(choice) for ll, choice in zip(lls, item["choices"])]
        hits += int(max(range(len(normed)), key=normed.__getitem__) == item["gold"])
    return hits / len(items)


def test_lm_eval_scores_equal_a_direct_computation_and_follow_learning(tmp_path, eval_models):
    items = eval_models["items"]
    write_eval_items(tmp_path / "data" / "eval", items)
    params = eval_params(tmp_path, tasks=list(items))
    taskset = build_taskset(params, tmp_path / "include")
    assert taskset.chance == {task: 0.25 for task in items}
    averages = {}
    for kind in ("trained", "random"):
        checkpoint = write_checkpoint(eval_models[kind], tmp_path / "models" / kind, eval_models["tokenizer_dir"],
                                      tokens_seen=1000, milestone=kind)
        model, tokenizer = load_checkpoint(checkpoint)
        scores = run_lm_eval(model, tokenizer, taskset, params.eval)
        assert list(scores) == list(items)
        for task, task_items in items.items():
            assert scores[task].metric == "acc_norm"
            assert scores[task].n == len(task_items)
            assert scores[task].value == pytest.approx(_direct_acc_norm(checkpoint, task_items), abs=1e-9)
        averages[kind] = sum(s.value for s in scores.values()) / len(scores)
    assert averages["trained"] >= 0.9
    assert averages["trained"] >= averages["random"] + 0.3


def test_limit_caps_the_items_scored(tmp_path, eval_models):
    items = eval_models["items"]
    write_eval_items(tmp_path / "data" / "eval", items)
    params = eval_params(tmp_path, tasks=["tiny_pets"], limit=5)
    checkpoint = write_checkpoint(eval_models["random"], tmp_path / "models" / "m", eval_models["tokenizer_dir"],
                                  tokens_seen=10, milestone="m")
    scores = run_lm_eval(*load_checkpoint(checkpoint), build_taskset(params, tmp_path / "include"), params.eval)
    assert scores["tiny_pets"].n == 5


def test_task_yaml_reads_the_contract_fields(tmp_path):
    config = tiny_task_config("tiny_x", tmp_path / "tiny_x.jsonl")
    assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == ("query", "choices", "gold")
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "tiny_x.jsonl").resolve())
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]


@pytest.mark.parametrize("line, needle", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is not an index"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "expected {'query'"),
    ('{"query": "q", "choices": ["a", "b"]', "not valid JSON"),
])
def test_bad_items_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"query": "ok", "choices": ["a", "b"], "gold": 0}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=needle) as info:
        check_items(path)
    assert f"{path}:2" in str(info.value)


def test_unknown_task_and_missing_items_are_user_errors(tmp_path, eval_models):
    write_eval_items(tmp_path / "data" / "eval", eval_models["items"])
    with pytest.raises(UserError, match="unknown task 'tiny_colours'"):
        build_taskset(eval_params(tmp_path, tasks=["tiny_colors", "tiny_colours"]), tmp_path / "include")
    (tmp_path / "data" / "eval" / "tiny_pets.jsonl").unlink()
    with pytest.raises(UserError, match="tiny_pets.jsonl is missing"):
        build_taskset(eval_params(tmp_path, tasks=["tiny_pets"]), tmp_path / "include")
    with pytest.raises(UserError, match="listed twice"):
        build_taskset(eval_params(tmp_path, tasks=["tiny_colors", "tiny_colors"]), tmp_path / "include")


def test_checkpoint_without_weights_is_a_user_error(tmp_path, eval_models):
    checkpoint = write_checkpoint(eval_models["random"], tmp_path / "m", eval_models["tokenizer_dir"], 10, "m")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(UserError, match=f"checkpoint {checkpoint}: no weights"):
        load_checkpoint(checkpoint)
