"""The server's Prometheus metrics (`prometheus_client`), in a registry of its own so that
several servers can live in one process (tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from hf_cb.entrypoints.streams import RequestOutput

# Seconds; as vLLM's buckets, from a fast decode step to a long queue.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class _PrefixCacheCollector:
    """The engine's prefix-cache counters, read when scraped (they count in the engine)."""

    def __init__(self, online: Any):
        self.online = online

    def collect(self):
        queries, hits = self.online.prefix_cache_stats()
        yield CounterMetricFamily("hf_cb_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=queries)
        yield CounterMetricFamily("hf_cb_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=hits)


class Metrics:
    def __init__(self, online: Any):
        """``online``: the engine or the front end's client (``num_requests``, ``kv_cache_usage``)."""
        self.registry = r = CollectorRegistry()
        Gauge("hf_cb_num_requests_running", "Sequences in the running batch.", registry=r).set_function(
            lambda: online.num_requests()[0])
        Gauge("hf_cb_num_requests_waiting", "Sequences waiting to be scheduled.", registry=r).set_function(
            lambda: online.num_requests()[1])
        Gauge("hf_cb_kv_cache_usage_ratio", "Share of KV pages in use (0..1).", registry=r).set_function(
            online.kv_cache_usage)
        r.register(_PrefixCacheCollector(online))
        self.prompt_tokens = Counter("hf_cb_prompt_tokens", "Prompt tokens of the requests taken.", registry=r)
        self.generation_tokens = Counter("hf_cb_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("hf_cb_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hf_cb_inter_token_latency_seconds", "Between the steps giving a request's tokens.",
                             buckets=_ITL_BUCKETS, registry=r)

    def observe(self, out: RequestOutput) -> None:
        """Count one output's tokens and latencies."""
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
        if out.time_to_first_token is not None:
            self.ttft.observe(out.time_to_first_token)
        for gap in out.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
