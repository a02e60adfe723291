"""Prometheus metrics for GET /metrics, named like vLLM's (`vllm:x` here is `mlx_loom:x`).

Request-side series (tokens, finish reasons, TTFT, inter-token latency, end-to-end latency)
are observed by mlx_loom/server/output.py as each choice's engine outputs reach the server. Engine-side
series (running/waiting requests, KV blocks, preemptions, prefix cache) and the admission
rejections are read at scrape time. Each app owns its CollectorRegistry (never the global
default), so several apps in one process do not clash.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mlx_loom.engine.messages import EngineStats, RequestOutput

PREFIX = "mlx_loom:"

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))  # 1 .. 500k


class ServerMetrics:
    """The registry of one app and its request-side metric objects."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._scrape = _ScrapeTime()
        self.registry.register(self._scrape)
        disable_created_metrics()  # process-wide: the *_created series only add noise (Prometheus sees resets)
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of engine requests "
                                     "(each of n choices counts its prompt).", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished engine requests (one per choice) by "
                                       "finish reason: stop, length, abort (client gone), error.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Submission to the engine until the first "
                              "token reaches the server.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between consecutive token outputs of "
                             "one request, as the server receives them.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Submission to the engine until the request "
                             "ended.", buckets=E2E_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram(f"{PREFIX}request_prompt_tokens", "Prompt tokens per finished "
                                               "request.", buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(f"{PREFIX}request_generation_tokens", "Generated tokens per "
                                                   "finished request.", buckets=TOKEN_BUCKETS, registry=r)

    def choice(self) -> ChoiceTracker:
        """A tracker for one choice (engine request), started now: call just before submitting it."""
        return ChoiceTracker(self)

    def render(self, stats: EngineStats | None, rejected: Mapping[str, int]) -> tuple[bytes, str]:
        """One scrape: the body and its content type (always the classic text format, version 0.0.4)."""
        # No OpenMetrics negotiation: prometheus_client's encoder turns ':' into '_' in sample names but
        # not in HELP/TYPE (client_python#1177). No await below, so concurrent scrapes cannot interleave.
        self._scrape.families = [*engine_families(stats), rejected_family(rejected)]
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


class ChoiceTracker:
    """One choice from submission to its end: tokens, TTFT, inter-token gaps, e2e, finish reason."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.num_prompt = 0
        self.num_generated = 0
        self.ended = False

    def output(self, out: RequestOutput) -> None:
        """Observe one engine delta at the moment the server receives it."""
        if not self.num_prompt and out.num_prompt_tokens:
            self.num_prompt = out.num_prompt_tokens
            self.m.prompt_tokens.inc(self.num_prompt)
        n = len(out.new_token_ids)
        if not n:
            return
        now = time.perf_counter()
        if self.num_generated:
            self.m.itl.observe(now - self.last)
        else:
            self.m.ttft.observe(now - self.start)
        self.last = now
        self.num_generated += n
        self.m.generation_tokens.inc(n)

    def end(self, finish_reason: str | None) -> None:
        """Count the request once; None: refused at admission, never served (not counted)."""
        if finish_reason is None or self.ended:
            return
        self.ended = True
        self.m.request_success.labels(finished_reason=finish_reason).inc()
        self.m.e2e.observe(time.perf_counter() - self.start)
        self.m.request_prompt_tokens.observe(self.num_prompt)
        self.m.request_generation_tokens.observe(self.num_generated)


class _ScrapeTime:
    """A collector of families computed at scrape time (set by ServerMetrics.render)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


def engine_families(stats: EngineStats | None) -> list[Metric]:
    """Engine gauges and counters; none while the model loads (no stats yet)."""
    if stats is None:
        return []
    total, free = stats.num_blocks_total, stats.num_blocks_free
    hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
    return [
        _gauge("num_requests_running", "Requests in the running batch.", stats.num_running),
        _gauge("num_requests_waiting", "Requests waiting for a batch slot (preempted ones included).",
               stats.num_waiting),
        _gauge("kv_cache_usage_perc", "Fraction of KV blocks held by requests (0..1; cached, evictable "
               "blocks count as free).", 1.0 - free / total if total else 0.0),
        _gauge("num_kv_blocks_free", "KV blocks nobody holds (cached, evictable ones included).", free),
        _gauge("num_kv_blocks_total", "KV blocks in the pool.", total),
        _gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start.", hit_rate),
        _counter("num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.",
                 stats.num_preemptions),
        _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
        _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        _counter("engine_steps", "Engine steps (batched forward passes) run.", stats.steps),
        _counter("sparse_prefill_chunks", "Prefill chunks whose attention ran sparse (--sparse-prefill).",
                 stats.sparse_prefill_chunks),
        _counter("sparse_prefill_tokens", "Prompt tokens prefilled with sparse attention.",
                 stats.sparse_prefill_tokens),
    ] + (spec_families(stats) if stats.spec_enabled else [])


def spec_families(stats: EngineStats) -> list[Metric]:
    """Speculative decoding (vLLM's names): level 1 = draft tokens verified by the target,
    level 2 = the second level's tokens verified by the draft."""
    drafted = CounterMetricFamily(f"{PREFIX}spec_decode_num_draft_tokens", "Draft tokens proposed, by level.",
                                  labels=["level"])
    accepted = CounterMetricFamily(f"{PREFIX}spec_decode_num_accepted_tokens", "Draft tokens accepted, by level.",
                                   labels=["level"])
    for level, (p, a) in enumerate(zip(stats.spec_proposed, stats.spec_accepted), start=1):
        drafted.add_metric([str(level)], p)
        accepted.add_metric([str(level)], a)
    l1 = stats.spec_accepted[0] if stats.spec_accepted else 0
    mean_len = 1.0 + l1 / stats.spec_num_drafts if stats.spec_num_drafts else 0.0
    return [
        _counter("spec_decode_num_drafts", "Speculative rows verified by the target.", stats.spec_num_drafts),
        drafted,
        accepted,
        _gauge("spec_decode_mean_accepted_length", "Tokens emitted per speculative row per target forward "
               "(accepted drafts + 1) since start.", mean_len),
    ]


def rejected_family(rejected: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(f"{PREFIX}request_rejected", "Requests refused at admission, by reason.",
                                 labels=["reason"])
    for reason, count in sorted(rejected.items()):
        family.add_metric([reason], count)
    return family


def metrics_of(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(PREFIX + name, doc, value=value)
