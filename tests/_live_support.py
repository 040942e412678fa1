"""What the live-repository tests share: an in-process server watching a repository and waits on what a
client can see (their repositories are conftest's live_ckpts and live_three, their reference loop conftest's
Reference).

Servers run in-process on 127.0.0.1 port 0 and poll every POLL seconds; every wait is on something a
client can see (ListModels, health, a log record) with a deadline; the only fixed waits are a few
poll intervals where the point is that nothing happens (no second log line).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
from conftest import TINY_TEXT, SessionStream, started
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.server.app import App
from rnnserve.server.settings import parse

BIN = Path(sys.executable).parent
VOCAB = sorted(set(TINY_TEXT))
POLL = 0.2  # --poll-interval of every watching server here
NF = grpc.StatusCode.NOT_FOUND
SERVING = health_pb2.HealthCheckResponse.SERVING


def settings(repo: Path, *flags: str):
    """Settings through the real flag parser, on 127.0.0.1 port 0 with no metrics port."""
    return parse(["--models", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
                  "--poll-interval", str(POLL), "--session-store", "memory", *flags], {})


@asynccontextmanager
async def serving(repo: Path, *flags: str, **kw):
    """An App (native + KServe) on an ephemeral port with a channel and a native stub."""
    app = App(dataclasses.replace(settings(repo, *flags), **kw))
    async with started(app) as running:
        yield running


async def listed(stub: pb_grpc.RnnServeStub) -> dict[tuple[str, int], bool]:
    """ListModels as {(name, version): latest}."""
    return {(m.name, m.version): m.latest for m in (await stub.ListModels(pb.ListModelsRequest())).models}


async def lists(stub: pb_grpc.RnnServeStub, want: dict[tuple[str, int], bool]) -> bool:
    """Whether ListModels shows exactly `want`."""
    return await listed(stub) == want


async def holds(value: bool) -> bool:
    """A plain value as a condition for until()."""
    return value


async def until(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    """Wait for an observable condition, failing with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)


async def health(ch: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))).status


def opened(stub: pb_grpc.RnnServeStub, name: str, version: int = 0):
    return stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=name, version=version))))


def feed_req(ids: list[int]) -> pb.Feed:
    return pb.Feed(tokens=pb.TokenIds(ids=ids), output=pb.OUTPUT_ALL, logits=True)


def logits_of(result: pb.FeedResult) -> np.ndarray:
    return np.array([d.logits for d in result.distributions], np.float32)  # (n, V)


class Stream(SessionStream):
    """A SessionStream for well-formed requests only: an error answer fails the test on the spot."""

    async def send(self, **kind) -> pb.SessionResponse:
        resp = await super().send(**kind)
        assert resp.WhichOneof("kind") != "error", resp
        return resp


def copy_version(src: Path, dst: Path, version: int) -> Path:
    """A copy of a version folder renumbered (model.json `version` follows the folder name)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    (dst / "model.json").write_text(json.dumps({**meta, "version": version}))
    return dst

