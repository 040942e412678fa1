"""Prometheus metrics on a per-server registry (tests run several servers in one process); metrics_http.py
serves it."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The server's counters, gauges and histograms, and the HTTP endpoint that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("rnnserve_live_sessions", "Live sessions", registry=r)
        self.gen_rows = Gauge("rnnserve_generating_sessions", "Sessions generating now", ["model"], registry=r)
        self.steps = Counter("rnnserve_steps", "Tokens pushed through models", ["model"], registry=r)
        self.tokens = Counter("rnnserve_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.batch = Histogram("rnnserve_batch_size", "Rows per onnxruntime step call", ["model"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("rnnserve_step_latency_seconds", "Seconds per batched onnxruntime call",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("rnnserve_errors", "Errors answered, by gRPC status code", ["code"], registry=r)
        self.nonfinite_rows = Counter("rnnserve_nonfinite_rows", "Session steps refused because the model "
                                      "gave NaN or infinite values (the session kept its state)", ["model"],
                                      registry=r)
        self.prefix_hits = Counter("rnnserve_prefix_cache_hits", "First feeds that started from a cached prefix "
                                   "state", registry=r)
        self.prefix_misses = Counter("rnnserve_prefix_cache_misses", "First feeds with no cached prefix", registry=r)
        self.prefix_tokens = Gauge("rnnserve_prefix_cache_tokens_saved", "Tokens not fed thanks to the cache",
                                   registry=r)
        self.prefix_bytes = Gauge("rnnserve_prefix_cache_bytes", "Memory the prefix cache holds", registry=r)
        self.broken = Gauge("rnnserve_broken_versions", "Version folders that failed to load (see the log)",
                            registry=r)
        self._children: dict[str, tuple] = {}

    def live_sessions(self, n: int) -> None:
        """Set the live session gauge."""
        self.sessions.set(n)

    def generating(self, model: str, n: int) -> None:
        """Set the generating rows gauge of a model version."""
        self.gen_rows.labels(model).set(n)

    def observe_batch(self, model: str, rows: int, seconds: float, steps: int, generated: int) -> None:
        """Record one batcher iteration."""
        c = self._children.get(model)
        if c is None:
            c = self._children[model] = (self.batch.labels(model), self.latency.labels(model),
                                         self.steps.labels(model), self.tokens.labels(model))
        if rows:
            c[0].observe(rows)
        c[1].observe(seconds)
        c[2].inc(steps)
        if generated:
            c[3].inc(generated)

    def nonfinite(self, model: str, rows: int) -> None:
        """Count rows whose step gave non-finite values."""
        self.nonfinite_rows.labels(model).inc(rows)

    def prefix_cache(self, hit: bool, nbytes: int, saved: int) -> None:
        """Record one prefix-cache lookup and the cache's size."""
        (self.prefix_hits if hit else self.prefix_misses).inc()
        self.prefix_bytes.set(nbytes)
        self.prefix_tokens.set(saved)

    def broken_versions(self, n: int) -> None:
        """Set the number of version folders the last scan could not load."""
        self.broken.set(n)

    def error(self, code_name: str) -> None:
        """Count an error answered with this status code name."""
        self.errors.labels(code_name).inc()
