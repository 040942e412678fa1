"""Prometheus metrics on a per-server registry (tests run several servers in one process); metrics_http.py
serves it.

Models are labelled `model` and `version` (Triton's labels). Recording stays off the per-token path: RPCs
are observed once per call (interceptors.py), the batcher once per iteration, a generation once at its first
chunk and once at its end, sessions at open, close and expiry. Gauges that are cheaper to read than to keep
(pending requests) are computed when /metrics is scraped.

Beside the registry, VersionStats keeps Triton's per-version inference statistics (the KServe
ModelStatistics RPC, server/kserve/statistics.py) in plain integers, fed by the same hooks.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .repository import ModelVersion
    from .sessions import Session

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
QUEUE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPOT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
MV = ("model", "version")

# The protocol of the call being served ("native", "kserve", ...), set per call by the interceptor; what a
# session is counted under when it opens.
PROTOCOL: ContextVar[str] = ContextVar("rnnserve_protocol", default="internal")
OTHER = "other"  # the method (and protocol) label of a call to a method this server does not know


class CallMetrics:
    """The request counter and duration histogram of one gRPC method, children cached per status code."""

    __slots__ = ("_by_code", "_metrics", "messages", "method", "protocol")

    def __init__(self, metrics: Metrics, protocol: str, method: str) -> None:
        self._metrics = metrics
        self.protocol = protocol
        self.method = method
        self._by_code: dict[str, tuple] = {}
        self.messages = metrics.stream_messages.labels(protocol, method)

    def done(self, code: str, seconds: float) -> None:
        """Record one call that ended with this status code name after `seconds`."""
        c = self._by_code.get(code)
        if c is None:
            m = self._metrics
            c = self._by_code[code] = (m.requests.labels(self.protocol, self.method, code),
                                       m.request_seconds.labels(self.protocol, self.method, code))
        c[0].inc()
        c[1].observe(seconds)


class VersionStats:
    """Triton's per-version inference statistics, kept in process (plain integers, nanoseconds): the KServe
    servicer counts requests, the batcher's hooks count executions, queue and compute time."""

    __slots__ = ("batches", "compute_ns", "executions", "fail", "fail_ns", "last_inference_ms", "queue_ns",
                 "queued", "success", "success_ns")

    def __init__(self) -> None:
        self.success = self.success_ns = self.fail = self.fail_ns = 0  # KServe requests, and their durations
        self.executions = self.compute_ns = 0  # batched onnxruntime calls, and their durations
        self.queue_ns = 0  # summed over executions: how long the oldest work of each waited to start
        self.queued = 0  # queue time observed but not yet given to an execution
        self.batches: dict[int, list[int]] = {}  # rows of a step call -> [calls, ns]
        self.last_inference_ms = 0  # wall clock of the last request, milliseconds since the epoch

    def request(self, ok: bool, ns: int) -> None:
        """One KServe request answered (ok) or refused, after ns nanoseconds."""
        if ok:
            self.success += 1
            self.success_ns += ns
        else:
            self.fail += 1
            self.fail_ns += ns
        self.last_inference_ms = time.time_ns() // 1_000_000


class _QueueTime:
    """What the batcher observes queue time on: the version's histogram and its statistics, together."""

    __slots__ = ("hist", "stats")

    def __init__(self, hist: Histogram, stats: VersionStats) -> None:
        self.hist, self.stats = hist, stats

    def observe(self, seconds: float) -> None:
        """Seconds the oldest work of the iteration starting now waited."""
        self.hist.observe(seconds)
        self.stats.queued += int(seconds * 1e9)


