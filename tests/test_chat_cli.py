"""`tinyllama chat`: a conversation that keeps its history, streamed replies equal to greedy
decoding of the rendered history, registry references, and bad input as one line + exit 2."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.chat import TEMPLATES, render, tokenize
from model.config import micro
from model.generate import generate
from model.hf import save_hf
from model.llama import Llama
from model.tokenizer import Tokenizer
from tasks.cli import main as cli

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(small_tokenizer_dir, tmp_path_factory):
    """(chat model dir, model, tokenizer): a random micro Llama exported with the zephyr template."""
    torch.manual_seed(5)
    model = Llama(micro()).eval()
    directory = save_hf(model, tmp_path_factory.mktemp("chat") / "model", small_tokenizer_dir,
                        chat_template=TEMPLATES["zephyr"].source)
    return directory, model, Tokenizer.load(directory)


def _greedy_reply(model, tokenizer, messages, n):
    prompt = list(tokenize(tokenizer, render(TEMPLATES["zephyr"].source, messages, add_generation_prompt=True)).ids)
    ids = generate(model, prompt, n, eos_id=tokenizer.eos_id)
    context = prompt[-4:]
    return tokenizer.decode(context + ids)[len(tokenizer.decode(context)):].strip()


def test_a_conversation_keeps_its_history(chat_model, monkeypatch, capsys):
    directory, model, tokenizer = chat_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where does Alice live?\nAnd her job?\n/reset\nAnd her job?\n"))
    assert cli(["chat", "--model", str(directory), "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    system = {"role": "system", "content": "Be brief."}
    first_question = {"role": "user", "content": "Where does Alice live?"}
    first = _greedy_reply(model, tokenizer, [system, first_question], 6)
    follow_up = {"role": "user", "content": "And her job?"}
    second = _greedy_reply(model, tokenizer, [system, first_question, {"role": "assistant", "content": first},
                                              follow_up], 6)
    fresh = _greedy_reply(model, tokenizer, [system, follow_up], 6)
    assert first and second != fresh  # the history changes the reply; /reset drops it
    assert capsys.readouterr().out.split("\n") == [first, second, fresh, ""]


def test_chat_with_the_registered_champion(chat_model, tmp_path):
    from mlflow import MlflowClient

    from tasks.registry import register_chat_model

    directory, model, tokenizer = chat_model
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("chat", artifact_location=(tmp_path / "a").as_uri()))
    register_chat_model(uri, "tinyllama-chat", run.info.run_id, directory, "sft/model", {"variant": "x"}, 0.5)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "TINYLLAMA_MODEL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "tinyllama"), "chat", "--model",
                             "models:/tinyllama-chat@champion", "--tracking-uri", uri, "--max-new-tokens", "5"],
                            input="Hello there\n", capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = _greedy_reply(model, tokenizer, [{"role": "user", "content": "Hello there"}], 5)
    assert result.stdout == expected + "\n"
    assert (tmp_path / "cache" / "tinyllama-chat" / "1" / "model.safetensors").is_file()


def test_bad_input_is_one_line_and_exit_2(chat_model, small_tokenizer_dir, tmp_path, capsys):
    directory, model, _ = chat_model
    base = save_hf(model, tmp_path / "base", small_tokenizer_dir)
    cases = [(["--model", str(base)], "--model: "),
             (["--model", str(base), "--template", "vicuna"], "--template: chat_template: unknown template 'vicuna'"),
             (["--model", "models:/tinyllama-chat@champion", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
              "model 'models:/tinyllama-chat@champion': no MLflow store at"),
             (["--model", str(directory), "--top-p", "0"], "--top-p: must be in (0, 1]")]
    for extra, message in cases:
        assert cli(["chat", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"tinyllama chat: error: {message}") and len(err.splitlines()) == 1, err
