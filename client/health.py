"""`rnn-health`: exit 0 iff the server's grpc.health.v1 Check answers SERVING (the docker healthcheck).

Kept light on purpose: grpc, the health stubs and client.core (for TLS and the token; protobuf messages,
nothing more), no numpy/onnxruntime/server.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .core import add_connection_flags, connection, connection_settings, refusal_hint

DEFAULT_TARGET = "127.0.0.1:8001"
ENV_PREFIX = "RNNSERVE_HEALTH_"  # its own names: the server's container sets RNNSERVE_* for rnn-serve


def check(target: str, service: str = "", timeout: float = 3.0, **credentials: Any) -> tuple[bool, str]:
    """Ask target's health service about `service` ("" = the whole server); (serving, reason). `credentials`
    are Client's: token, tls, ca, cert, key, server_name."""
    what = f"service {service!r}" if service else "server"
    conn = connection(target, **credentials)
    with conn.channel(grpc, target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                              metadata=conn.metadata)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = refusal_hint(details, credentials)
                return False, f"{target} unreachable: {details or 'connection failed'}{hint}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"{target} did not answer within {timeout:g} s"
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"unknown service {service!r} on {target}"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return False, f"{target} does not implement grpc.health.v1"
            return False, f"{target} health check failed: {code.name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return True, f"{what} at {target} is SERVING"
    if resp.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
        return False, f"unknown service {service!r} on {target}"
    return False, f"{what} at {target} is {status}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 iff SERVING; otherwise prints why on stderr and returns 1."""
    p = argparse.ArgumentParser(prog="rnn-health", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None,
                   help=f"HOST:PORT (env {ENV_PREFIX}TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when SERVING")
    add_connection_flags(p, ENV_PREFIX)
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    target = args.target or os.environ.get(f"{ENV_PREFIX}TARGET") or DEFAULT_TARGET
    try:
        credentials = connection_settings(args, ENV_PREFIX, os.environ)
        ok, reason = check(target, args.service, args.timeout, **credentials)
    except ValueError as err:  # a file that cannot be read, a token that cannot be sent
        p.error(str(err))
    if not ok:
        print(f"rnn-health: {reason}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
