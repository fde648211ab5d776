"""Prometheus metrics for `/metrics`: engine state read at scrape time, latencies as histograms.

Each app has its own registry, so several servers (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.scheduler
        kv = s.kv
        for name, doc, value in [
            ("llama4_requests_running", "Requests being decoded or prefilled", len(s.running)),
            ("llama4_requests_waiting", "Requests queued for a running slot", len(s.waiting) + self.engine.inbox.qsize()),
            ("llama4_kv_blocks_used", "KV blocks held by sequences", kv.used_blocks()),
            ("llama4_kv_blocks_cached", "KV blocks named in the prefix cache", kv.cached_blocks()),
            ("llama4_kv_blocks_total", "KV blocks in the pool", kv.num_blocks),
            ("llama4_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
             kv.hit_rate()),
            ("llama4_generation_tokens_per_second", "Generated tokens per second over the last 10 s",
             self.engine.tokens_per_second()),
            ("llama4_preemptions", "Requests preempted (recomputed later) since start", s.preempted),
        ]:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.requests = Counter("llama4_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("llama4_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llama4_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("llama4_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("llama4_time_per_output_token_seconds", "Mean gap between later tokens of a request",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("llama4_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=_LATENCY_BUCKETS)

    def finished(self, req) -> None:
        self.requests.labels(req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(req.prompt))
        self.generation_tokens.inc(len(req.generated))
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_arrival)
            if req.t_done is not None:
                self.e2e.observe(req.t_done - req.t_arrival)
                if len(req.generated) > 1:
                    self.tpot.observe((req.t_done - req.t_first) / (len(req.generated) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
