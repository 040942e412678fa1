"""Fork (one row copy, the same continuation) and the exact prefix-state cache (identical logits and state
with and without it, at token granularity, within its memory budget)."""
from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
from conftest import SessionStream, started
from rnnserve.server.app import App
from rnnserve.server.prefixes import PrefixCache
from rnnserve.server.settings import Settings

BIN = Path(sys.executable).parent


def serving(repo: Path, **kw):
    s = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=-1, poll_interval=0,
                                     session_store="memory"), **kw)
    return started(App(s))


def open_req(initial=pb.INITIAL_STATE_MODEL, state=()) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"), initial=initial, state=state))


async def step(stub, sid: str, ids: list[int], output=pb.OUTPUT_LAST) -> pb.FeedResult:
    return (await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=ids), output=output,
                                                                       logits=True)))).result


async def generate(stub, sid: str, **g) -> list[int]:
    st = SessionStream(stub)
    await st.send(resume=pb.Resume(session_id=sid))
    toks, _ = await st.generate(**g)
    await st.end()
    return toks


def test_a_fork_continues_exactly_as_its_source_would(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo) as (_app, _ch, stub):
            src = (await stub.OpenSession(open_req())).session_id
            await step(stub, src, [1, 2, 3])
            fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=src))
            assert fork.session_id != src and fork.steps == 3
            a = (await stub.GetState(pb.GetStateRequest(session_id=src)))
            b = (await stub.GetState(pb.GetStateRequest(session_id=fork.session_id)))
            assert (a.state, a.logits, a.steps) == (b.state, b.logits, b.steps)
            # both generate the same text at once (no feed), then go their own ways
            g = {"max_tokens": 25, "temperature": 0.9, "seed": 4}
            assert await generate(stub, src, **g) == await generate(stub, fork.session_id, **g)
            await step(stub, src, [5])
            assert (await stub.GetState(pb.GetStateRequest(session_id=fork.session_id))).steps == 28
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ForkSession(pb.ForkSessionRequest(session_id="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_rnn_client_fork_prints_the_new_id(tiny_repo: Path, tmp_path: Path) -> None:
    from test_durable import open_session, server
    from test_durable import step as unary_step

    with server(tiny_repo, tmp_path, "--session-store", "memory") as s:
        sid = open_session(s.stub)
        unary_step(s.stub, sid, [1, 2])
        r = subprocess.run([str(BIN / "rnn-client"), "--target", f"127.0.0.1:{s.port}", "fork", "--session", sid],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        new = r.stdout.strip()
        assert new and new != sid and s.stub.GetState(pb.GetStateRequest(session_id=new)).steps == 2


def test_prefix_cache_gives_identical_logits_and_state(tiny_repo: Path) -> None:
    """Sessions whose first feeds share a prefix get the same logits and state with the cache as without
    it (exact reuse: bitwise), only the rest is fed, and different starts never share an entry."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 40, 500).tolist()
    rests = [rng.integers(0, 40, int(n)).tolist() for n in (0, 1, 7, 50)]

    async def run(cache_mb: float) -> tuple[list, dict]:
        out = []
        async with serving(tiny_repo, prefix_cache_mb=cache_mb) as (app, _ch, stub):
            for initial, state in ((pb.INITIAL_STATE_MODEL, ()), (pb.INITIAL_STATE_ZEROS, ()),
                                   (pb.INITIAL_STATE_GIVEN, [0.25] * 32)):
                first = (await stub.OpenSession(open_req(initial, state))).session_id
                await step(stub, first, prompt)
                for rest in rests:
                    sid = (await stub.OpenSession(open_req(initial, state))).session_id
                    fed = await step(stub, sid, prompt + rest)
                    st = await stub.GetState(pb.GetStateRequest(session_id=sid))
                    out.append((list(fed.distributions[0].logits), list(st.state), st.steps, fed.fed))
            pc = app.engine.runner.prefixes
            return out, {"hits": pc.hits, "saved": pc.saved}

    with_cache, stats = asyncio.run(run(64))
    without, none = asyncio.run(run(0))
    assert with_cache == without  # bitwise: a cached state is exactly the state the feed would reach
    assert stats["hits"] == 3 * len(rests) and stats["saved"] >= 3 * len(rests) * len(prompt), stats
    assert none["hits"] == 0


def test_prefix_cache_is_exact_bounded_and_lru() -> None:
    pc = PrefixCache(budget=3 * (8 * 10 + 4 * 8 + 4 * 4 + 200))
    s, lg = np.ones(8, np.float32), np.ones(4, np.float32)
    a, b = np.arange(10), np.arange(10) + 1
    pc.put("m:1", "model", a, s, lg)
    assert pc.lookup("m:1", "model", np.concatenate([a, [5, 6]]))[0] == 10
    assert pc.lookup("m:1", "zeros", a)[0] == 0 and pc.lookup("m:2", "model", a)[0] == 0
    assert pc.lookup("m:1", "model", b)[0] == 0  # same length, other tokens: no hit
    assert pc.lookup("m:1", "model", a[:9])[0] == 0  # shorter than anything cached
    for i in range(5):
        pc.put("m:1", "model", np.arange(10) + 100 * i, s * i, lg)
    assert pc.nbytes <= pc.budget and len(pc.entries) == 3
    assert pc.lookup("m:1", "model", a)[0] == 0  # the oldest went first
