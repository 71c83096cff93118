"""model/generate.py and `tinyllama generate`: KV-cache decoding, sampling, stop handling,
speculative decoding (exactly the target's greedy output), and the CLI on an exported model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import micro
from model.generate import generate, generate_stream, sample, speculative_generate
from model.hf import save_hf
from model.llama import Llama
from tasks.cli import main as cli

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = [1, 17, 250, 31, 400, 9]


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_recomputing_everything(target):
    assert generate(target, PROMPT, max_new_tokens=30, eos_id=None) == _greedy_without_cache(target, PROMPT, 30)


def test_stream_yields_what_generate_returns(target):
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3, eos_id=None)
    assert list(generate_stream(target, PROMPT, **kwargs)) == generate(target, PROMPT, **kwargs)


def test_seeded_sampling_is_reproducible_and_seeds_differ(target):
    a = generate(target, PROMPT, max_new_tokens=20, temperature=1.0, seed=1, eos_id=None)
    b = generate(target, PROMPT, max_new_tokens=20, temperature=1.0, seed=1, eos_id=None)
    c = generate(target, PROMPT, max_new_tokens=20, temperature=1.0, seed=2, eos_id=None)
    assert a == b != c


def test_top_k_1_and_tiny_top_p_are_greedy(target):
    greedy = generate(target, PROMPT, max_new_tokens=15, eos_id=None)
    assert generate(target, PROMPT, max_new_tokens=15, temperature=1.5, top_k=1, seed=0, eos_id=None) == greedy
    assert generate(target, PROMPT, max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=0, eos_id=None) == greedy


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.tensor([sample(logits, 1.0, generator=generator) for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).float() / n
    assert (freq - logits.softmax(-1)).abs().max() < 0.03
    # top_k=2 renormalises over the two best; top_p=0.7 keeps the smallest prefix reaching 70%.
    top2 = torch.tensor([sample(logits, 1.0, top_k=2, generator=generator) for _ in range(n)])
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean() - logits[:2].softmax(-1)[0]) < 0.03
    nucleus = {sample(logits, 1.0, top_p=0.7, generator=generator) for _ in range(500)}
    assert nucleus == {0, 1}  # p = 0.56, 0.21, 0.13, ...: 0.56 < 0.7 <= 0.77


def test_eos_and_stop_sequences_end_generation_without_being_emitted(target):
    full = generate(target, PROMPT, max_new_tokens=12, eos_id=None)
    assert generate(target, PROMPT, max_new_tokens=12, eos_id=full[4]) == full[:full.index(full[4])]
    stopped = list(generate_stream(target, PROMPT, max_new_tokens=12, eos_id=None, stop=[full[5:7]]))
    assert stopped == full[:5]
    # A stop sequence that starts matching but then diverges releases the held-back tokens.
    near_miss = [full[5], (full[6] + 1) % 512]
    assert generate(target, PROMPT, max_new_tokens=12, eos_id=None, stop=[near_miss]) == full


def _short_context(model, max_seq_len=16):
    short = Llama(model.config.with_overrides(max_seq_len=max_seq_len)).eval()
    short.load_state_dict(model.state_dict())
    return short


def test_generation_stops_at_the_context_limit(target):
    out = generate(_short_context(target), PROMPT, max_new_tokens=50, eos_id=None)
    assert out == generate(target, PROMPT, max_new_tokens=16 - len(PROMPT), eos_id=None)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [1, 512]}, "prompt_ids: token id 512"),
])
def test_bad_generation_arguments_name_the_field(target, kwargs, field):
    args = {"prompt_ids": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=field):
        generate(target, **args)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_decoding_equals_target_greedy(target, draft, k):
    expected = generate(target, PROMPT, max_new_tokens=24, eos_id=None)
    stats = {}
    got = speculative_generate(target, draft, PROMPT, max_new_tokens=24, k=k, eos_id=None, stats=stats)
    assert got == expected
    assert stats["drafted"] > 0 and stats["target_passes"] <= 24


def test_speculative_with_a_partly_agreeing_draft(target):
    """A perturbed copy of the target agrees on some guesses and not others: both paths of the
    accept/rollback logic run, and the output is still exactly the target's."""
    noisy = Llama(target.config).eval()
    noisy.load_state_dict(target.state_dict())
    torch.manual_seed(12)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    stats = {}
    got = speculative_generate(target, noisy, PROMPT, max_new_tokens=30, k=4, eos_id=None, stats=stats)
    assert got == generate(target, PROMPT, max_new_tokens=30, eos_id=None)
    assert 0 < stats["accepted"] < stats["drafted"]


