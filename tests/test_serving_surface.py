"""The OpenAI surface clients and evaluation harnesses use, over real HTTP (the official `openai` client
and raw requests) against one `tinyllama serve` for the module: logprobs (chat and legacy shapes),
`echo` with the prompt's logprobs, the legacy prompt forms, top_k / min_p / the three penalties, each
field good and bad; and lm-eval's own `local-completions` scoring the served model through the API
exactly as in-process scoring does.

Every number is checked against the model computed here with model/ directly (its full forward's
log-softmax), not against the server's own code. The server drafts by prompt lookup, so penalties and
logprobs are exercised on the speculative verify step too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import eval_items
from serving_server import API_KEY, serving

pytestmark = pytest.mark.slow

NAME = "surface"
MAX_TOP = 5
ATOL = 1e-4
PENALTIES = {"presence_penalty": -2.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2}  # repeat, then tire of it


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory):
    flags = ["--name", NAME, "--draft", "prompt-lookup", "--slots", "4", "--cpus", "2",
             "--max-top-logprobs", str(MAX_TOP)]
    with serving(served_model_dir, tmp_path_factory.mktemp("serve"), *flags) as server:
        yield server


def log_softmax(local, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row i is the model's raw log-distribution of the token after ids[:i + 1]."""
    with torch.no_grad():
        return local[0](torch.tensor([ids]))[0].log_softmax(-1)


def greedy(local, prompt: list[int], n: int, **penalties) -> list[int]:
    """The model's greedy tokens (EOS included if it ends there), on the engine in this process."""
    from model.decoder import BatchDecoder
    from model.sampling import Sampling

    decoder = BatchDecoder(local[0], slots=1)
    decoder.add(prompt, n, Sampling(logprobs=0, **penalties), local[1].eos_id)
    tokens = []
    while decoder.running:
        for event in decoder.step():
            tokens += [e.token for e in event.logprobs]
    return tokens


def text_of(local, token: int) -> str:
    return local[1].token_bytes(token).decode("utf-8", errors="replace")


def chat_ids(local, messages: list[dict]) -> list[int]:
    from model.chat import render, template

    return local[1].encode_chat(render(template("zephyr").source, messages, add_generation_prompt=True).text)[0]


def check_top(local, top: dict[str, float], row: torch.Tensor, n: int) -> None:
    """A legacy top_logprobs dict holds the n best tokens' texts with the model's values."""
    best = row.topk(n)
    for token, value in zip(best.indices.tolist(), best.values.tolist()):
        assert abs(top[text_of(local, token)] - value) < ATOL or \
            sum(text_of(local, t) == text_of(local, token) for t in best.indices.tolist()) > 1


