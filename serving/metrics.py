"""Prometheus metrics through Ray Serve's metrics API: Ray exports them with every Serve metric
(its metrics agent's /metrics, `ray_` prefixed), tagged with deployment and replica, so a cluster's
Prometheus scrapes them with no extra endpoint here.

What an operator of an LLM server watches: requests running and waiting and the KV cache's use
(saturation), prompt and generated tokens (throughput), time to first token and time per output
token (latency the user feels), the speculative acceptance rate (whether the draft is paying for
itself), and the prompt cache's hits: of the prompt tokens queried, how many a free slot's KV held
already (vLLM's `prefix_cache_queries` / `prefix_cache_hits`, in tokens; their ratio is the hit rate).
Names follow vLLM's (`vllm:num_requests_running` ...) where the meaning is the same, under our own prefix:
`ray_tinyllama_num_requests_running` etc. once Ray exports them (counters get `_total`);
infra/grafana/tinyllama-serving.json charts them.
"""

from __future__ import annotations

from ray.serve import metrics

from model.decoder import BatchDecoder, Event
from serving.engine import Observer, Submitted

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def kv_cache_usage(decoder: BatchDecoder) -> float:
    """The fraction of the slot cache's positions that running sequences fill (vLLM: of its KV blocks)."""
    return sum(seq.filled for seq in decoder.running.values()) / (decoder.slots * decoder.max_len)


def serve_observer(decoder: BatchDecoder) -> Observer:
    """Metrics objects for this replica, fed by the engine thread (which alone touches `decoder`)."""
    running = metrics.Gauge("tinyllama_num_requests_running", description="sequences in the running batch")
    waiting = metrics.Gauge("tinyllama_num_requests_waiting", description="sequences waiting for a slot")
    kv_usage = metrics.Gauge("tinyllama_kv_cache_usage_perc",
                             description="fraction of the KV cache's positions in use (1 = full)")
    prompt_tokens = metrics.Counter("tinyllama_prompt_tokens", description="prompt tokens (cached ones included)")
    cache_queries = metrics.Counter("tinyllama_prefix_cache_queries",
                                    description="prompt tokens looked up in the prompt cache")
    cache_hits = metrics.Counter("tinyllama_prefix_cache_hits",
                                 description="prompt tokens whose KV the prompt cache held (not prefilled)")
    tokens = metrics.Counter("tinyllama_generation_tokens", description="completion tokens generated")
    ttft = metrics.Histogram("tinyllama_time_to_first_token_seconds", description="submission to first token",
                             boundaries=_LATENCY_BOUNDS)
    tpot = metrics.Histogram("tinyllama_time_per_output_token_seconds",
                             description="time per completion token after the first", boundaries=_LATENCY_BOUNDS)
    drafted = metrics.Counter("tinyllama_spec_drafted_tokens", description="speculative tokens proposed")
    accepted = metrics.Counter("tinyllama_spec_accepted_tokens", description="speculative tokens accepted")
    rate = metrics.Gauge("tinyllama_spec_acceptance_rate", description="accepted / drafted since start")
    totals = {"drafted": 0, "accepted": 0}

    def on_step(n_running: int, n_waiting: int) -> None:
        running.set(n_running)
        waiting.set(n_waiting)
        kv_usage.set(kv_cache_usage(decoder))

    def on_events(events: list[tuple[Submitted, Event]], now: float) -> None:
        step_tokens = step_prompt = step_cached = step_drafted = step_accepted = 0
        for request, event in events:
            if event.tokens:
                step_tokens += len(event.tokens)
                if request.last_token_at is None:
                    step_prompt += len(request.prompt)
                    step_cached += event.cached
                    ttft.observe(now - request.submitted_at)
                else:
                    tpot.observe((now - request.last_token_at) / len(event.tokens))
                request.last_token_at = now
            step_drafted += event.drafted
            step_accepted += event.accepted
        if step_tokens:
            tokens.inc(step_tokens)
        if step_prompt:
            prompt_tokens.inc(step_prompt)
            cache_queries.inc(step_prompt)
        if step_cached:
            cache_hits.inc(step_cached)
        if step_drafted:
            drafted.inc(step_drafted)
            totals["drafted"] += step_drafted
            if step_accepted:
                accepted.inc(step_accepted)
                totals["accepted"] += step_accepted
            rate.set(totals["accepted"] / totals["drafted"])

    return Observer(on_step, on_events)
