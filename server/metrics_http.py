"""Prometheus metrics over HTTP/1.1 from the asyncio event loop: no threads, capped connections, deadlines.

Only `GET /metrics` and `HEAD /metrics` are served (200); any other path is 404, any other method 405,
a malformed head 400, a head over 8 KiB 431, and a refused `authorize` 401. Every response ends the
connection. A client that has not sent a whole head by `header_timeout` is dropped without an answer;
past `max_connections` open at once, new connections are closed as soon as they are accepted.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of request line and headers, the blank line included
LINGER = 1.0  # at most this long, after answering, reading what the client still sends (so it is not reset)
REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings about connections refused at the cap
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
_TEXT = "text/plain; charset=utf-8"


class _HeadTooLarge(Exception):
    """The request head ran past MAX_HEAD."""


def _parse(head: bytes) -> tuple[str, str, dict[str, list[str]]]:
    """Split a request head into method, path and headers (lower-case names); ValueError if malformed."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise ValueError("bad request line")
    method, target = parts[0], parts[1]
    if "://" in target and not target.startswith("/"):  # absolute-form: scheme://authority/path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    if not target.startswith("/") or any(ord(c) <= 32 or ord(c) == 127 for c in target):
        raise ValueError("bad request target")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or any(ord(c) < 32 and c != "\t" for c in value):
            raise ValueError("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return method, target.split("?", 1)[0].split("#", 1)[0], headers


class MetricsEndpoint:
    """An HTTP endpoint on the running event loop that serves one registry at /metrics."""

    def __init__(self, registry: CollectorRegistry, authorize: Callable[[str | None], bool] | None = None,
                 max_connections: int = 64, header_timeout: float = 5.0) -> None:
        if max_connections < 1 or header_timeout <= 0:
            raise ValueError("max_connections must be >= 1 and header_timeout > 0")
        self.registry = registry
        self.authorize = authorize
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[asyncio.StreamWriter, asyncio.Task | None] = {}
        self._refused = 0
        self._warned_at = float("-inf")

    @property
    def open_connections(self) -> int:
        """How many connections are being served now."""
        return len(self._open)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 = ephemeral, IPv6 hosts with or without brackets); returns the port."""
        if self._server is not None:
            raise RuntimeError("metrics endpoint already started")
        bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._server = await asyncio.start_server(self._serve, bind or None, port,
                                                  backlog=min(max(100, self.max_connections), 4096))
        bound = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", f"[{bind}]" if ":" in bind else bind, bound)
        return bound

    async def stop(self) -> None:
        """Close the listener and every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = {t for t in self._open.values() if t is not None and t is not asyncio.current_task()}
        for writer in list(self._open):
            writer.transport.abort()  # a pending read sees EOF and its handler returns
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=1.0)
            for t in late:
                t.cancel()
        self._open.clear()
        await server.wait_closed()

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection over the cap at once, warning now and then."""
        writer.transport.abort()
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= REFUSAL_LOG_INTERVAL:
            log.warning("metrics endpoint: %d connection(s) refused, %d open is the cap",
                        self._refused, self.max_connections)
            self._refused, self._warned_at = 0, now

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request on a connection, then close it."""
        if len(self._open) >= self.max_connections or self._server is None:
            self._refuse(writer)
            return
        self._open[writer] = asyncio.current_task()
        clean = False
        try:
            try:
                head = await asyncio.wait_for(self._read_head(reader), self.header_timeout)
            except _HeadTooLarge:
                response = self._response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"Request head too large\n")
            else:
                if head is None:
                    return
                try:
                    response = self._answer(head)
                except Exception:
                    log.exception("metrics endpoint: cannot answer")
                    response = self._response(HTTPStatus.INTERNAL_SERVER_ERROR, b"Internal server error\n")
            writer.write(response)
            await asyncio.wait_for(writer.drain(), self.header_timeout)
            await self._linger(reader, writer)
            clean = True
        except (asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics endpoint: request failed")
        finally:
            self._open.pop(writer, None)
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """Read up to the blank line that ends the head; None at EOF first."""
        buf = bytearray()
        while True:
            ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n", b"\r\n\n") if (i := buf.find(sep)) >= 0]
            if ends:
                end, size = min(ends)
                if end + size > MAX_HEAD:
                    raise _HeadTooLarge
                return bytes(buf[:end])
            if len(buf) > MAX_HEAD:
                raise _HeadTooLarge
            chunk = await reader.read(MAX_HEAD + 1 - len(buf))
            if not chunk:
                return None
            buf += chunk

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard input until the client closes or LINGER passes."""
        if writer.can_write_eof():
            writer.write_eof()

        async def drain_input() -> None:
            while await reader.read(65536):
                pass

        try:
            await asyncio.wait_for(drain_input(), min(LINGER, self.header_timeout))
        except asyncio.TimeoutError:
            pass

    def _answer(self, head: bytes) -> bytes:
        """The whole response to a complete request head."""
        try:
            method, path, headers = _parse(head)
        except ValueError:
            return self._response(HTTPStatus.BAD_REQUEST, b"Bad request\n")
        if path != "/metrics":
            return self._response(HTTPStatus.NOT_FOUND, b"Not found\n", head_only=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return self._response(HTTPStatus.METHOD_NOT_ALLOWED, b"Method not allowed\n",
                                  [("Allow", "GET, HEAD")])
        if self.authorize is not None:
            values = headers.get("authorization", [])
            if len(values) > 1:
                return self._response(HTTPStatus.BAD_REQUEST, b"Bad request\n")
            if not self.authorize(values[0] if values else None):
                return self._response(HTTPStatus.UNAUTHORIZED, b"Unauthorized\n",
                                      [("WWW-Authenticate", "Bearer")], head_only=method == "HEAD")
        body = generate_latest(self.registry)
        return self._response(HTTPStatus.OK, body, content_type=CONTENT_TYPE_LATEST, head_only=method == "HEAD")

    @staticmethod
    def _response(status: HTTPStatus, body: bytes, extra: list[tuple[str, str]] | None = None,
                  content_type: str = _TEXT, head_only: bool = False) -> bytes:
        """Status line, headers and (unless head_only) body, always with Connection: close."""
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store",
                 *(f"{k}: {v}" for k, v in extra or ())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
