"""GET /metrics: Prometheus text (prometheus-client) under vLLM's metric names. Not behind
--ui-auth or --api-key: scrapers rarely carry credentials, and nothing here is private."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

router = APIRouter()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """One registry per app, so several servers in one process (tests) do not mix."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Sequences being decoded", label,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued or in prefill",
                             label, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use",
                              label, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", label,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", label,
                                         registry=r)
        self.requests = Counter("vllm:request_success", "Requests finished", label + [
            "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", label,
                              buckets=LATENCY_BUCKETS, registry=r)
        # Speculative tokens guessed (prompt lookup and a draft model) and confirmed: the
        # engine's lifetime counts, carried over at each scrape
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens",
                                    "Speculative tokens guessed", label, registry=r)
        self.accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens",
                                       "Speculative tokens confirmed", label, registry=r)
        self.counted = {"draft_tokens": 0, "draft_tokens_accepted": 0}
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output events",
                             label, buckets=LATENCY_BUCKETS, registry=r)


def of(request: Request) -> Metrics:
    app = request.app
    if not hasattr(app.state, "metrics"):
        app.state.metrics = Metrics()
    return app.state.metrics


class RequestTimer:
    """Times one request's output events and counts its tokens when it ends."""

    def __init__(self, metrics: Metrics, model: str):
        self.m, self.model = metrics, model
        self.start = self.last = time.monotonic()
        self.first = True

    def output(self) -> None:
        now = time.monotonic()
        if self.first:
            self.m.ttft.labels(self.model).observe(now - self.start)
            self.first = False
        else:
            self.m.itl.labels(self.model).observe(now - self.last)
        self.last = now

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.m.generation_tokens.labels(self.model).inc(completion_tokens)
        self.m.requests.labels(self.model, reason).inc()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    m, state = of(request), request.app.state.cake
    if state.text is not None:
        engine, model = state.text.engine, state.model_id
        stats = engine.stats()
        m.running.labels(model).set(stats["running"])
        m.waiting.labels(model).set(stats["waiting"] + stats["prefilling"])
        total = stats["kv_blocks_total"]
        m.kv_usage.labels(model).set(stats["kv_blocks_used"] / total if total else 0)
        for key, counter in (("draft_tokens", m.draft_tokens),
                             ("draft_tokens_accepted", m.accepted_tokens)):
            counter.labels(model).inc(max(0, stats[key] - m.counted[key]))
            m.counted[key] = max(m.counted[key], stats[key])
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
