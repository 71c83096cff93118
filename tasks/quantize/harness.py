"""The milestones' lm-eval suite on any engine (ours fp32/bf16/int8, llama.cpp on a GGUF).

`EngineLM` is an lm-eval `TemplateLM`: lm-eval's own request building and `_encode_pair` split, the
tokenizer of the source dir and BOS first exactly as the milestone evals' `HFLM(add_bos_token=True)`
does, and the continuation's log-likelihood read from the engine's logits. So a quantized type's
score differs from fp32's only by what its engine computes. The suites are multiple-choice
(log-likelihood) tasks; generation and rolling perplexity are not offered.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.evaluate.harness import score_lm
from tasks.evaluate.tasksets import TaskSet
from tasks.params import EvalParams


def _engine_lm_class():
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix

    class EngineLM(TemplateLM):
        def __init__(self, engine, tokenizer):
            super().__init__()
            self.engine, self.tokenizer = engine, tokenizer
            self.max_length = engine.n_ctx

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return self.tokenizer.bos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            add = True if add_special_tokens is None else add_special_tokens
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.bos_token):
                add = False
            return self.tokenizer.encode(string, add_special_tokens=add)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = []
            for _, context, continuation in requests:
                inputs = (context + continuation)[-(self.max_length + 1):][:-1]
                logits = self.engine.logits(inputs)[-len(continuation):]
                logp = torch.log_softmax(logits.double(), dim=-1)
                target = torch.tensor(continuation)
                total = float(logp.gather(1, target[:, None]).sum())
                results.append((total, bool((logp.argmax(-1) == target).all())))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("quantize evals run log-likelihood (multiple-choice) tasks only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("quantize evals run log-likelihood (multiple-choice) tasks only")

    return EngineLM


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def eval_scores(engine, tokenizer, taskset: TaskSet, settings: EvalParams) -> dict:
    """{"scores": {task: TaskScore dict}, "avg"} with the milestones' tasks and settings."""
    scores = score_lm(_engine_lm_class()(engine, tokenizer), taskset, settings)
    return {"scores": {name: score.to_dict() for name, score in scores.items()},
            "avg": sum(score.value for score in scores.values()) / len(scores)}
