"""One gate for every RPC of both protocols: the caller's principal, and a ServeError a handler raises becomes
the call's status.

The servicers raise; this interceptor answers. It also stands between gRPC and the message parser:
bytes that do not parse as the method's request become INVALID_ARGUMENT (for a stream, once the
answers already under way are written), logged once per method and kind of error and then at most once
a minute with a count, never a traceback per request. Errors that belong inside a stream (the native
Session's `error` answers, a KServe stream's `error_message`) are the servicers' own business.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from . import auth
from .errors import InvalidArgument, ServeError

log = logging.getLogger(__name__)

_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
          ("unary_stream", grpc.unary_stream_rpc_method_handler, False),
          ("stream_unary", grpc.stream_unary_rpc_method_handler, True),
          ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
LOG_EVERY_S = 60.0  # after the first, at most one line per method and kind of bad message a minute


class Undecodable:
    """What the parser made of bytes that are not a valid request: the error, instead of a message."""

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int) -> None:
        self.error = error
        self.size = size


class RateLimitedLog:
    """Counts bad messages per (method, kind); logs the first and then one line a minute with the count."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (last logged, not logged since)

    def note(self, method: str, kind: str, detail: str) -> None:
        """Record one bad message; log it if this key was not logged within the last minute."""
        key = (method, kind)
        now = time.monotonic()
        last, quiet = self._seen.get(key, (-self.every_s, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, quiet + 1)
            return
        more = f" (and {quiet} more since the last line)" if quiet else ""
        log.warning("undecodable request to %s: %s: %s%s", method, kind, detail, more)
        self._seen[key] = (now, 0)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: a ServeError aborts the call with its code and message (counted), and
    request bytes that do not parse are INVALID_ARGUMENT instead of UNKNOWN."""

    def __init__(self, count: Callable[[str], None] | None = None,
                 authenticator: auth.Authenticator | None = None) -> None:
        self._count = count or (lambda code_name: None)
        self.bad_messages = RateLimitedLog()
        self.authenticator = authenticator or auth.Authenticator()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """The handler grpc found for this method, its parser and behaviour wrapped."""
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        for attr, make, streaming_in in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(self._wrap(behavior, method, streaming_in),
                            request_deserializer=_tolerant(handler.request_deserializer),
                            response_serializer=handler.response_serializer)
        return handler

    def _invalid(self, method: str, bad: Undecodable, position: str) -> InvalidArgument:
        kind = type(bad.error).__name__
        self.bad_messages.note(method, kind, f"{bad.size} bytes: {str(bad.error)[:200]}")
        return InvalidArgument(f"{position} is not a valid request message for {method} ({kind}, {bad.size} bytes)")

    def _checked(self, requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
        """A request stream whose undecodable messages raise INVALID_ARGUMENT in the handler."""
        return _Checked(requests, lambda bad, n: self._invalid(method, bad, f"message {n} of this stream"))

    def _wrap(self, behavior: Callable, method: str, streaming_in: bool) -> Callable:
        count = self._count
        gate = self.authenticator
        needs_principal = gate.enabled and not gate.is_open(method)

        def admit(context: grpc.aio.ServicerContext) -> None:
            """Establish the caller's principal for this call (UNAUTHENTICATED if none)."""
            auth.current.set(gate.authenticate(context.invocation_metadata(), context.auth_context())
                             if needs_principal else gate.anonymous)

        def arguments(request: Any) -> Any:
            if streaming_in:
                return self._checked(request, method)
            if isinstance(request, Undecodable):
                raise self._invalid(method, request, "the request")
            return request

        if inspect.isasyncgenfunction(behavior):
            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    admit(context)
                    async for response in behavior(arguments(request), context):
                        yield response
                except ServeError as e:
                    count(e.code.name)
                    await context.abort(e.code, e.message)
            return streamed

        async def called(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                admit(context)
                return await behavior(arguments(request), context)
            except ServeError as e:
                count(e.code.name)
                await context.abort(e.code, e.message)
        return called


class _Checked:
    """An async iterator over a request stream (a plain class: cheaper per message than a generator)."""

    __slots__ = ("_it", "_n", "_refuse")

    def __init__(self, requests: AsyncIterator[Any], refuse: Callable[[Undecodable, int], ServeError]) -> None:
        self._it = aiter(requests)
        self._n = 0
        self._refuse = refuse

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        r = await anext(self._it)
        self._n += 1
        if type(r) is Undecodable:
            raise self._refuse(r, self._n)
        return r


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A parser that returns Undecodable instead of raising (gRPC would answer UNKNOWN with a traceback)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 -- DecodeError and whatever else hostile bytes make a parser raise
            return Undecodable(e, len(data))
    return parse
