"""The asyncio metrics endpoint over real sockets: routing, auth, deadlines, the connection cap, no threads.

Each test runs a MetricsEndpoint on an event loop in a background thread and talks to it with blocking
sockets and http.client from the test thread.
"""
from __future__ import annotations

import asyncio
import http.client
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from rnnserve.server.metrics_http import MetricsEndpoint


class Served:
    """A running endpoint, its loop (in a background thread) and its port."""

    def __init__(self, endpoint: MetricsEndpoint, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.endpoint, self.loop, self.host, self.port = endpoint, loop, host, port

    def stop(self) -> None:
        """Stop the endpoint from the test thread."""
        asyncio.run_coroutine_threadsafe(self.endpoint.stop(), self.loop).result(5)

    def open_connections(self) -> int:
        """The endpoint's count of open connections, read on its loop."""
        async def count() -> int:
            return self.endpoint.open_connections
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def get(self, path: str = "/metrics", method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
        """One request with http.client: status, response (for headers) and body."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp, resp.read()
        finally:
            conn.close()


@contextmanager
def serving(registry: CollectorRegistry | None = None, host: str = "127.0.0.1", **kw) -> Iterator[Served]:
    """A MetricsEndpoint on host, port 0, served by a loop in a background thread."""
    if registry is None:
        registry = CollectorRegistry()
        Counter("test_hits", "Hits", registry=registry).inc(3)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="metrics-loop", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(registry, **kw)
    try:
        port = asyncio.run_coroutine_threadsafe(endpoint.start(host, 0), loop).result(5)
        served = Served(endpoint, loop, host, port)
        yield served
        served.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def raw(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


def status_of(response: bytes) -> int:
    """The status code of a raw response."""
    return int(response.split(b" ", 2)[1])


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the server closed s (EOF or reset) within timeout, False if still open."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def connect_many(port: int, n: int, timeout: float = 5.0) -> list[socket.socket]:
    """Open n connections at once (non-blocking connects, then wait until all are up)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_WRITE)
        pending, end = n, time.monotonic() + timeout
        while pending and time.monotonic() < end:
            for key, _ in sel.select(end - time.monotonic()):
                sel.unregister(key.fileobj)
                pending -= 1
    for s in socks:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        s.setblocking(True)
    assert pending == 0, f"{pending} of {n} connections not up after {timeout} s"
    return socks


def threads() -> int:
    """The process's thread count, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll predicate until true or timeout; returns its last value."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_metrics_serves_the_registry_and_ignores_the_query() -> None:
    with serving() as srv:
        for path in ("/metrics", "/metrics?name[]=test_hits"):
            status, resp, body = srv.get(path)
            assert status == 200
            assert resp.getheader("Content-Type") == CONTENT_TYPE_LATEST
            assert resp.getheader("Connection") == "close"
            assert b"test_hits_total 3.0" in body
        status, resp, body = srv.get(method="HEAD")
        assert status == 200 and body == b"" and int(resp.getheader("Content-Length")) > 0


@pytest.mark.parametrize("path", ["/", "/metrics/x", "/favicon.ico", "/metricsx"])
def test_other_paths_are_404(path: str) -> None:
    with serving() as srv:
        status, resp, body = srv.get(path)
        assert status == 404 and b"test_hits" not in body and resp.getheader("Connection") == "close"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405(method: str) -> None:
    with serving() as srv:
        status, resp, body = srv.get(method=method, body=b"x" * 20000 if method == "POST" else None)
        assert status == 405 and resp.getheader("Allow") == "GET, HEAD" and b"test_hits" not in body


@pytest.mark.parametrize("data", [b"garbage\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET /metrics HTTP/9\r\n\r\n",
                                  b"GET metrics HTTP/1.1\r\n\r\n", b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n",
                                  b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", b"\r\n\r\n"])
def test_malformed_heads_are_400(data: bytes) -> None:
    with serving() as srv:
        assert status_of(raw(srv.port, data)) == 400


def test_a_head_over_8_kib_is_431_and_a_bare_lf_head_is_served() -> None:
    with serving() as srv:
        big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
        assert status_of(raw(srv.port, big)) == 431
        assert status_of(raw(srv.port, b"GET /metrics HTTP/1.0\n\n")) == 200


def test_authorize_gets_the_header_and_a_refusal_is_a_bare_401() -> None:
    seen: list[str | None] = []

    def authorize(value: str | None) -> bool:
        seen.append(value)
        return value == "Bearer s3cret"

    with serving(authorize=authorize) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, resp, body = srv.get(headers=headers)
            assert status == 401 and resp.getheader("WWW-Authenticate") == "Bearer"
            assert b"test_hits" not in body and b"wrong" not in body
        status, _, body = srv.get(headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and b"test_hits_total 3.0" in body
        assert seen == [None, "Bearer wrong", "Bearer s3cret"]


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with serving(host="::1") as srv:
        status, _, body = srv.get()
        assert status == 200 and b"test_hits_total" in body


def test_stop_closes_open_connections() -> None:
    with serving() as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            assert wait_for(lambda: srv.open_connections() == 1, 2)
            srv.stop()
            assert closed_by_peer(s, 1.0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_500_half_open_connections_hold_no_threads_and_are_dropped_at_the_deadline() -> None:
    n, header_timeout = 500, 1.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    socks: list[socket.socket] = []
    try:
        with serving(max_connections=2 * n, header_timeout=header_timeout) as srv:
            assert srv.get()[0] == 200
            before = threads()
            socks = connect_many(srv.port, n)
            for s in socks[1::2]:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a head, never finished
            assert wait_for(lambda: srv.open_connections() == n, header_timeout / 2)
            during = threads()
            t0 = time.monotonic()
            status, _, body = srv.get()
            assert status == 200 and b"test_hits_total 3.0" in body
            assert time.monotonic() - t0 < 1.0
            assert during - before <= 3, (before, during)
            assert wait_for(lambda: srv.open_connections() == 0, header_timeout + 2)
            assert all(closed_by_peer(s, 1.0) for s in socks)
            assert threads() - before <= 3
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_past_the_cap_are_closed_at_once() -> None:
    with serving(max_connections=3, header_timeout=5.0) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        try:
            assert wait_for(lambda: srv.open_connections() == 3, 2)
            with socket.create_connection(("127.0.0.1", srv.port)) as extra:
                t0 = time.monotonic()
                assert closed_by_peer(extra, 2.0)
                assert time.monotonic() - t0 < 0.5
            with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
                srv.get()
            assert srv.open_connections() == 3
        finally:
            for s in held:
                s.close()
        assert wait_for(lambda: srv.open_connections() == 0, 2)  # EOF before a head: dropped at once
        assert srv.get()[0] == 200
