"""Helpers of tests/test_fuzz.py: a real rnn-serve process, raw calls to any method, and the verdict on one call."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import rnnserve.v1.rnnserve_pb2 as pb
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from rnnserve.server.kserve.descriptors import SERVICE, messages

BIN = Path(sys.executable).parent
PACE_S = 2.0  # a paced stream's longest wait for an answer before its next request
CALL_TIMEOUT = 10.0  # seconds: a tiny model answers in milliseconds; a call still open after this is a hang
# What a call (or an in-stream error) may end with. UNKNOWN and INTERNAL are bugs; UNAVAILABLE means the
# server died or drained; DEADLINE_EXCEEDED is a hang; CANCELLED/ABORTED/DATA_LOSS are never expected.
ALLOWED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
                     grpc.StatusCode.ALREADY_EXISTS})
BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
BY_NAME = {c.name: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class Method:
    """One RPC of either service, with its message classes."""

    path: str  # /package.Service/Name
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        """The method's own name: Step, ModelInfer, ..."""
        return self.path.rsplit("/", 1)[1]

    def __str__(self) -> str:
        """Service/Method: RnnServe/Step, GRPCInferenceService/ModelInfer."""
        return self.path.strip("/").split(".")[-1]

    __repr__ = __str__


def all_methods() -> list[Method]:
    """Every method both services declare: the native one from its stubs, KServe from the private pool."""
    from google.protobuf import message_factory

    native = pb.DESCRIPTOR.services_by_name["RnnServe"]
    out = [Method(f"/{native.full_name}/{m.name}", message_factory.GetMessageClass(m.input_type),
                  message_factory.GetMessageClass(m.output_type), m.client_streaming, m.server_streaming)
           for m in native.methods]
    k = messages()
    for name in k.method_names():
        req, resp, cs, ss = k.method_types(name)
        out.append(Method(f"/{SERVICE}/{name}", req, resp, cs, ss))
    return out


@dataclass
class Server:
    """A running rnn-serve subprocess with its log file."""

    proc: subprocess.Popen
    target: str
    log: Path
    workdir: Path

    def rss_mb(self) -> float:
        """VmRSS of the server process in MB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+)", text, re.MULTILINE)[1]) / 1024.0

    def log_bytes(self) -> int:
        """The size of the server's log file (its stdout and stderr)."""
        return self.log.stat().st_size

    def log_tail(self, n: int = 3000) -> str:
        """The last n characters of the log."""
        return self.log.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, SIGKILL after 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(repo: Path, workdir: Path, *extra: str) -> Server:
    """rnn-serve on a copy of repo (127.0.0.1, ephemeral port, no metrics or polling, run in workdir); returns once serving."""
    models = workdir / "models"
    shutil.copytree(repo, models)
    port_file, log = workdir / "port.json", workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(models), "--host", "127.0.0.1",
                                 "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                                 "--port-file", str(port_file), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)  # relative defaults land here
    deadline = time.monotonic() + 120
    while not port_file.exists():  # written once serving
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"rnn-serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return Server(proc, f"127.0.0.1:{json.loads(port_file.read_text())['port']}", log, workdir)


