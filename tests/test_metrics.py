"""The operator's metrics against a real server: they move with native and KServe traffic (UNIMPLEMENTED calls
included), and every query of the Grafana dashboard names a metric the server exports."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
import tritonclient.grpc as tc
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rnnserve.server.app import App
from rnnserve.server.settings import Settings
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rnnserve.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
TINY = {"model": "tiny", "version": "1"}


class Served:
    """An App with its metrics endpoint on 127.0.0.1, run by its own event loop in a thread."""

    def __init__(self, repo: Path, **kw) -> None:
        settings = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=0,
                                                metrics_host="127.0.0.1", poll_interval=0, session_store="memory"),
                                       **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = App(settings)
        asyncio.run_coroutine_threadsafe(self.app.start(), self.loop).result(60)
        self.target = f"127.0.0.1:{self.app.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.RnnServeStub(self.channel)
        self.kserve = tc.InferenceServerClient(self.target)

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """GET /metrics, parsed: (sample name, labels) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.app.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self) -> None:
        self.kserve.close()
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.app.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def tokens(ids: list[int]) -> tc.InferInput:
    arr = np.asarray(ids, np.int64)[None]  # (1, T)
    inp = tc.InferInput("tokens", list(arr.shape), "INT64")
    inp.set_data_from_numpy(arr)
    return inp


def native_stream(stub: pb_grpc.RnnServeStub) -> list[pb.SessionResponse]:
    """One Session stream: a feed before open (an in-stream error), open, feed, a 12-token generation, close."""
    reqs = [pb.SessionRequest(request_id=1, feed=pb.Feed(text="x")),
            pb.SessionRequest(request_id=2, open=pb.Open(model=pb.ModelRef(name="tiny"))),
            pb.SessionRequest(request_id=3, feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2, 3]))),
            pb.SessionRequest(request_id=4, generate=pb.Generate(max_tokens=12, chunk_tokens=4, seed=1)),
            pb.SessionRequest(request_id=5, close=pb.Close())]
    return list(stub.Session(iter(reqs), timeout=30))


