"""`rnn-health`: exit 0 iff the server's grpc.health.v1 Check answers SERVING (the docker healthcheck).

The target is --target, else RNNSERVE_HEALTH_TARGET, else RNNSERVE_TARGET (rnn-client's), else
127.0.0.1:8001; the credentials flags read RNNSERVE_HEALTH_* only (in the server's container RNNSERVE_*
configure the server). Exit status, the convention of every rnnserve command line: 0 SERVING; 1 not
serving, unreachable or any other runtime error; 2 a usage error (a bad flag or value, a file that cannot
be read); 130 interrupted (Ctrl-C).

Kept light on purpose: grpc, the health stubs and client.core (for TLS and the token; protobuf messages,
nothing more), no numpy/onnxruntime/server.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .connection import add_connection_flags, connection, connection_settings, refusal_hint

DEFAULT_TARGET = "127.0.0.1:8001"
ENV_PREFIX = "RNNSERVE_HEALTH_"  # its own names: the server's container sets RNNSERVE_* for rnn-serve
TARGET_ENV = (f"{ENV_PREFIX}TARGET", "RNNSERVE_TARGET")  # first set wins; then DEFAULT_TARGET
EXIT_STATUS = ("exit status: 0 SERVING, 1 not serving or unreachable, 2 usage error (bad flag, value or "
               "file), 130 interrupted")


def _seconds(text: str) -> float:
    """--timeout's type: a positive, finite number of seconds (argparse names the flag in the error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def target_from(environ: Mapping[str, str]) -> str:
    """The target when --target is not given: RNNSERVE_HEALTH_TARGET, else RNNSERVE_TARGET, else the default."""
    return next((environ[k] for k in TARGET_ENV if environ.get(k)), DEFAULT_TARGET)


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
    """Entry point: 0 iff SERVING; otherwise prints why on stderr and returns 1 (2 usage, 130 ^C)."""
    p = argparse.ArgumentParser(prog="rnn-health", description=__doc__.splitlines()[0], epilog=EXIT_STATUS)
    p.add_argument("--target", default=None,
                   help=f"HOST:PORT (env {' then '.join(TARGET_ENV)}, default {DEFAULT_TARGET})")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for the answer, > 0 "
                                                                  "(default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when SERVING")
    add_connection_flags(p, ENV_PREFIX)
    args = p.parse_args(argv)  # a bad flag or value: argparse names it and exits 2
    target = args.target or target_from(os.environ)
    try:
        credentials = connection_settings(args, ENV_PREFIX, os.environ)
        ok, reason = check(target, args.service, args.timeout, **credentials)
    except ValueError as err:  # a file that cannot be read, a token that cannot be sent
        p.error(str(err))
    except KeyboardInterrupt:
        print("rnn-health: interrupted", file=sys.stderr)
        return 130
    if not ok:
        print(f"rnn-health: {reason}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