def test_chat_logprobs_are_the_models_log_softmax_streamed_or_not(server, local):
    client = server.client()
    messages = [{"role": "user", "content": "Where does the river go?"}]
    prompt = chat_ids(local, messages)
    tokens = greedy(local, prompt, 10)
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(tokens)
    rows = log_softmax(local, prompt + tokens)[len(prompt) - 1:]
    for entry, token, row in zip(content, tokens, rows):
        assert bytes(entry.bytes) == local[1].token_bytes(token) and entry.token == text_of(local, token)
        assert abs(entry.logprob - float(row[token])) < ATOL
        best = row.topk(3)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [local[1].token_bytes(t) for t in best.indices.tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), best.values, atol=ATOL,
                                   rtol=0)
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, stream=True)
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.top_logprobs) for e in entries] == [(e.token, []) for e in content]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), torch.tensor([e.logprob for e in content]),
                               atol=ATOL, rtol=0)
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_gives_the_prompts_logprobs_then_the_completions(server, local):
    """A batch of token-id prompts with echo and logprobs=3 (what lm-eval sends, with more tokens): per
    choice, the prompt's text then the completion's, the first prompt token null, every other value the
    model's own, and the same again streamed."""
    prompts = [local[1].encode("The river flows past the old mill", bos=True), local[1].encode("def add(a, b):")]
    body = {"model": NAME, "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 4, "temperature": 0}
    code, reply = server.post("/v1/completions", json.dumps(body).encode())
    assert code == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, reply["choices"]):
        tokens = greedy(local, prompt, 4)
        logprobs = choice["logprobs"]
        completion = local[1].decode(prompt + tokens)[len(local[1].decode(prompt)):]
        assert choice["text"] == local[1].decode(prompt) + completion
        assert logprobs["tokens"] == [text_of(local, t) for t in prompt + tokens]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        rows = log_softmax(local, prompt + tokens)
        for i, token in enumerate(prompt + tokens):
            if i == 0:
                continue
            assert abs(logprobs["token_logprobs"][i] - float(rows[i - 1, token])) < ATOL
            top = logprobs["top_logprobs"][i]
            assert abs(top[text_of(local, token)] - logprobs["token_logprobs"][i]) < ATOL  # the token itself is in
            check_top(local, top, rows[i - 1], 3)
        offsets = logprobs["text_offset"]
        assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))

    streamed = server.client().completions.create(model=NAME, prompt=prompts[0], echo=True, logprobs=3,
                                                  max_tokens=4, temperature=0, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    first = reply["choices"][0]
    assert "".join(c.text for c in chunks) == first["text"]
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == first["logprobs"]["tokens"]
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == first["logprobs"]["text_offset"]


def test_the_four_prompt_forms_give_one_choice_per_prompt_in_order(server, local):
    client = server.client()
    texts = ["The river flows", "Once upon a time", "def add(a, b):"]
    ids = [local[1].encode(t, bos=True) for t in texts]
    expected = [local[1].decode(p + greedy(local, p, 6))[len(local[1].decode(p)):] for p in ids]
    kwargs = dict(model=NAME, max_tokens=6, temperature=0)
    assert client.completions.create(prompt=texts[0], **kwargs).choices[0].text == expected[0]
    assert client.completions.create(prompt=ids[1], **kwargs).choices[0].text == expected[1]
    for prompt in (texts, ids):
        reply = client.completions.create(prompt=prompt, **kwargs)
        assert [(c.index, c.text) for c in reply.choices] == list(enumerate(expected))
        assert reply.usage.prompt_tokens == sum(map(len, ids))
    twice = client.completions.create(prompt=ids[:2], n=2, **kwargs)
    assert [(c.index, c.text) for c in twice.choices] == list(enumerate([expected[0]] * 2 + [expected[1]] * 2))


def metric(server, name: str) -> float:
    """The sum over replicas of a counter Ray exports (0 before its first increment)."""
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " "))


def test_the_prompt_cache_reuses_a_shared_prefix_and_changes_no_output(server, local):
    """Two requests sharing a long prefix, one after the other: the second's tokens and logprobs are the
    model's own (computed here without any cache), and the reused tokens show in the hits counter."""
    import time

    hits = "ray_tinyllama_prefix_cache_hits_total"
    before = metric(server, hits)
    prefix = local[1].encode("The river flows past the old mill and the miller counts the sacks of grain " * 3,
                             bos=True)
    client = server.client()
    for n, question in enumerate((" Where does the river go?", " Who counts the sacks?")):
        prompt = prefix + local[1].encode(question)
        tokens = greedy(local, prompt, 6)
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
        if n:  # OpenAI's field for the reused prompt tokens (the first request may reuse an earlier test's BOS)
            assert reply.usage.prompt_tokens_details.cached_tokens >= len(prefix)
        logprobs = reply.choices[0].logprobs
        assert logprobs.tokens == [text_of(local, t) for t in tokens]
        rows = log_softmax(local, prompt + tokens)[len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(logprobs.token_logprobs),
                                   torch.stack([row[t] for row, t in zip(rows, tokens)]), atol=ATOL, rtol=0)
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while metric(server, hits) < before + len(prefix):
        assert time.monotonic() < deadline, f"{hits}: {metric(server, hits)}, expected >= {before + len(prefix)}"
        time.sleep(2)


def test_penalties_top_k_and_min_p_are_applied(server, local):
    client = server.client()
    prompt = "Item 3: the river and the mill and the river and the"
    ids = local[1].encode(prompt, bos=True)
    plain, penalized = greedy(local, ids, 24), greedy(local, ids, 24, **PENALTIES)
    assert plain != penalized  # the penalties change this answer
    as_text = [local[1].decode(ids + t)[len(local[1].decode(ids)):] for t in (plain, penalized)]
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, extra_body=PENALTIES)
    assert reply.choices[0].text == as_text[1]
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                         extra_body=PENALTIES)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == as_text[1]
    # sampling at temperature 1, but top_k=1 or min_p=1 leaves only the most likely token: the greedy text, every seed
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            sampled = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=1.0, seed=seed,
                                                extra_body=extra)
            assert sampled.choices[0].text == as_text[0], extra
    # and off (-1 / 0) or wide, they leave sampling as it was
    base = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=1.0, seed=5)
    free = client.completions.create(**base).choices[0].text
    assert free != as_text[0]
    for extra in ({"top_k": -1}, {"top_k": 0}, {"min_p": 0.0}):
        assert client.completions.create(**base, extra_body=extra).choices[0].text == free