def traffic(s: Served) -> None:
    """Native stream and unary calls, KServe unary and stream, and calls nobody serves."""
    out = native_stream(s.stub)
    assert out[0].WhichOneof("kind") == "error" and out[-1].WhichOneof("kind") == "closed", out
    sid = s.stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny")))).session_id
    s.stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[4]))))
    with pytest.raises(grpc.RpcError) as e:
        s.stub.Step(pb.StepRequest(session_id="no-such-session", feed=pb.Feed(tokens=pb.TokenIds(ids=[4]))))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    s.kserve.infer("tiny", [tokens([1, 2, 3])])
    s.kserve.infer("tiny", [tokens([1, 2])], sequence_id=5, sequence_start=True)
    s.kserve.infer("tiny", [tokens([3])], sequence_id=5, sequence_end=True)
    answers: list = []
    s.kserve.start_stream(callback=lambda result, error: answers.append((result, error)))
    try:
        s.kserve.async_stream_infer("tiny", [tokens([1])], sequence_id=6, sequence_start=True)
        s.kserve.async_stream_infer("tiny", [tokens([2])], sequence_id=6, sequence_end=True)
        end = time.monotonic() + 20
        while len(answers) < 2 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        s.kserve.stop_stream()
    assert [e for _, e in answers] == [None, None], answers
    # UNIMPLEMENTED: a KServe RPC we do not declare, an undeclared native method, an unknown service
    with pytest.raises(InferenceServerException) as ke:
        s.kserve.get_system_shared_memory_status()
    assert "UNIMPLEMENTED" in str(ke.value.status())
    for path in ("/rnnserve.v1.RnnServe/Nope", "/no.such.Service/Thing"):
        with pytest.raises(grpc.RpcError) as e:
            s.channel.unary_unary(path)(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "is not implemented" in e.value.details()


@pytest.fixture(scope="module")
def busy(tiny_repo: Path) -> Iterator[tuple[Served, dict, dict]]:
    """A server, its metrics before and after the traffic above."""
    s = Served(tiny_repo)
    try:
        before = s.scrape()
        traffic(s)
        yield s, before, s.scrape()
    finally:
        s.close()


def test_calls_are_counted_by_protocol_method_and_code(busy) -> None:
    _, before, after = busy

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    req = "rnnserve_requests_total"
    assert moved(req, protocol="native", method="Session", code="OK") == 1
    assert moved(req, protocol="native", method="OpenSession", code="OK") == 1
    assert moved(req, protocol="native", method="Step", code="OK") == 1
    assert moved(req, protocol="native", method="Step", code="NOT_FOUND") == 1
    assert moved(req, protocol="kserve", method="ModelInfer", code="OK") == 3
    assert moved(req, protocol="kserve", method="ModelStreamInfer", code="OK") == 1
    assert moved(req, protocol="kserve", method="other", code="UNIMPLEMENTED") == 1
    assert moved(req, protocol="native", method="other", code="UNIMPLEMENTED") == 1
    assert moved(req, protocol="other", method="other", code="UNIMPLEMENTED") == 1
    assert moved("rnnserve_errors_total", code="UNIMPLEMENTED") == 3
    assert moved("rnnserve_errors_total", code="FAILED_PRECONDITION") == 1  # the feed before open, in-stream
    assert moved("rnnserve_errors_total", code="NOT_FOUND") == 1
    # every counted call is timed, under the same labels
    for (name, labels), n in after.items():
        if name == req:
            assert value(after, "rnnserve_request_duration_seconds_count", **dict(labels)) == n, labels
    stream = value(after, "rnnserve_request_duration_seconds_sum", protocol="native", method="Session", code="OK")
    assert stream > 0
    assert moved("rnnserve_stream_messages_total", protocol="native", method="Session") == 5
    assert moved("rnnserve_stream_messages_total", protocol="kserve", method="ModelStreamInfer") == 2


def test_sessions_sequences_generation_and_process(busy) -> None:
    s, before, after = busy

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("rnnserve_sequences_started_total", **TINY, protocol="native") == 2
    assert moved("rnnserve_sequences_ended_total", **TINY, protocol="native") == 1
    assert moved("rnnserve_sequences_started_total", **TINY, protocol="kserve") == 2
    assert moved("rnnserve_sequences_ended_total", **TINY, protocol="kserve") == 2
    assert value(after, "rnnserve_live_sessions", **TINY) == 1 == len(s.app.engine.table.live)
    assert value(after, "rnnserve_sequences_expired_total", **TINY, protocol="native") == 0
    assert moved("rnnserve_time_to_first_token_seconds_count", **TINY) == 1
    assert moved("rnnserve_time_per_output_token_seconds_count", **TINY) == 1
    assert value(after, "rnnserve_time_per_output_token_seconds_sum", **TINY) > 0
    assert moved("rnnserve_queue_duration_seconds_count", **TINY) >= 1  # the generation and the long feeds
    assert value(after, "rnnserve_pending_requests", **TINY) == 0
    assert moved("rnnserve_generated_tokens_total", **TINY) == 12
    assert value(after, "process_cpu_seconds_total") > 0 and value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_open_fds") > 0


def test_queue_time_and_pending_requests(tiny_repo: Path) -> None:
    """With --max-wait-ms 400 a lone feed waits in the batcher: pending while it waits, then its queue time."""
    s = Served(tiny_repo, max_wait_ms=400.0)
    try:
        sid = s.stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny")))).session_id
        call = s.stub.Step.future(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[4]))))
        end = time.monotonic() + 10
        while value(s.scrape(), "rnnserve_pending_requests", **TINY) != 1:
            assert time.monotonic() < end and not call.done(), "the feed never showed as pending"
            time.sleep(0.02)
        call.result(timeout=10)
        after = s.scrape()
        assert value(after, "rnnserve_pending_requests", **TINY) == 0
        assert value(after, "rnnserve_queue_duration_seconds_count", **TINY) == 1
        assert value(after, "rnnserve_queue_duration_seconds_bucket", **TINY, le="0.25") == 0
        assert 0.35 < value(after, "rnnserve_queue_duration_seconds_sum", **TINY) < 5
    finally:
        s.close()


def test_expired_sessions_and_sequences_are_counted_per_protocol(tiny_repo: Path) -> None:
    s = Served(tiny_repo, idle_timeout=0.3)
    try:
        s.stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"))))
        s.kserve.infer("tiny", [tokens([1])], sequence_id="slow", sequence_start=True)
        assert value(s.scrape(), "rnnserve_live_sessions", **TINY) == 2
        end = time.monotonic() + 10
        while s.app.engine.table.live:
            assert time.monotonic() < end, "the sessions never expired"
            time.sleep(0.05)
        after = s.scrape()
        assert value(after, "rnnserve_live_sessions", **TINY) == 0
        for protocol in ("native", "kserve"):
            assert value(after, "rnnserve_sequences_expired_total", **TINY, protocol=protocol) == 1
            assert value(after, "rnnserve_sequences_ended_total", **TINY, protocol=protocol) == 0
    finally:
        s.close()


