"""One gate for every RPC of both protocols: the caller's principal, a ServeError a handler raises becomes
the call's status, and every call is counted and timed with its final status code.

The servicers raise; this interceptor answers. A method no handler serves gets UNIMPLEMENTED from here (not
from gRPC), so it is counted like any other status. The interceptor also stands between gRPC and the message parser:
bytes that do not parse as the method's request become INVALID_ARGUMENT (for a stream, once the
answers already under way are written), logged once per method and kind of error and then at most once
a minute with a count, never a traceback per request. Errors that belong inside a stream (the native
Session's `error` answers, a KServe stream's `error_message`) are the servicers' own business.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from . import auth
from .errors import InvalidArgument, ServeError, shown
from .metrics import PROTOCOL, CallMetrics, Metrics

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


def _status(context: grpc.aio.ServicerContext) -> str:
    """The name of the status a call that returned (or aborted itself) ends with."""
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else _BY_VALUE.get(code, "UNKNOWN")


def _cut(context: grpc.aio.ServicerContext) -> str:
    """The status of a call cut before its end: its deadline passed, or the client went away."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


_BY_VALUE = {c.value[0]: c.name for c in grpc.StatusCode}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: a ServeError aborts the call with its code and message (counted), request bytes
    that do not parse are INVALID_ARGUMENT instead of UNKNOWN, and each call is recorded once, when it ends,
    in rnnserve_requests_total and rnnserve_request_duration_seconds (a stream's messages in
    rnnserve_stream_messages_total)."""

    def __init__(self, metrics: Metrics | None = None, authenticator: auth.Authenticator | None = None) -> None:
        self.metrics = metrics
        self._count = metrics.error if metrics is not None else (lambda code_name: None)
        self.bad_messages = RateLimitedLog()
        self.authenticator = authenticator or auth.Authenticator()
        # (method, grpc's handler, auth on) -> our wrapped handler: built once per method, not per call
        self._wrapped: dict[tuple[str, Any, bool], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """The handler grpc found for this method, its parser and behaviour wrapped (UNIMPLEMENTED if none)."""
        handler = await continuation(details)
        method = details.method
        if handler is None:  # not cached: a hostile client could name endless methods
            calls = self.metrics.call(method) if self.metrics is not None else None
            return grpc.stream_stream_rpc_method_handler(self._unimplemented(method, calls))
        key = (method, handler, self.authenticator.enabled)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap_handler(handler, method)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """grpc's handler of a served method with our behaviour and tolerant parser around it."""
        calls = self.metrics.call(method) if self.metrics is not None else None
        for attr, make, streaming_in in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(self._wrap(behavior, method, streaming_in, calls),
                            request_deserializer=_tolerant(handler.request_deserializer),
                            response_serializer=handler.response_serializer)
        return handler

    def _unimplemented(self, method: str, calls: CallMetrics | None) -> Callable:
        """A handler for a method nobody serves (any arity: it answers before reading), counted."""
        count = self._count

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
            if calls is not None:
                calls.done("UNIMPLEMENTED", 0.0)
            count("UNIMPLEMENTED")
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"method {shown(method)} is not implemented by "
                                "this server")
        return refuse

    def _invalid(self, method: str, bad: Undecodable, position: str) -> InvalidArgument:
        kind = type(bad.error).__name__
        self.bad_messages.note(method, kind, f"{bad.size} bytes: {str(bad.error)[:200]}")
        return InvalidArgument(f"{position} is not a valid request message for {method} ({kind}, {bad.size} bytes)")

    def _checked(self, requests: AsyncIterator[Any], method: str, seen: Callable[[], None]) -> AsyncIterator[Any]:
        """A request stream whose undecodable messages raise INVALID_ARGUMENT in the handler."""
        return _Checked(requests, lambda bad, n: self._invalid(method, bad, f"message {n} of this stream"), seen)

    def _wrap(self, behavior: Callable, method: str, streaming_in: bool, calls: CallMetrics | None) -> Callable:
        count = self._count
        gate = self.authenticator
        needs_principal = gate.enabled and not gate.is_open(method)
        protocol = calls.protocol if calls is not None else PROTOCOL.get()
        done = calls.done if calls is not None else _ignore
        seen = calls.messages.inc if calls is not None else _nothing

        def admit(context: grpc.aio.ServicerContext) -> None:
            """Establish the caller's principal (UNAUTHENTICATED if none) and protocol for this call."""
            PROTOCOL.set(protocol)
            auth.current.set(gate.authenticate(context.invocation_metadata(), context.auth_context())
                             if needs_principal else gate.anonymous)

        def arguments(request: Any) -> Any:
            if streaming_in:
                return self._checked(request, method, seen)
            if isinstance(request, Undecodable):
                raise self._invalid(method, request, "the request")
            return request

        if inspect.isasyncgenfunction(behavior):
            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0, code = time.perf_counter(), "UNKNOWN"
                try:
                    admit(context)
                    async for response in behavior(arguments(request), context):
                        yield response
                    code = _status(context)
                except ServeError as e:
                    code = e.code.name
                    count(code)
                    await context.abort(e.code, e.message)
                except (asyncio.CancelledError, GeneratorExit):
                    code = _cut(context)
                    raise
                except grpc.aio.AbortError:  # the handler aborted the call itself
                    code = _status(context)
                    count(code)
                    raise
                except Exception:  # a bug: gRPC answers UNKNOWN (and logs it); counted, not hidden
                    count(code)
                    raise
                finally:
                    done(code, time.perf_counter() - t0)
            return streamed

        async def called(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, code = time.perf_counter(), "UNKNOWN"
            try:
                admit(context)
                response = await behavior(arguments(request), context)
                code = _status(context)
                return response
            except ServeError as e:
                code = e.code.name
                count(code)
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:
                code = _cut(context)
                raise
            except grpc.aio.AbortError:  # the handler aborted the call itself
                code = _status(context)
                count(code)
                raise
            except Exception:  # a bug: gRPC answers UNKNOWN (and logs it); counted, not hidden
                count(code)
                raise
            finally:
                done(code, time.perf_counter() - t0)
        return called


def _ignore(code: str, seconds: float) -> None:
    """No metrics to record a call in."""


def _nothing() -> None:
    """No metrics to count a stream's message in."""


class _Checked:
    """An async iterator over a request stream (a plain class: cheaper per message than a generator)."""

    __slots__ = ("_it", "_n", "_refuse", "_seen")

    def __init__(self, requests: AsyncIterator[Any], refuse: Callable[[Undecodable, int], ServeError],
                 seen: Callable[[], None]) -> None:
        self._it = aiter(requests)
        self._n = 0
        self._refuse = refuse
        self._seen = seen

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        r = await anext(self._it)
        self._n += 1
        self._seen()
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
