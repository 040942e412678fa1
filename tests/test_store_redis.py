"""The Redis session store's own cases against a real redis-server process (conftest's redis_server): the
URL shown without its password, a fast failure when nothing listens, claim races with one winner, hand-offs
between replicas, and outages (the server stopped, killed and started again on the same port). What both
backends share is in test_store.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
from conftest import RedisServer
from rnnserve.server.store import Claim, StoreUnavailable
from rnnserve.server.store.redis import RedisStore, redact
from test_store import record, run, same, started


def test_redis_where_has_no_password() -> None:
    assert redact("redis://:s3cret@h:6379/2") == "redis://h:6379/2"
    assert redact("rediss://u:s3cret@h:6380/0") == "rediss://u@h:6380/0"
    assert redact("unix:///run/redis.sock?db=3&password=s3cret") == "unix:///run/redis.sock?db=3"
    assert RedisStore("redis://:pw@localhost:1/0").where == "redis://localhost:1/0"


def test_redis_down_at_start_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed

    async def main() -> None:
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"redis at redis://127.0.0.1:{port}/0"):
            await RedisStore(f"redis://:pw@127.0.0.1:{port}/0").start(lambda sid: None)
        assert time.monotonic() - t < 2.0
    run(main)


def test_redis_claim_race_has_one_winner(redis_url: str) -> None:
    async def main() -> None:
        a, b = await started(RedisStore(redis_url, "A")), await started(RedisStore(redis_url, "B"))
        try:
            r = record()
            assert await a.release(r.id, await a.create(r))
            epoch, wins = 1, {"A": 0, "B": 0}
            for _ in range(200):
                ca, cb = await asyncio.gather(a.claim(r.id), b.claim(r.id))
                (won, c), (_, other) = sorted([(a, ca), (b, cb)], key=lambda x: -x[1].epoch)
                assert c.epoch == epoch + 1 and other.epoch == 0 and other.holder == won.replica
                epoch = c.epoch
                wins[won.replica] += 1
                assert await won.release(r.id, c.epoch)
            assert sum(wins.values()) == 200
        finally:
            await a.close()
            await b.close()
    run(main)


def test_redis_hand_offs(redis_url: str, redis_server: RedisServer) -> None:
    async def main() -> None:
        asked: list[str] = []
        a = await started(RedisStore(redis_url, "A"), asked.append)
        b = await started(RedisStore(redis_url, "B"))
        try:
            r1, r2 = record(), record()
            e1, e2 = await a.create(r1), await a.create(r2)
            assert await b.claim(r1.id) == Claim(holder="A")
            # asking: the holder's callback hears it, releases, the asker's next claim wins
            await b.ask_release(r1.id, "A")
            for _ in range(50):
                if asked:
                    break
                await asyncio.sleep(0.02)
            assert asked == [r1.id]
            assert await a.release(r1.id, e1, r1)
            assert (await b.claim(r1.id)).epoch == e1 + 1
            # the holder's heartbeat lapses (stopped without deleting it, as a hung process would)
            a._tasks[0].cancel()
            await asyncio.sleep(3.3)
            c = await b.claim(r2.id)
            assert c.epoch == e2 + 1
            same(c.record, r2)
            assert await a.save([(r2, e2)]) == [r2.id]  # the old holder is fenced off
        finally:
            await a.close()
        # a closed replica's sessions are free at once (its heartbeat is deleted)
        c = await started(RedisStore(redis_url, "C"))
        try:
            r3 = record()
            e3 = await c.create(r3)
            assert await b.claim(r3.id) == Claim(holder="C")
            await c.set_alias("seq", r3.id, 1)  # the alias key expires with its session, not in 1 s
            with redis_server.client() as sync:
                assert sync.exists("rnnserve:r:C") and sync.pttl("rnnserve:r:C") > 1000
                assert sync.pttl("rnnserve:a:seq") > 600_000 and sync.pttl("rnnserve:s:" + r3.id) > 600_000
            await c.close()
            assert (await b.claim(r3.id)).epoch == e3 + 1
            assert b.shared and b.where == redis_url
        finally:
            await c.close()
            await b.close()
    run(main)


def test_redis_outage_and_recovery(redis_url: str, redis_server: RedisServer) -> None:
    async def main() -> None:
        asked: list[str] = []
        a = await started(RedisStore(redis_url, "A"), asked.append)
        b = await started(RedisStore(redis_url, "B"))
        try:
            assert redis_server.proc is not None
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            t = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"redis at redis://127\.0\.0\.1:\d+/0"):
                await a.claim("anything")
            assert time.monotonic() - t < 4.0
            redis_server.kill()
            t = time.monotonic()
            with pytest.raises(StoreUnavailable):  # refused outright while nothing listens
                await a.create(record())
            assert time.monotonic() - t < 2.0
            redis_server.start()  # a new, empty server on the same port
            r = record()
            assert await a.create(r) == 1  # commands work at once
            with redis_server.client() as sync:  # the heartbeats are back within a retry or two ...
                for _ in range(40):
                    if sync.exists("rnnserve:r:A", "rnnserve:r:B") == 2:
                        break
                    await asyncio.sleep(0.1)
                assert sync.exists("rnnserve:r:A", "rnnserve:r:B") == 2
            assert await b.claim(r.id) == Claim(holder="A")
            for _ in range(60):  # ... and so is its subscription (a request sent before it is lost)
                await b.ask_release(r.id, "A")
                await asyncio.sleep(0.1)
                if asked:
                    break
            assert asked and set(asked) == {r.id}
        finally:
            await a.close()
            await b.close()
    run(main)
