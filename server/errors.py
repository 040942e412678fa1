"""Typed serving errors: each carries the gRPC status code a client should see."""
from __future__ import annotations

import grpc

SHOWN_CHARS = 64  # how much of a client's string an error message repeats
MAX_MESSAGE_CHARS = 2000  # the longest error message sent (status details travel in size-limited metadata)


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """repr() of a client's value, cut to `limit` characters with its full length said."""
    r = repr(text)
    if len(r) <= limit:
        return r
    n = len(text) if isinstance(text, (str, bytes)) else len(r)
    return f"{r[:limit]}... ({n} characters)"


class ServeError(Exception):
    """A request failed for a reason the client can act on; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 20] + " ... (message cut)"
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    """Bad input: unknown character, token id out of range, wrong state length, bad parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServeError):
    """Unknown model, or a session that is unknown, closed or expired (the message says which)."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServeError):
    """A limit was hit: the live-session cap, message size, max tokens."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServeError):
    """The session is not in a state for this request (no logits yet, busy with another request)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServeError):
    """The server is draining for shutdown and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(ServeError):
    """The session left this stream: resumed on another stream, or moved to another replica."""

    code = grpc.StatusCode.ABORTED