@dataclass
class Outcome:
    """How one call ended: its status, details and the responses (raw bytes) it got."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes] = field(default_factory=list)
    seconds: float = 0.0


def invoke(channel: grpc.Channel, method: Method, payloads: list[bytes], timeout: float = CALL_TIMEOUT,
           paced: bool = False) -> Outcome:
    """Call method with raw request bytes (one for a unary request side), reading every response.

    paced: each stream request after the first waits for an answer to come back (at most PACE_S)."""
    start = time.monotonic()
    responses: list[bytes] = []
    cond = threading.Condition()
    ended = False

    def requests() -> Iterator[bytes]:
        seen = 0
        for i, p in enumerate(payloads):
            if paced and i:
                with cond:
                    cond.wait_for(lambda n=seen: ended or len(responses) > n, timeout=PACE_S)
            seen = len(responses)
            yield p

    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming
                                                                       else "unary")
    rpc = getattr(channel, kind)(method.path, request_serializer=None, response_deserializer=None)
    try:
        call = rpc(requests() if method.client_streaming else payloads[0], timeout=timeout)
        if method.server_streaming:
            for r in call:
                with cond:
                    responses.append(r)
                    cond.notify_all()
            code, details = call.code(), call.details() or ""
        else:
            responses.append(call)
            code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    finally:
        with cond:
            ended = True
            cond.notify_all()
    return Outcome(code, details, responses, time.monotonic() - start)


def verdict(method: Method, outcome: Outcome) -> list[str]:
    """What is wrong with how a call ended (empty when nothing)."""
    bad = []
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        bad.append(f"no final status within {CALL_TIMEOUT:.0f} s (a hang); details {outcome.details[:200]!r}")
    elif outcome.code not in ALLOWED:
        bad.append(f"status {outcome.code.name}: {outcome.details[:300]!r}")
    elif outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in outcome.details:
        bad.append(f"status RESOURCE_EXHAUSTED from the client's metadata limit (the server's status details are "
                   f"too large): {outcome.details[:300]!r}")
    for i, raw in enumerate(outcome.responses):
        try:
            resp = method.response.FromString(raw)
        except DecodeError:
            bad.append(f"response {i} does not parse as {method.response.DESCRIPTOR.full_name}: {raw[:80]!r}")
            continue
        code, text = in_stream_error(resp)
        if code is not None and code not in ALLOWED - {grpc.StatusCode.OK}:
            bad.append(f"in-stream error {code.name} in response {i}: {text[:300]!r}")
    return bad


def in_stream_error(resp: Message) -> tuple[grpc.StatusCode | None, str]:
    """The status code and text of an error answered inside a stream (native `error`, KServe `error_message`)."""
    if isinstance(resp, pb.SessionResponse):
        if resp.WhichOneof("kind") != "error":
            return None, ""
        return BY_VALUE.get(resp.error.code, grpc.StatusCode.UNKNOWN), f"code {resp.error.code}: {resp.error.message}"
    text = getattr(resp, "error_message", "")
    if not text:
        return None, ""
    return BY_NAME.get(text.split(":", 1)[0].strip(), grpc.StatusCode.UNKNOWN), text


def shorten(text: str, limit: int = 600) -> str:
    """Runs of one character collapsed to `c×N`, then cut to limit characters."""
    text = re.sub(r"(.)\1{15,}", lambda m: f"{m[1]}×{len(m[0])}", text, flags=re.DOTALL)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def show(method: Method, payloads: list[bytes]) -> str:
    """The requests of a call, readable: each parsed (one line) when it parses, and as bytes."""
    lines = []
    for i, raw in enumerate(payloads):
        try:
            msg = method.request.FromString(raw)
            parsed = "{" + text_format.MessageToString(msg, as_one_line=True) + "}"
        except DecodeError:
            parsed = "<does not parse>"
        lines.append(f"  [{i}] {shorten(parsed, 500)}\n      bytes ({len(raw)}): {shorten(repr(raw), 300)}")
    return "\n".join(lines) or "  (no requests)"


def check(server: Server, channel: grpc.Channel, method: Method, payloads: list[bytes],
          paced: bool = False) -> Outcome:
    """Call method and fail, naming method, input and status, if it ends badly or the server died."""
    out = invoke(channel, method, payloads, paced=paced)
    bad = verdict(method, out)
    if not server.alive():
        bad.append(f"the server exited with {server.proc.returncode}; log tail:\n{server.log_tail()}")
    how = f"{len(payloads)} request(s){', paced' if paced else ''}, {out.seconds:.1f} s"
    assert not bad, f"{method} ({how}):\n  " + "\n  ".join(bad) + \
        f"\ninput:\n{show(method, payloads)}"
    return out
