"""The session stores against real backends: SQLite files in tmp_path and a real redis-server process
(conftest's redis_server).

The shared behaviour (round trips, fencing, expiry, aliases) runs on both backends; then SQLite's folder
lock and restart. Redis's own cases (claim races, hand-offs between replicas, outages) are in
test_store_redis.py, which shares this file's record helpers.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server.store import Claim, Record, SessionStore
from rnnserve.server.store.redis import RedisStore
from rnnserve.server.store.sqlite import SQLiteStore

REPO = Path(__file__).resolve().parents[1]


Factory = Callable[..., SessionStore]


@pytest.fixture(params=["sqlite", "redis"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Make a (not yet started) store of the backend under test."""
    if request.param == "sqlite":
        return lambda replica="": SQLiteStore(tmp_path / "state", replica)
    url = request.getfixturevalue("redis_url")
    return lambda replica="": RedisStore(url, replica)


def record(sid: str = "", *, steps: int = 1, idle: float = 600.0, logits: bool = True,
           seed: int = 0) -> Record:
    """A record with awkward floats (NaN payloads, -0, denormals, inf) that must come back bit for bit."""
    rng = np.random.default_rng(seed)
    state = rng.standard_normal(40).astype(np.float32)
    odd = [0x7FC00001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000]  # NaNs, -0, a denormal, inf
    state[:5] = np.array(odd, np.uint32).view(np.float32)
    lg = rng.standard_normal(17).astype(np.float32) if logits else None
    return Record(id=sid or uuid.uuid4().hex, model="tiny", version=3, state=state, logits=lg, steps=steps,
                  principal="alice", idle_timeout=idle, touched=time.time())


def same(a: Record | None, b: Record) -> None:
    """Two records are equal, their arrays bit for bit."""
    assert a is not None
    assert a.state.tobytes() == b.state.tobytes() and a.state.dtype == np.float32
    assert (a.logits is None) == (b.logits is None)
    if b.logits is not None:
        assert a.logits is not None and a.logits.tobytes() == b.logits.tobytes()
    assert (a.id, a.model, a.version, a.steps, a.principal, a.idle_timeout, a.touched) == \
        (b.id, b.model, b.version, b.steps, b.principal, b.idle_timeout, b.touched)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    """Run a test body on a fresh event loop."""
    asyncio.run(fn())  # type: ignore[arg-type]


async def started(store: SessionStore, on_release: Callable[[str], None] | None = None) -> SessionStore:
    """The store, started."""
    await store.start(on_release or (lambda sid: None))
    return store


# -- both backends


def test_round_trips(new_store: Factory) -> None:
    async def main() -> None:
        s = await started(new_store())
        try:
            r1, r2, r3 = record(seed=1), record(seed=2, steps=5), record(seed=3, steps=9, logits=False)
            r2, r3 = (replace(r, id=r1.id) for r in (r2, r3))
            assert await s.count() == 0
            assert await s.create(r1) == 1
            assert await s.count() == 1
            c = await s.claim(r1.id)
            assert c.epoch == 2 and c.found and not c.holder
            same(c.record, r1)
            assert await s.save([(r2, 2)]) == []
            c = await s.claim(r1.id)
            assert c.epoch == 3
            same(c.record, r2)
            assert await s.release(r1.id, 3, r3)
            c = await s.claim(r1.id)
            assert c.epoch == 4
            same(c.record, r3)
            assert await s.release(r1.id, 4)  # no record: the last one stays
            c = await s.claim(r1.id)
            same(c.record, r3)
            # a batch of several sessions, one of them unknown
            others = [record(seed=10 + i) for i in range(5)]
            epochs = [await s.create(r) for r in others]
            ghost = record()
            assert await s.save([*zip(others, epochs), (ghost, 1)]) == [ghost.id]
            assert await s.count() == 6
            # aliases
            assert await s.get_alias("seq-1") is None
            await s.set_alias("seq-1", r1.id, 600)
            await s.set_alias("seq-2", others[0].id, 0)
            assert await s.get_alias("seq-1") == r1.id and await s.get_alias("seq-2") == others[0].id
            await s.del_alias("seq-1", others[0].id)  # names another session: stays
            assert await s.get_alias("seq-1") == r1.id
            await s.del_alias("seq-1", r1.id)
            await s.del_alias("seq-2")
            assert await s.get_alias("seq-1") is None and await s.get_alias("seq-2") is None
            # delete takes the session and the aliases naming it
            await s.set_alias("seq-3", r1.id, 600)
            await s.delete(r1.id, c.epoch)
            assert await s.claim(r1.id) == Claim(found=False)
            assert await s.get_alias("seq-3") is None
            assert await s.count() == 5
            assert await s.claim("never-written") == Claim(found=False)
            await s.ask_release(r1.id, "nobody")  # no one listens: nothing happens
        finally:
            await s.close()
    run(main)