def test_speculative_with_itself_as_draft_accepts_every_guess(target):
    stats = {}
    got = speculative_generate(target, target, PROMPT, max_new_tokens=25, k=4, eos_id=None, stats=stats)
    assert got == generate(target, PROMPT, max_new_tokens=25, eos_id=None)
    assert stats["accepted"] == stats["drafted"] > 0
    assert stats["target_passes"] == 1 + -(-(25 - 1) // 5)  # prefill, then 4 guesses + 1 per pass


def test_speculative_respects_eos_stop_and_context(target, draft):
    full = generate(target, PROMPT, max_new_tokens=12, eos_id=None)
    assert speculative_generate(target, draft, PROMPT, 12, k=3, eos_id=full[6]) == \
        generate(target, PROMPT, 12, eos_id=full[6])
    assert speculative_generate(target, draft, PROMPT, 12, k=3, eos_id=None, stop=[full[3:5]]) == full[:3]
    short_target, short_draft = _short_context(target), _short_context(draft)
    assert speculative_generate(short_target, short_draft, PROMPT, 50, k=4, eos_id=None) == \
        generate(target, PROMPT, 16 - len(PROMPT), eos_id=None)


def test_speculative_refuses_a_draft_with_another_vocabulary(target):
    other = Llama(micro().with_overrides(vocab_size=600))
    with pytest.raises(ValueError, match="draft vocab_size"):
        speculative_generate(target, other, PROMPT, 5)


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def checkpoint(tmp_path, small_tokenizer_dir, target, draft):
    """(model dir, draft dir, tokenizer): the module's random models exported with a real tokenizer."""
    from model.tokenizer import Tokenizer

    save_hf(target, tmp_path / "model", tokenizer_dir=small_tokenizer_dir)
    save_hf(draft, tmp_path / "draft", tokenizer_dir=small_tokenizer_dir)
    return tmp_path / "model", tmp_path / "draft", Tokenizer.load(small_tokenizer_dir)


def test_cli_prints_prompt_and_the_greedy_completion(checkpoint, target, capsys):
    model_dir, draft_dir, tokenizer = checkpoint
    prompt = "def add(a, b):"
    ids = tokenizer.encode(prompt, bos=True)
    completion = generate(target, ids, max_new_tokens=16, eos_id=tokenizer.eos_id)
    expected = prompt + tokenizer.decode(ids + completion)[len(tokenizer.decode(ids)):] + "\n"

    assert cli(["generate", "--model", str(model_dir), "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == expected
    assert cli(["generate", "--model", str(model_dir), "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "16", "--draft", str(draft_dir), "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == expected


def test_cli_sampling_is_reproducible_with_a_seed(checkpoint, capsys):
    model_dir = str(checkpoint[0])
    args = ["generate", "--model", model_dir, "--prompt", "The river", "--seed", "7", "--max-new-tokens", "12"]
    outputs = []
    for _ in range(2):
        assert cli(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("The river")


def test_cli_console_script_runs(checkpoint):
    script = Path(sys.executable).parent / "tinyllama"
    if not script.exists():
        pytest.skip("the tinyllama console script is not installed in this interpreter's venv")
    result = subprocess.run([str(script), "generate", "--model", str(checkpoint[0]), "--prompt", "x = 1",
                             "--temperature", "0", "--max-new-tokens", "4"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("x = 1")


def test_cli_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    model_dir, draft_dir, _ = checkpoint
    cases = [
        (["--model", str(tmp_path / "nope")], "--model: not a directory"),
        (["--model", str(model_dir), "--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
        (["--model", str(model_dir), "--draft", str(draft_dir)], "--temperature: speculative decoding"),
    ]
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text((model_dir / "config.json").read_text())
    cases.append((["--model", str(tmp_path / "weightless")], "model.safetensors: missing"))
    save_hf(Llama(micro()), tmp_path / "no-tokenizer")
    cases.append((["--model", str(tmp_path / "no-tokenizer")], "tokenizer.model not found"))
    save_hf(Llama(micro().with_overrides(vocab_size=300)), tmp_path / "small-vocab", tokenizer_dir=model_dir)
    cases.append((["--model", str(tmp_path / "small-vocab")],
                  "tokenizer vocab_size 512 exceeds the model's vocab_size 300"))
    for extra, message in cases:
        assert cli(["generate", "--prompt", "hi", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

