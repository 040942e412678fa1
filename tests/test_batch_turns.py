"""--batch-turns: a lone queued single-token step waits some event-loop turns, while other sessions step,
for the calls that have already arrived (gRPC admits unary calls one per turn), so they share its
onnxruntime call. How many turns: 3 per session stepping lately (server/company.py), at most the flag.
In-process servers on the tiny models (conftest), answers checked against a plain onnxruntime loop.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import Reference
from rnnserve.server.settings import parse
from test_server import serving


@pytest.mark.parametrize("turns, calls", [(0, 2), (20, 1)])
def test_batch_turns_let_a_step_that_arrives_turns_later_join_the_batch(tiny_repo: Path, turns: int,
                                                                        calls: int) -> None:
    """--batch-turns: a lone queued step waits that many event-loop turns, so a step arriving two turns
    later (as gRPC admits unary calls, one per turn) shares its onnxruntime call; 0 steps it alone. The
    answers are exact either way."""
    async def main() -> None:
        async with serving(tiny_repo, batch_turns=turns) as (app, _c, _stub):
            eng = app.engine
            a, b = (await eng.open("tiny")).session_id, (await eng.open("tiny")).session_id
            batcher = eng.batchers[eng.model("tiny")]
            batcher.company.until = float("inf")  # several sessions stepping: no direct path for a lone step

            async def later() -> np.ndarray:
                for _ in range(2):
                    await asyncio.sleep(0)
                return (await eng.feed(b, [3])).logits

            before = batcher.batches
            ra, rb = await asyncio.gather(eng.feed(a, [5]), later())
            assert batcher.batches - before == calls
            for ids, got in (([5], ra.logits), ([3], rb)):
                ref = Reference(tiny_repo)
                np.testing.assert_array_equal(got, ref.feed(ids)[-1:])

    asyncio.run(main())


def test_a_lone_session_never_waits_batch_turns(tiny_repo: Path) -> None:
    """With --inline-rows 0 every step goes through the batcher, but one session stepping alone has nobody
    to wait for: the batcher starts its step within a few loop turns, not after --batch-turns of them (the
    onnxruntime call then runs in its thread, for as many turns as the machine makes it take)."""
    async def main() -> None:
        async with serving(tiny_repo, batch_turns=1000, inline_rows=0) as (app, _c, _stub):
            sid, ref = (await app.engine.open("tiny")).session_id, Reference(tiny_repo)
            batcher = app.engine.batchers[app.engine.model("tiny")]
            for ids in ([5], [3], [7]):
                feed, turns = asyncio.ensure_future(app.engine.feed(sid, ids)), 0
                while not (batcher._running or feed.done()):  # until the batcher's iteration has begun
                    await asyncio.sleep(0)
                    turns += 1
                assert turns < 1000, turns
                await feed
                np.testing.assert_array_equal(feed.result().logits[-1:], ref.feed(ids)[-1:])
                await asyncio.sleep(0.01)  # past the window in which another session's step would count

    asyncio.run(main())


def test_a_lone_queued_step_waits_a_few_turns_for_one_other_session(tiny_repo: Path) -> None:
    """With --batch-turns 1000 and one other session stepping, a lone queued step waits 3 loop turns per
    session stepping lately (2 here, so 6; 3 if the count's 50 ms window has just rolled), not 1000."""
    async def main() -> None:
        async with serving(tiny_repo, batch_turns=1000) as (app, _c, _stub):
            eng = app.engine
            a, b = (await eng.open("tiny")).session_id, (await eng.open("tiny")).session_id
            batcher = eng.batchers[eng.model("tiny")]
            for s in (a, b):  # past the first feed, which the prefix cache may answer without a step
                await eng.feed(s, [1])
            await eng.feed(b, [3])
            batcher.company.until = float("inf")  # b keeps stepping: no direct path for a's step
            feed, turns = asyncio.ensure_future(eng.feed(a, [5])), 0
            while not (batcher._running or feed.done()):  # until the batcher's iteration has begun
                await asyncio.sleep(0)
                turns += 1
            await feed
            assert 3 <= turns <= 6 + 5, turns

    asyncio.run(main())


def test_company_counts_the_sessions_stepping_lately() -> None:
    """3 turns per session seen in the current or the last 50 ms window, at most the cap; a different
    session within 5 ms means others are stepping (no direct path until 5 ms after it)."""
    from rnnserve.server.company import ACTIVE_S, ALONE_S, Company

    c, t = Company(), 1000.0
    c.saw("a", t)
    assert c.turns(1000) == 3 and c.until == 0.0  # alone so far
    c.saw("b", t + 0.001)
    assert c.turns(1000) == 6 and c.until == t + 0.001 + ALONE_S
    c.saw("a", t + 0.002)  # a session seen twice counts once
    assert c.turns(1000) == 6
    for i in range(14):
        c.saw(f"s{i}", t + 0.003)
    assert c.turns(1000) == 48 and c.turns(40) == 40 and c.turns(0) == 0
    c.saw("a", t + ACTIVE_S + 0.01)  # a new window: the last one's 16 still count
    assert c.turns(1000) == 48
    c.saw("a", t + 2 * ACTIVE_S + 0.02)  # and then only the one of the window before
    assert c.turns(1000) == 3


def test_batch_turns_is_read_from_its_flag_or_env_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse([], {}).batch_turns == 40
    assert parse([], {"RNNSERVE_BATCH_TURNS": "0"}).batch_turns == 0
    assert parse(["--batch-turns", "3"], {"RNNSERVE_BATCH_TURNS": "0"}).batch_turns == 3
    for bad in ("-1", "1001"):
        with pytest.raises(SystemExit) as e:
            parse(["--batch-turns", bad], {})
        assert e.value.code == 2
        assert f"--batch-turns must be between 0 and 1000, got {bad}" in capsys.readouterr().err