def test_release_all_lets_every_session_go_at_once(new_store: Factory) -> None:
    """Shutdown's batch release: each session released while its epoch is current, a stale one untouched."""
    async def main() -> None:
        s = await started(new_store())
        try:
            recs = [record() for _ in range(150)]
            epochs = [await s.create(r) for r in recs]
            stale = (await s.claim(recs[0].id)).epoch  # recs[0] moved on: its old epoch is stale
            await s.release_all([(r.id, e) for r, e in zip(recs, epochs)])
            assert await s.save([(recs[1], epochs[1])]) == [recs[1].id]  # released: no longer ours
            assert await s.save([(recs[0], stale)]) == []  # the stale release did not touch it
        finally:
            await s.close()
    run(main)


def test_stale_epoch_is_refused(new_store: Factory) -> None:
    async def main() -> None:
        s = await started(new_store())
        try:
            r = record()
            old = await s.create(r)
            new = (await s.claim(r.id)).epoch  # another claim: `old` is stale now
            assert new == old + 1
            assert await s.save([(r, old)]) == [r.id]
            assert not await s.release(r.id, old, record(r.id, seed=7))
            await s.delete(r.id, old)
            c = await s.claim(r.id)
            assert c.epoch == new + 1
            same(c.record, r)  # nothing stale was written, nothing deleted
            assert await s.release(r.id, c.epoch)
            assert await s.save([(r, c.epoch)]) == [r.id]  # released: no longer ours to write
        finally:
            await s.close()
    run(main)


def test_expiry(new_store: Factory) -> None:
    async def main() -> None:
        s = await started(new_store())
        try:
            short, forever = record(idle=0.8), record(idle=0)
            e = await s.create(short)
            await s.create(forever)
            await s.set_alias("short", short.id, 0.8)
            await s.set_alias("forever", forever.id, 0)
            assert await s.count() == 2 and await s.get_alias("short") == short.id
            past = replace(record(), touched=time.time() - 10, idle_timeout=5)
            await s.create(past)  # written already expired: absent at once
            assert await s.claim(past.id) == Claim(found=False)
            assert await s.count() == 2
            await asyncio.sleep(1.0)
            assert await s.count() == 1
            assert await s.claim(short.id) == Claim(found=False)
            assert await s.get_alias("short") is None
            assert await s.save([(short, e)]) == [short.id]
            assert not await s.release(short.id, e)
            assert await s.get_alias("forever") == forever.id
            assert (await s.claim(forever.id)).epoch == 2
        finally:
            await s.close()
    run(main)


def test_saves_keep_aliases_alive(new_store: Factory) -> None:
    async def main() -> None:
        s = await started(new_store())
        try:
            r = replace(record(), touched=time.time() - 100, idle_timeout=100.5)  # expires in 0.5 s ...
            e = await s.create(r)
            await s.set_alias("seq", r.id, 0.5)
            assert await s.save([(replace(r, touched=time.time()), e)]) == []  # ... no: in 100 s now
            await asyncio.sleep(0.7)
            assert await s.get_alias("seq") == r.id
            assert (await s.claim(r.id)).epoch == e + 1
        finally:
            await s.close()
    run(main)


# -- SQLite


def test_sqlite_folder_belongs_to_one_process(tmp_path: Path) -> None:
    async def main() -> None:
        s = await started(SQLiteStore(tmp_path / "state"))
        try:
            code = ("import asyncio; from pathlib import Path\n"
                    "from rnnserve.server.store.sqlite import SQLiteStore\n"
                    f"asyncio.run(SQLiteStore(Path({str(tmp_path / 'state')!r})).start(print))")
            out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True,
                                          text=True, timeout=60, cwd=REPO)
            assert out.returncode != 0
            assert "StoreUnavailable" in out.stderr and str(tmp_path / "state") in out.stderr
            assert f"pid {os.getpid()}" in out.stderr
            assert "--state-dir" in out.stderr and "--session-store redis://" in out.stderr
        finally:
            await s.close()
        s = await started(SQLiteStore(tmp_path / "state"))  # the lock went with close()
        await s.close()
    run(main)


def test_sqlite_restart_claims_old_sessions_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        s = await started(SQLiteStore(tmp_path / "state"))
        rs = [record(seed=i) for i in range(3)]
        epochs = [await s.create(r) for r in rs]
        held = (await s.claim(rs[0].id)).epoch  # held, never released: the process "dies" holding it
        await s.close()
        s2 = await started(SQLiteStore(tmp_path / "state"))
        try:
            assert s2.replica == s.replica and len(s2.replica) >= 8
            for r, e in zip(rs, [held, *epochs[1:]]):
                c = await s2.claim(r.id)
                assert c.epoch == e + 1
                same(c.record, r)
            assert await s2.count() == 3
        finally:
            await s2.close()
        with sqlite3.connect(tmp_path / "state" / "sessions.sqlite3") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        named = await started(SQLiteStore(tmp_path / "state", "given"))
        try:
            assert named.replica == "given" and named.where.startswith("sqlite:")
            assert not named.shared
        finally:
            await named.close()
    run(main)


# -- Redis
