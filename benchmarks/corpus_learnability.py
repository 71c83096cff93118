"""Does a tiny Llama learn the built-in corpus? Train single-process and score the held-out items per milestone.

Why it exists: the tiny profile promises a visible scaling trajectory (eval scores rising across the
100K/250K/500K/1M-token milestones). This script checks that promise for the corpus alone, without
Ray/DVC/lm-eval in the loop, so corpus changes can be judged in minutes:

    .venv/bin/python benchmarks/corpus_learnability.py [--params params.yaml] [--out result.json]

It reads the corpus sizes, model preset, optimizer and milestones from the params file; trains a
SentencePiece BPE (Llama 2 settings) on the corpus; packs BOS-separated documents into
`seq_len + 1`-token rows per part; draws each batch row from the text part with probability equal
to its source weight (7:3); trains `model.llama.Llama` with AdamW + warmup/cosine; and at every
milestone scores each item like lm-eval does (sum of log-likelihoods of `" " + choice` after the
query → acc; divided by the choice's length in characters → acc_norm). The pass line is the
tiny profile's target: last-milestone average ≥ first + 10 points and ≥ chance + 10 points.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.llama import Llama  # noqa: E402
from tasks.data.corpus import EvalTask, build_corpus  # noqa: E402
from tasks.data.corpus.vocab import RELATION_BY_NAME, cloze_query, is_cloze  # noqa: E402
from tasks.data.corpus.world import make_world  # noqa: E402
from tasks.params import format_tokens, load_params  # noqa: E402

BOS = 1


def train_tokenizer(documents: list[str], vocab_size: int, workdir: Path) -> spm.SentencePieceProcessor:
    """SentencePiece BPE with Llama 2's trainer settings, whole documents as sentences.

    Whole documents (not lines) so pieces may hold a newline (`)\n#`): code then costs ~25% fewer tokens.
    """
    prefix = workdir / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        max_sentence_length=1 << 16,
        character_coverage=1.0, split_digits=True, byte_fallback=True, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def pack(tok: spm.SentencePieceProcessor, documents: list[str], row_len: int) -> torch.Tensor:
    """BOS before every document, cut into rows of `row_len`, the partial last row dropped."""
    stream = []
    for ids in tok.encode(documents):
        stream.append(BOS)
        stream.extend(ids)
    rows = len(stream) // row_len
    return torch.tensor(stream[: rows * row_len], dtype=torch.long).view(rows, row_len)


class Mixer:
    """Batches whose rows come from each part with probability = its weight; each part reshuffled per epoch."""

    def __init__(self, parts: dict[str, torch.Tensor], weights: dict[str, float], seed: int):
        self.parts, self.rng = parts, random.Random(seed)
        total = sum(weights.values())
        self.names = list(parts)
        self.weights = [weights[name] / total for name in self.names]
        self.order = {name: [] for name in self.names}

    def _next_row(self, name: str) -> torch.Tensor:
        if not self.order[name]:
            self.order[name] = list(range(len(self.parts[name])))
            self.rng.shuffle(self.order[name])
        return self.parts[name][self.order[name].pop()]

    def batch(self, rows: int) -> torch.Tensor:
        return torch.stack([self._next_row(self.rng.choices(self.names, self.weights)[0]) for _ in range(rows)])


def lr_at(step: int, total: int, train) -> float:
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _requests(tok, tasks) -> list[tuple[str, int, list[int], list[int]]]:
    """(task, item index, context ids, continuation ids) per choice, split the way lm-eval splits."""
    requests = []
    for name, task in tasks.items():
        for index, item in enumerate(task.items):
            context = [BOS] + tok.encode(item["query"])
            for choice in item["choices"]:
                whole = [BOS] + tok.encode(item["query"] + " " + choice)
                requests.append((name, index, whole[: len(context)], whole[len(context):]))
    return requests


@torch.no_grad()
def score(model: Llama, requests, tasks, batch_size: int = 64) -> dict[str, dict[str, float]]:
    model.eval()
    loglik = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        seqs = [ctx + cont for _, _, ctx, cont in chunk]
        width = max(len(s) for s in seqs) - 1
        inputs = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        logprobs = F.log_softmax(model(inputs).float(), dim=-1)
        for row, (_, _, ctx, cont) in enumerate(chunk):
            positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
            loglik.append(logprobs[row, positions, torch.tensor(cont)].sum().item())
    model.train()
    results, cursor = {}, 0
    for name, task in tasks.items():
        hits = hits_norm = 0
        for item in task.items:
            lls = loglik[cursor: cursor + len(item["choices"])]
            cursor += len(item["choices"])
            norm = [ll / len(choice) for ll, choice in zip(lls, item["choices"])]
            hits += max(range(len(lls)), key=lls.__getitem__) == item["gold"]
            hits_norm += max(range(len(norm)), key=norm.__getitem__) == item["gold"]
        results[name] = {"acc": hits / len(task.items), "acc_norm": hits_norm / len(task.items)}
    return results


def seen_facts(seed: int, entities: int) -> EvalTask:
    """Diagnostic upper bound, not a pipeline task: the tiny_facts facts asked in a phrasing that
    training *does* use for that person (so these items are in the training text verbatim)."""
    world, rng = make_world(seed, entities), random.Random(seed)
    items = []
    for index, (person, relation) in enumerate(world.holdout.fact_phrasing):
        who, values = world.people[person], RELATION_BY_NAME[relation].values
        phrasing = rng.choice([t for t in world.phrasings(person, relation, questions=False) if is_cloze(t)])
        gold = who.value(relation)
        choices = rng.sample([v for v in values if v != gold], 3)
        choices.insert(index % 4, gold)
        items.append({"query": cloze_query(phrasing, who.name), "choices": choices, "gold": index % 4})
    return EvalTask("diagnostic: facts in a phrasing seen for that person", 0.25, items)


def run(params_path: str, threads: int, batch_tokens: int | None = None, lr: float | None = None) -> dict:
    torch.set_num_threads(threads)
    params = load_params(params_path)
    data, train = params.data, params.train
    if batch_tokens:
        train = train.model_copy(update={"global_batch_tokens": batch_tokens})
    if lr:
        train = train.model_copy(update={"lr": lr, "min_lr": lr / 10})
    started = time.perf_counter()
    corpus = build_corpus(data.builtin.seed, data.builtin.entities, data.builtin.programs)
    parts_docs = {"text": corpus.text_documents, "code": corpus.code_documents}
    weights = {s.builtin_part: s.weight for s in data.sources if s.format == "builtin"}
    with tempfile.TemporaryDirectory() as workdir:
        tok = train_tokenizer(corpus.text_documents + corpus.code_documents, params.tokenizer.vocab_size, Path(workdir))
    parts = {name: pack(tok, docs, data.seq_len + 1) for name, docs in parts_docs.items()}
    prep_s = time.perf_counter() - started
    print(f"corpus + tokenizer + packing: {prep_s:.1f}s; "
          + ", ".join(f"{name}: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.2f} MB, {rows.numel()} tokens"
                      for (name, docs), rows in zip(parts_docs.items(), parts.values())), flush=True)

    torch.manual_seed(params.seed)
    config = params.model.build_config(tok.vocab_size())
    model = Llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, eps=train.eps,
                                  weight_decay=train.weight_decay)
    rows_per_step = train.global_batch_tokens // data.seq_len
    total_steps = math.ceil(train.total_tokens / train.global_batch_tokens)
    milestones = list(train.milestones)
    mixer = Mixer(parts, weights, params.seed)
    tasks = {**corpus.eval_tasks, "diag_seen_facts": seen_facts(data.builtin.seed, data.builtin.entities)}
    requests = _requests(tok, tasks)
    report = {"params": params_path, "model_params": config.num_params(),
              "batch_tokens": train.global_batch_tokens, "lr": train.lr, "milestones": {}}
    train_s = 0.0
    for step in range(total_steps):
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, train)
        loss = model.loss(mixer.batch(rows_per_step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        train_s += time.perf_counter() - tick
        tokens = (step + 1) * train.global_batch_tokens
        if milestones and tokens >= milestones[0]:
            label = format_tokens(milestones.pop(0))
            scores = score(model, requests, tasks)
            avg = sum(scores[name]["acc_norm"] for name in corpus.eval_tasks) / len(corpus.eval_tasks)
            report["milestones"][label] = {"tokens": tokens, "loss": loss.item(), "scores": scores, "avg_acc_norm": avg}
            print(f"{label:>5} tokens={tokens} loss={loss.item():.3f} train={train_s:.0f}s avg_acc_norm={avg:.3f} "
                  + " ".join(f"{n}={s['acc']:.3f}/{s['acc_norm']:.3f}" for n, s in scores.items()), flush=True)
    averages = [m["avg_acc_norm"] for m in report["milestones"].values()]
    chance = max(task.chance for task in corpus.eval_tasks.values())
    report["passed"] = averages[-1] >= averages[0] + 0.10 and averages[-1] >= chance + 0.10
    report["tokens_per_s"] = total_steps * train.global_batch_tokens / train_s
    report["wall_s"] = time.perf_counter() - started
    print(f"first avg {averages[0]:.3f} → last {averages[-1]:.3f} (chance {chance:.2f}): "
          f"{'PASS' if report['passed'] else 'FAIL'}; {report['tokens_per_s']:.0f} train tok/s, "
          f"{report['wall_s']:.0f}s wall")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, help="override train.global_batch_tokens (tokens per step)")
    parser.add_argument("--lr", type=float, help="override train.lr (min_lr becomes lr / 10)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args()
    report = run(args.params, args.threads, args.batch_tokens, args.lr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
