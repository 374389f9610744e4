"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 -- re-exported for the route

TTFA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, engine=None):
        self.registry = r = CollectorRegistry()
        self.engine = engine
        self.ttfa = Histogram("misotts_time_to_first_audio_seconds", "Request received to first audio chunk made",
                              buckets=TTFA_BUCKETS, registry=r)
        self.frames = Counter("misotts_frames", "Audio frames (80 ms each) generated", registry=r)
        self.requests = Counter("misotts_requests", "Requests by route and outcome", ["route", "outcome"], registry=r)
        self.errors = Counter("misotts_errors", "Errors returned, by kind", ["kind"], registry=r)
        self.reused = Counter("misotts_prefix_reused_positions", "Prompt positions served from the prefix cache",
                              registry=r)
        self.computed = Counter("misotts_prefix_computed_positions", "Prompt positions prefilled", registry=r)
        # frames/s: rate(misotts_frames_total[1m]); the gauges below are read from the engine at scrape time
        self.queue = Gauge("misotts_queue_depth", "Requests waiting for a lane or KV blocks", registry=r)
        self.running = Gauge("misotts_running_requests", "Requests in the running batch", registry=r)
        self.blocks_used = Gauge("misotts_kv_blocks_in_use", "KV blocks held by requests", registry=r)
        self.blocks_total = Gauge("misotts_kv_blocks_total", "KV blocks in the pool", registry=r)

    def count_prefix(self, turn_stats) -> None:
        """Prompt positions reused / computed by a request's turns (GenerationStats each)."""
        self.reused.inc(sum(s.reused_positions for s in turn_stats))
        self.computed.inc(sum(s.computed_positions for s in turn_stats))

    def render(self) -> bytes:
        if self.engine is not None:
            s = self.engine.stats()
            self.queue.set(s["waiting"])
            self.running.set(s["running"])
            self.blocks_used.set(s["blocks_total"] - s["blocks_available"])
            self.blocks_total.set(s["blocks_total"])
        return generate_latest(self.registry)