# ----------------------------------------------------------------------------- the dashboard's PromQL
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile"}
FUNCTIONS = AGGREGATIONS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_sum", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(r"""\s+|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|\$\{[^}]+\}|\$\w+"""
                    r"""|[A-Za-z_:][\w:]*|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?"""
                    r"""|==|!=|=~|!~|>=|<=|[-+*/%^(){}\[\],=<>@]""")


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, grouping labels, functions and
    Grafana variables skipped); ValueError on text that is not PromQL."""
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"not PromQL at {pos}: {expr[pos:pos + 20]!r} in {expr!r}")
        if not m.group().isspace():
            toks.append(m.group())
        pos = m.end()
    closing = {"{": "}", "[": "]", "(": ")"}
    names: set[str] = set()
    depth = 0
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if t in ("{", "[") or (t in GROUPING and nxt == "("):  # matchers, a range, grouping labels: skip whole
            start = i + (1 if t in GROUPING else 0)
            open_, close = toks[start], closing[toks[start]]
            level, i = 0, start
            while True:
                level += (toks[i] == open_) - (toks[i] == close)
                i += 1
                if not level:
                    break
                if i >= len(toks):
                    raise ValueError(f"unbalanced {open_!r} in {expr!r}")
            continue
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {expr!r}")
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", t) and t not in KEYWORDS and t not in GROUPING:
            if nxt == "(" or (t in AGGREGATIONS and nxt in GROUPING):  # a call (`sum by (x) (...)` too)
                if t not in FUNCTIONS:
                    raise ValueError(f"unknown PromQL function {t!r} in {expr!r}")
            else:
                names.add(t)
        i += 1
    if depth:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows' nested panels too) and query variables."""
    out = []

    def panels(ps: list) -> Iterator[dict]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        out += [t["expr"] for t in p.get("targets", [])]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((?:(.+),)?\s*\w+\s*\)", q.strip())
            assert m, f"variable {v['name']}: expected label_values(...), got {q!r}"
            if m.group(1):
                out.append(m.group(1))
    return out


def test_promql_reader_finds_names_and_refuses_junk() -> None:
    q = ('histogram_quantile(0.99, sum by (le, model) (rate(rnnserve_queue_duration_seconds_bucket'
         '{model=~"$model", instance=~"${instance}"}[$__rate_interval])))'
         ' / on (model) group_left sum without (code) (rnnserve_x_total offset 5m) > bool 0')
    assert promql_metrics(q) == {"rnnserve_queue_duration_seconds_bucket", "rnnserve_x_total"}
    assert promql_metrics("rate(process_cpu_seconds_total[1m])") == {"process_cpu_seconds_total"}
    for bad in ("sum(rate(x[1m])", "rates(x[1m])", "x{a=\"b\"", "x ; y"):
        with pytest.raises(ValueError):
            promql_metrics(bad)


def test_every_dashboard_query_names_an_exported_metric(busy) -> None:
    _, _, after = busy
    exported = {name for name, _ in after}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15, queries
    used: set[str] = set()
    for q in queries:
        names = promql_metrics(q)
        assert names, f"a query that selects no metric: {q!r}"
        assert names <= exported, f"{q!r} names metrics the server does not export: {names - exported}"
        used |= names
    # the dashboard covers what an operator expects
    wanted = {"rnnserve_requests_total", "rnnserve_request_duration_seconds_bucket", "rnnserve_errors_total",
              "rnnserve_queue_duration_seconds_bucket", "rnnserve_pending_requests", "rnnserve_live_sessions",
              "rnnserve_sequences_started_total", "rnnserve_sequences_ended_total",
              "rnnserve_sequences_expired_total", "rnnserve_time_to_first_token_seconds_bucket",
              "rnnserve_time_per_output_token_seconds_bucket", "process_cpu_seconds_total",
              "process_resident_memory_bytes"}
    assert wanted <= used, wanted - used


def test_dashboard_is_provisioned_in_the_monitoring_profile() -> None:
    """Grafana (official image, monitoring profile) gets the Prometheus datasource the panels name and the
    dashboard folder, from files in the repository."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    g = compose["grafana"]
    assert g["profiles"] == ["monitoring"] and re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", g["image"])
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in g["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    prom = compose["prometheus"]
    port = prom["ports"][0].rsplit(":", 1)[1]
    assert [(d["type"], d["url"]) for d in sources] == [("prometheus", f"http://prometheus:{port}")]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "rnnserve.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert mounts[folder] == DASHBOARD.parent and DASHBOARD.exists()
    uid = sources[0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(ps: list) -> Iterator[dict]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
            assert p["targets"] and all(t["refId"] for t in p["targets"]), p["title"]
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