BAD = [
    ("/v1/completions", {"top_k": -2}, "top_k", "must be -1 or 0 (off) or >= 1"),
    ("/v1/completions", {"top_k": 1.5}, "top_k", "integer"),
    ("/v1/completions", {"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ("/v1/completions", {"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ("/v1/completions", {"repetition_penalty": -1.0}, "repetition_penalty", "greater than 0"),
    ("/v1/completions", {"logprobs": MAX_TOP + 1}, "logprobs", f"at most {MAX_TOP}"),
    ("/v1/completions", {"logprobs": True}, "logprobs", "integer"),
    ("/v1/completions", {"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ("/v1/completions", {"echo": "yes"}, "echo", "boolean"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": MAX_TOP + 1}, "top_logprobs", f"at most {MAX_TOP}"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "only allowed when logprobs is true"),
    ("/v1/chat/completions", {"logprobs": 2}, "logprobs", "boolean"),
    ("/v1/completions", {"prompt": [[1, 5], [1, 100000]]}, "prompt", "token id 100000 of prompt 1 is outside"),
    ("/v1/completions", {"prompt": []}, "prompt", "a list of token-id lists"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "all strings or all token-id lists"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt", "prompt 1 is not a non-empty list"),
    ("/v1/completions", {"prompt": [1, -4]}, "prompt", "negative token id -4"),
    ("/v1/completions", {"prompt": [[1.5]]}, "prompt", "integer token ids"),
    ("/v1/completions", {"prompt": [1] * 300}, "prompt", "maximum context length is 256 tokens"),
]


@pytest.mark.parametrize("path, fields, param, message", BAD, ids=[f"{b[2]}={json.dumps(b[1])[:40]}" for b in BAD])
def test_bad_values_are_a_400_naming_the_field(server, path, fields, param, message):
    base = {"model": NAME, "max_tokens": 2}
    base.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    code, reply = server.post(path, json.dumps({**base, **fields}).encode())
    assert code == 400, reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply


def test_good_edge_values_are_accepted(server):
    client = server.client()
    for extra in ({"top_k": 100000}, {"min_p": 1.0}, {"presence_penalty": -2, "frequency_penalty": 2},
                  {"repetition_penalty": 0.5}, {"logprobs": 0, "echo": False}):
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body=extra).choices, extra
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           logprobs=True, top_logprobs=MAX_TOP)
    assert all(len(e.top_logprobs) == MAX_TOP for e in reply.choices[0].logprobs.content)


@pytest.mark.timeout(900)
def test_lm_eval_local_completions_scores_the_served_model_as_in_process(server, served_model_dir, tmp_path,
                                                                        monkeypatch):
    """lm-eval 0.4.13's own `simple_evaluate` with model `local-completions` (token-id prompts, echo,
    logprobs=1, max_tokens=1) on the tiny tasks' items: every item's log-likelihood equals in-process
    scoring (HFLM on the same dir, BOS first as the milestone evals add it) within 1e-3."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tasks.evaluate.harness import load_checkpoint
    from tasks.evaluate.lm_eval_tiny import write_tiny_task

    items = eval_items()
    for name, rows in items.items():
        write_tiny_task(name, "".join(json.dumps(r) + "\n" for r in rows).encode(), tmp_path)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its bearer key

    def evaluate(model, model_args=None) -> dict:
        output = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(items), task_manager=tasks,
                                         num_fewshot=0, log_samples=True, bootstrap_iters=0)
        return {(task, sample["doc_id"], i): resp[0][0] for task, samples in output["samples"].items()
                for sample in samples for i, resp in enumerate(sample["resps"])}

    model, tokenizer = load_checkpoint(served_model_dir)
    in_process = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=True, max_length=256))
    through_api = evaluate("local-completions", {
        "model": NAME, "base_url": f"{server.url}/v1/completions", "tokenizer": str(served_model_dir),
        "tokenizer_backend": "huggingface", "add_bos_token": True, "max_length": 256, "batch_size": 16,
        "max_retries": 1})
    assert set(through_api) == set(in_process) and len(in_process) == sum(len(r) * 4 for r in items.values())
    worst = max(abs(through_api[key] - in_process[key]) for key in in_process)
    print(f"\nlm-eval local-completions vs in-process: {len(in_process)} log-likelihoods, largest difference "
          f"{worst:.2e}")
    assert worst < 1e-3, worst


def _gate_inputs(served_model_dir, tmp_path, dtype: str = "fp32"):
    """(params, taskset, other): the deploy gate's settings for a `dtype` replica on the first 4 items of the
    fixture's two tasks, and a copy of the served weights whose final norm is scaled (weights not served)."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    from tasks.evaluate.lm_eval_tiny import write_tiny_task
    from tasks.evaluate.tasksets import TaskSet
    from tasks.params import parse_params

    items = eval_items()
    for name, rows in items.items():
        write_tiny_task(name, "".join(json.dumps(r) + "\n" for r in rows).encode(), tmp_path / "tasks")
    taskset = TaskSet(names=list(items), include_dir=tmp_path / "tasks", include_defaults=False)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["paths"] = {name: str(tmp_path / name) for name in ("data", "models", "metrics")}
    raw["deploy"]["gate"] = {"items": 4, "tolerance": 1e-3}
    raw["deploy"]["dtype"] = dtype
    other = tmp_path / "other-weights"
    shutil.copytree(served_model_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return parse_params(raw), taskset, other


@pytest.mark.timeout(600)
def test_the_deploy_gate_fails_when_the_served_weights_are_not_the_scored_ones(server, served_model_dir, tmp_path):
    """The deploy stage's gate (tasks/deploy/gate.py) against this server: scored in process on the served
    weights it passes; on a copy whose final norm is scaled (weights that were not served) it fails,
    naming the worst request. Both on the first 4 items of two tasks."""
    from tasks.deploy.gate import run_gate

    params, taskset, other = _gate_inputs(served_model_dir, tmp_path)

    def gate(model_dir):
        return run_gate(params, taskset, f"{server.url}/v1", API_KEY, NAME, model_dir, {})

    same = gate(served_model_dir)
    assert same["passed"] and same["requests"] == 4 * sum(len(rows[0]["choices"]) for rows in eval_items().values())
    assert same["max_abs_diff"] <= 1e-3 and same["scores"]["served"] == same["scores"]["in_process"]
    assert same["rounding_noise"] == 0 and same["allowed"] == 1e-3  # an fp32 replica: the tolerance alone
    assert same["recorded"] is None  # no pipeline metrics here to put beside the scores
    differ = gate(other)
    assert not differ["passed"] and differ["max_abs_diff"] > 1e-3 and differ["requests"] == same["requests"]
    assert differ["worst"] and differ["worst"] in differ["message"] and f"{differ['max_abs_diff']:.2e}" in \
        differ["message"]
    print(f"\ndeploy gate on this server: same weights {same['max_abs_diff']:.2e}, other weights "
          f"{differ['max_abs_diff']:.2e} at {differ['worst']}")


@pytest.mark.timeout(600)
def test_a_bf16_replica_passes_the_gate_within_its_rounding_and_other_weights_still_fail(served_model_dir,
                                                                                           tmp_path):
    """The GPU profile serves bf16 (`deploy.dtype`), scored against the fp32 numbers every stage recorded: its
    requests differ from them by bf16 rounding, more than the fp32 tolerance. The gate measures that rounding
    in process (the same weights in bf16) and allows it twice over: the bf16 replica passes, weights that were
    not served still fail."""
    from tasks.deploy.gate import NOISE_FACTOR, run_gate

    params, taskset, other = _gate_inputs(served_model_dir, tmp_path, dtype="bf16")
    (tmp_path / "serve").mkdir()
    with serving(served_model_dir, tmp_path / "serve", "--name", NAME, "--dtype", "bf16", "--slots", "4",
                 "--cpus", "2") as bf16_server:
        same, differ = (run_gate(params, taskset, f"{bf16_server.url}/v1", API_KEY, NAME, model_dir, {})
                        for model_dir in (served_model_dir, other))
    assert same["dtype"] == "bf16" and same["rounding_noise"] > 0
    assert same["allowed"] == pytest.approx(1e-3 + NOISE_FACTOR * same["rounding_noise"])
    assert same["passed"] and same["max_abs_diff"] <= same["allowed"], same["message"]
    assert not differ["passed"] and differ["max_abs_diff"] > differ["allowed"], differ["message"]
    print(f"\nbf16 replica: {same['max_abs_diff']:.2e} from fp32 (bf16 rounding in process "
          f"{same['rounding_noise']:.2e}, allowed {same['allowed']:.2e}); other weights {differ['max_abs_diff']:.2e}")
