"""The sft and dpo stages on the real tiny pipeline (the shared `pipeline_repo` run: every dvc.yaml
stage through `dvc repro` on a clean copy of the repo): chat models that answer questions in held-out
wordings better after SFT and not worse after DPO, the EVAL-style table, MLflow runs and the registry
with its champion, `tinyllama chat` with the champion, transformers reading the chat dirs, and bad input failing before
any training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_repo import clone_workspace, dvc, env_for, run

pytestmark = pytest.mark.slow


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def _client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def test_chat_accuracy_on_held_out_wordings_rises_from_base_to_sft_and_dpo_does_not_lower_it(pipeline_repo):
    from tasks.sft.intervals import paired

    root = pipeline_repo.root
    variants = _params(root)["sft"]["variants"]
    sft, dpo = _metrics(root, "sft"), _metrics(root, "dpo")
    assert len(variants) >= 2 and len({v["base"] for v in variants}) >= 2 and any(v.get("dpo") for v in variants)
    for variant in variants:
        entry = sft[variant["name"]]
        print(f"\n{variant['name']} (base {variant['base']}): held-out chat accuracy base "
              f"{entry['base']['chat_accuracy']:.3f} → SFT {entry['sft']['chat_accuracy']:.3f}"
              + (f" → SFT+DPO {dpo[variant['name']]['dpo']['chat_accuracy']:.3f}" if variant.get("dpo") else ""))
        columns = entry["sft"]["chat"]
        assert {"seen", "held-out", "multi-turn"} <= set(columns) and columns["held-out"]["n"] >= 200
        assert entry["sft"]["chat_accuracy"] == columns["held-out"]["accuracy"]
        assert columns["held-out"]["ci95"][0] > entry["base"]["chat"]["held-out"]["ci95"][1]
        if variant.get("dpo"):
            after = dpo[variant["name"]]["dpo"]["chat"]["held-out"]
            assert paired(columns["held-out"]["answers"], after["answers"])["ci95"][1] >= 0  # not significantly worse
    print("stage wall s:", {k: v for k, v in pipeline_repo.stage_seconds.items() if k in ("sft", "dpo")})


def test_chat_models_carry_their_template_and_the_table_has_every_row(pipeline_repo):
    from transformers import AutoTokenizer

    from model.chat import TEMPLATES, render

    root = pipeline_repo.root
    variants = _params(root)["sft"]["variants"]
    messages = [{"role": "user", "content": "Where does Alice live?"}]
    for variant in variants:
        dirs = [root / "models" / "sft" / variant["name"]]
        dirs += [root / "models" / "dpo" / variant["name"]] if variant.get("dpo") else []
        for directory in dirs:
            hf = AutoTokenizer.from_pretrained(str(directory))
            expected = render(TEMPLATES[variant["template"]].source, messages, add_generation_prompt=True).text
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
            meta = json.loads((directory / "config.json").read_text())["tinyllama"]
            assert meta["variant"] == variant["name"] and meta["base_milestone"] == variant["base"]
    table = (root / "metrics" / "chat_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| chat") and line.split(" | ")[2] in
            ("base", "SFT", "SFT+DPO")]
    assert len(rows) == sum(3 if v.get("dpo") else 2 for v in variants)
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


def test_mlflow_runs_and_registry_with_the_champion(pipeline_repo):
    root = pipeline_repo.root
    client, _ = _client(root)
    name = _params(root)["sft"]["registered_model"]
    sft, dpo = _metrics(root, "sft"), _metrics(root, "dpo")
    pretrain_run = _metrics(root, "pretrain")["mlflow_run_id"]
    versions = client.search_model_versions(f"name = '{name}'")
    expected = len(sft) + len(dpo)
    assert len(versions) == expected
    accuracies = {}
    for version in versions:
        tags = version.tags
        expected_tags = {"variant", "base_milestone", "tokens", "template", "dvc_stage_hash", "heldout_chat_accuracy"}
        assert expected_tags <= set(tags)
        assert len(tags["dvc_stage_hash"]) == 64  # the stage ran under `dvc repro`
        accuracies[str(version.version)] = float(tags["heldout_chat_accuracy"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert accuracies[str(champion.version)] == max(accuracies.values())

    for entry in sft.values():
        run = client.get_run(entry["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == pretrain_run and run.info.status == "FINISHED"
        for key in ("base/chat_accuracy", "sft/chat_accuracy", "sft/chat/held-out/ci95_low", "sft/chat/seen/accuracy",
                    "sft/eval/avg", "sft/loss"):
            assert key in run.data.metrics, key
    for entry in dpo.values():
        dpo_runs = client.search_runs([run.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{entry['mlflow_run_id']}'")
        assert len(dpo_runs) == 1
        history = client.get_metric_history(dpo_runs[0].info.run_id, "rewards/accuracies")
        assert history and 0 <= history[-1].value <= 1
        margins = client.get_metric_history(dpo_runs[0].info.run_id, "rewards/margins")
        assert margins[-1].value > margins[0].value  # the policy moves away from the reference the right way


def test_tinyllama_chat_with_the_champion_answers_like_greedy_decoding(pipeline_repo, tmp_path, monkeypatch):
    from model.hf import load_hf, read_chat_template
    from model.tokenizer import Tokenizer
    from tasks.params import load_params
    from tasks.registry import resolve_model
    from tasks.sft.chat_accuracy import answer, eval_items

    root = pipeline_repo.root
    _, uri = _client(root)
    env = {**env_for(root), "TINYLLAMA_MODEL_CACHE": str(tmp_path / "cache")}
    item = next(i for i in eval_items(load_params(root / "params.yaml")) if len(i.messages) == 1)  # no system
    question = item.messages[-1]["content"]
    result = subprocess.run([str(root / ".venv" / "bin" / "tinyllama"), "chat", "--model",
                             "models:/tinyllama-chat@champion", "--max-new-tokens", "32"], cwd=root, env=env,
                            input=question + "\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("TINYLLAMA_MODEL_CACHE", str(tmp_path / "cache"))
    directory = resolve_model("models:/tinyllama-chat@champion", uri)  # what the CLI downloaded
    expected = answer(load_hf(directory), Tokenizer.load(directory), read_chat_template(directory), item.messages, 32)
    assert result.stdout.strip() == expected
    print(f"\nQ: {question}\nA (champion): {expected} (gold: {item.answer})")


def test_bad_input_fails_before_training_and_writes_nothing(pipeline_repo, tmp_path):
    root = clone_workspace(pipeline_repo.root, tmp_path / "bad", dvc_cache=False, runs=True)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 6
    rows += [{"messages": [{"role": "user", "content": "no answer"}]}] * 4
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted(p.name for p in (root / "checkpoints" / "sft").iterdir())
    cases = [("sources", [{"name": "file", "format": "messages", "uri": "chat.jsonl"}],
              "sft.variants[chat-1M].sources[file]: 4 of 10 rows are bad (40.0% > sft.max_bad_fraction 5.0%)"),
             ("base", "2M", "sft.variants[chat-1M].base: no milestone checkpoint at")]
    for key, value, message in cases:
        params = _params(root)
        params["sft"]["variants"][0][key] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = run(root, str(root / ".venv" / "bin" / "tinyllama"), "sft", "--params", "params.yaml", check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"tinyllama sft: error: {message}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (root / "checkpoints" / "sft").iterdir()) == before
