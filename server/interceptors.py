"""One error mapping for every RPC of both protocols: a ServeError a handler raises becomes the call's status.

The servicers raise; this interceptor answers. Errors that belong inside a stream (the native
Session's `error` answers, a KServe stream's `error_message`) are the servicers' own business and
never reach it.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from .errors import ServeError

log = logging.getLogger(__name__)

_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so a ServeError aborts the call with its code and message (and is counted)."""

    def __init__(self, count: Callable[[str], None] | None = None) -> None:
        self._count = count or (lambda code_name: None)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        """The handler grpc found for this method, its behaviour wrapped."""
        handler = await continuation(details)
        if handler is None:
            return None
        for attr, make in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(self._wrap(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, behavior: Callable) -> Callable:
        count = self._count
        if inspect.isasyncgenfunction(behavior):
            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in behavior(request, context):
                        yield response
                except ServeError as e:
                    count(e.code.name)
                    await context.abort(e.code, e.message)
            return streamed

        async def called(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except ServeError as e:
                count(e.code.name)
                await context.abort(e.code, e.message)
        return called