class _Pending(Collector):
    """rnnserve_pending_requests, read from the batchers at scrape time (nothing to keep up to date)."""

    def __init__(self, source: Callable[[], Iterable[tuple[ModelVersion, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("rnnserve_pending_requests", "Requests in a model version's batcher not answered "
                              "yet: single-token feeds waiting for their step, multi-token feeds queued or "
                              "between slices, generations not yet admitted", labels=list(MV))
        for mv, n in self.source():
            g.add_metric([mv.name, str(mv.version)], n)
        yield g


class Metrics:
    """The server's counters, gauges and histograms, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # the process (CPU, RSS, open fds), the interpreter and its garbage collector, as on the default registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # calls
        self.requests = Counter("rnnserve_requests", "gRPC calls answered, by protocol, method and final status "
                                "code (every code, UNIMPLEMENTED included); a stream counts once, when it ends",
                                ["protocol", "method", "code"], registry=r)
        self.request_seconds = Histogram("rnnserve_request_duration_seconds", "Seconds from a call's start to "
                                         "its status; a stream's whole life", ["protocol", "method", "code"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.stream_messages = Counter("rnnserve_stream_messages", "Request messages received on streams "
                                       "(the request rate of streaming calls)", ["protocol", "method"], registry=r)
        self.errors = Counter("rnnserve_errors", "Errors answered, by gRPC status code: calls' statuses and "
                              "errors answered inside streams", ["code"], registry=r)
        # sessions (native sessions and KServe sequences are both engine sessions)
        self.sessions = Gauge("rnnserve_live_sessions", "Live sessions (KServe sequences included)", MV,
                              registry=r)
        self.started = Counter("rnnserve_sequences_started", "Sessions opened (native Open, OpenSession, "
                               "ForkSession) and KServe sequences started (sequence_start)", [*MV, "protocol"],
                               registry=r)
        self.ended = Counter("rnnserve_sequences_ended", "Sessions closed and KServe sequences ended "
                             "(sequence_end, or a sequence_start that restarted a live id)", [*MV, "protocol"],
                             registry=r)
        self.expired = Counter("rnnserve_sequences_expired", "Sessions and sequences dropped after "
                               "--idle-timeout idle", [*MV, "protocol"], registry=r)
        # batching and generation
        self.queue = Histogram("rnnserve_queue_duration_seconds", "Per batcher iteration that starts queued "
                               "work: seconds its oldest feed or generation waited between entering the batcher "
                               "and the start of its execution (the direct path, taken when nothing else is "
                               "queued, waits for nothing and is not observed)", MV, buckets=QUEUE_BUCKETS,
                               registry=r)
        self.ttft = Histogram("rnnserve_time_to_first_token_seconds", "Seconds from a generate request to its "
                              "first chunk reaching the handler", MV, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("rnnserve_time_per_output_token_seconds", "Per generation of 2 tokens or more: "
                              "seconds from its first chunk to its last, divided by the tokens after the first "
                              "chunk", MV, buckets=TPOT_BUCKETS, registry=r)
        self.gen_rows = Gauge("rnnserve_generating_sessions", "Sessions generating now", MV, registry=r)
        self.steps = Counter("rnnserve_steps", "Tokens pushed through models", MV, registry=r)
        self.tokens = Counter("rnnserve_generated_tokens", "Tokens generated", MV, registry=r)
        self.batch = Histogram("rnnserve_batch_size", "Rows per onnxruntime step call", MV,
                               buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("rnnserve_step_latency_seconds", "Seconds per batched onnxruntime call",
                                 MV, buckets=LATENCY_BUCKETS, registry=r)
        self.nonfinite_rows = Counter("rnnserve_nonfinite_rows", "Session steps refused because the model "
                                      "gave NaN or infinite values (the session kept its state)", MV,
                                      registry=r)
        # caches and the repository
        self.prefix_hits = Counter("rnnserve_prefix_cache_hits", "First feeds that started from a cached prefix "
                                   "state", registry=r)
        self.prefix_misses = Counter("rnnserve_prefix_cache_misses", "First feeds with no cached prefix", registry=r)
        self.prefix_tokens = Gauge("rnnserve_prefix_cache_tokens_saved", "Tokens not fed thanks to the cache",
                                   registry=r)
        self.prefix_bytes = Gauge("rnnserve_prefix_cache_bytes", "Memory the prefix cache holds", registry=r)
        self.broken = Gauge("rnnserve_broken_versions", "Version folders that failed to load (see the log)",
                            registry=r)
        self._batch_children: dict[ModelVersion, tuple] = {}
        self.version_stats: dict[ModelVersion, VersionStats] = {}  # Triton's statistics, per loaded version
        self._session_children: dict[tuple[ModelVersion, str], tuple] = {}
        self._calls: dict[str, CallMetrics] = {}
        self._routes: dict[str, tuple[str, str]] = {}  # gRPC path -> (protocol, method)
        self._services: dict[str, str] = {}  # service -> protocol
        self._others: dict[str, CallMetrics] = {}  # protocol -> its undeclared methods' metrics

    # -- calls ------------------------------------------------------------------------------------------------
    def declare(self, services: dict[str, tuple[str, Iterable[str]]]) -> None:
        """The labels calls get: {service full name: (protocol, declared method names)}. A method a service
        does not declare is labelled method="other", a service not declared protocol="other" too (so a
        client cannot grow the label set)."""
        for service, (protocol, methods) in services.items():
            self._services[service] = protocol
            for m in methods:
                self._routes[f"/{service}/{m}"] = (protocol, m)

    def call(self, path: str) -> CallMetrics:
        """The metrics of the method at this gRPC path ("/package.Service/Method")."""
        c = self._calls.get(path)
        if c is not None:
            return c
        route = self._routes.get(path)
        if route is None:
            protocol = self._services.get(path[1:].partition("/")[0], OTHER)
            c = self._others.get(protocol)
            if c is None:
                c = self._others[protocol] = CallMetrics(self, protocol, OTHER)
            return c
        c = self._calls[path] = CallMetrics(self, *route)
        return c

    def error(self, code_name: str) -> None:
        """Count an error answered with this status code name."""
        self.errors.labels(code_name).inc()

    # -- sessions ---------------------------------------------------------------------------------------------
    def live_sessions(self, s: Session, event: str) -> None:
        """A session event (the session table's on_change): started, restored (from the store), ended, expired,
        left (to another replica)."""
        if event in ("started", "restored"):
            s.protocol = PROTOCOL.get()
        key = (s.model, s.protocol)
        c = self._session_children.get(key)
        if c is None:
            labels = (s.model.name, str(s.model.version))
            c = self._session_children[key] = (self.sessions.labels(*labels), self.started.labels(*labels, s.protocol),
                                               self.ended.labels(*labels, s.protocol),
                                               self.expired.labels(*labels, s.protocol))
        if event in ("started", "restored"):
            c[0].inc()
            if event == "started":
                c[1].inc()
            return
        c[0].dec()
        if event == "ended":
            c[2].inc()
        elif event == "expired":
            c[3].inc()

    def pending_from(self, source: Callable[[], Iterable[tuple[ModelVersion, int]]]) -> None:
        """Where rnnserve_pending_requests is read from at scrape time: (version, pending) pairs."""
        self.registry.register(_Pending(source))

    # -- batching and generation ---------------------------------------------------------------------------------
    def _batcher(self, mv: ModelVersion) -> tuple:
        c = self._batch_children.get(mv)
        if c is None:
            labels = (mv.name, str(mv.version))
            c = self._batch_children[mv] = tuple(m.labels(*labels) for m in (
                self.batch, self.latency, self.steps, self.tokens, self.queue, self.gen_rows, self.ttft, self.tpot,
                self.nonfinite_rows))  # all exported (at 0) from the version's load on
        return c

    def queue_of(self, mv: ModelVersion) -> _QueueTime:
        """The queue time of a version (the batcher observes it once per iteration): its histogram and its
        statistics' queue time."""
        return _QueueTime(self._batcher(mv)[4], self.stats_of(mv))

    def stats_of(self, mv: ModelVersion) -> VersionStats:
        """The inference statistics of a version (created at its first use)."""
        st = self.version_stats.get(mv)
        if st is None:
            st = self.version_stats[mv] = VersionStats()
        return st

    def forget(self, mv: ModelVersion) -> None:
        """A version unloaded: its statistics go (a version loaded again starts from zero)."""
        self.version_stats.pop(mv, None)

    def generation_of(self, mv: ModelVersion) -> tuple[Histogram, Histogram]:
        """The time-to-first-token and time-per-output-token histograms of a version."""
        c = self._batcher(mv)
        return c[6], c[7]

    def generating(self, mv: ModelVersion, n: int) -> None:
        """Set the generating rows gauge of a model version."""
        self._batcher(mv)[5].set(n)

    def observe_batch(self, mv: ModelVersion, rows: int, seconds: float, steps: int, generated: int) -> None:
        """Record one batcher iteration."""
        c = self._batch_children.get(mv) or self._batcher(mv)
        if rows:
            c[0].observe(rows)
        c[1].observe(seconds)
        c[2].inc(steps)
        if generated:
            c[3].inc(generated)
        st = self.version_stats.get(mv)  # made with the batcher (queue_of); gone once the version unloaded
        if st is None:
            return
        ns = int(seconds * 1e9)
        st.executions += 1
        st.compute_ns += ns
        st.queue_ns += st.queued  # the iteration's queue time goes to its first call
        st.queued = 0
        if rows:
            b = st.batches.get(rows)
            if b is None:
                b = st.batches[rows] = [0, 0]
            b[0] += 1
            b[1] += ns

    def nonfinite(self, mv: ModelVersion, rows: int) -> None:
        """Count rows whose step gave non-finite values."""
        self._batcher(mv)[8].inc(rows)

    # -- caches and the repository --------------------------------------------------------------------------------
    def prefix_cache(self, hit: bool, nbytes: int, saved: int) -> None:
        """Record one prefix-cache lookup and the cache's size."""
        (self.prefix_hits if hit else self.prefix_misses).inc()
        self.prefix_bytes.set(nbytes)
        self.prefix_tokens.set(saved)

    def broken_versions(self, n: int) -> None:
        """Set the number of version folders the last scan could not load."""
        self.broken.set(n)
