"""The SQLite session store: one file in --state-dir that one process owns, so a restart keeps every session.

All SQLite work runs in one dedicated thread that owns the connection; the event loop only awaits it.
The folder is locked (`flock` on `<state_dir>/lock`) for as long as the store is open, so a second server
on the same folder fails at start instead of corrupting the first one's sessions.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import Claim, SessionStore, StoreUnavailable
from .record import Record, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")

SWEEP_EVERY = 5.0  # seconds between lazy sweeps of expired rows (count() always sweeps)
SCHEMA = 1  # PRAGMA user_version of the file this module writes

_LIVE = "(expires = 0 OR expires >= ?)"  # a row that has not expired, given now
_TABLES = """
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, data BLOB NOT NULL, holder TEXT NOT NULL,
                                     epoch INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (key TEXT PRIMARY KEY, sid TEXT NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS aliases_sid ON aliases (sid);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
"""


class SQLiteStore(SessionStore):
    """Sessions in `<state_dir>/sessions.sqlite3` (WAL), owned by this one process."""

    shared = False

    def __init__(self, state_dir: Path, replica: str = "") -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "sessions.sqlite3"
        self.where = f"sqlite:{self.path}"
        self.replica = replica
        self._lock_fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # used only in the pool's one thread
        self._swept = 0.0

    # -- lifecycle

    async def start(self, on_release_request: Callable[[str], None]) -> None:
        """Lock the folder, learn this replica's id and open the database (release requests never come)."""
        if self._pool is not None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"{self.where}: cannot create the state folder: {e}") from e
        self._lock()
        try:
            if not self.replica:
                try:
                    self.replica = self._replica_id()
                except OSError as e:
                    raise StoreUnavailable(f"{self.where}: cannot read or write the replica id: {e}") from e
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rnnserve-sqlite")
            await self._run(self._open)
        except BaseException:
            await self.close()
            raise
        log.info("session store %s open (replica %s)", self.where, self.replica)

    async def close(self) -> None:
        """Close the connection, stop the thread and unlock the folder."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(pool, self._shut)
            except Exception:  # closing must not fail; the lock below is what matters
                log.warning("closing %s failed", self.where, exc_info=True)
            pool.shutdown(wait=False)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _lock(self) -> None:
        """Lock the folder and write our pid in the lock file; StoreUnavailable when another has it."""
        lock = self.state_dir / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreUnavailable(f"{self.where}: cannot open {lock}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise StoreUnavailable(f"{self.where}: cannot lock {lock}: {e}") from e
            raise StoreUnavailable(
                f"the state folder {self.state_dir} is in use by another rnnserve process (pid {pid}); "
                "give each server its own --state-dir, or share sessions between servers with "
                "--session-store redis://HOST:PORT/DB") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _replica_id(self) -> str:
        """This folder's replica id, from `<state_dir>/replica` (made once, with a random id)."""
        f = self.state_dir / "replica"
        try:
            rid = f.read_text().strip()
        except FileNotFoundError:
            rid = ""
        if not rid:
            rid = secrets.token_hex(8)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(rid + "\n")
            tmp.replace(f)
        return rid

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the store's thread; sqlite errors become StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable(f"{self.where}: the store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"{self.where}: {e}") from e
        except RuntimeError as e:  # the pool was shut down under us
            raise StoreUnavailable(f"{self.where}: the store is closed ({e})") from e

    # -- in the store's thread

    def _open(self) -> None:
        """Open the connection and make the tables."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise StoreUnavailable(f"{self.where}: database schema {version} is newer than this "
                                       f"rnnserve reads ({SCHEMA})")
            db.executescript(_TABLES)
            db.execute(f"PRAGMA user_version={SCHEMA}")
        except BaseException:
            db.close()
            raise
        self._db = db

    def _shut(self) -> None:
        """Fold the write-ahead log into the file (so a restart reads no big WAL first) and close."""
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("%s: checkpoint at close failed: %s", self.where, e)
            db.close()

    def _tx(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        """fn(db, now) in one write transaction (with a lazy sweep of expired rows)."""
        db = self._db
        if db is None:
            raise StoreUnavailable(f"{self.where}: the store is not open")
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            if now - self._swept >= SWEEP_EVERY:
                self._sweep(db, now)
            out = fn(db, now)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        """Delete expired sessions, expired aliases and the aliases of sessions that are gone."""
        n = db.execute("DELETE FROM sessions WHERE expires > 0 AND expires < ?", (now,)).rowcount
        db.execute("DELETE FROM aliases WHERE (expires > 0 AND expires < ?) "
                   "OR sid NOT IN (SELECT id FROM sessions)", (now,))
        if n:
            log.debug("%s: swept %d expired sessions", self.where, n)
        self._swept = now

    # -- the interface

    async def create(self, record: Record) -> int:
        """Write a new session held by this replica; returns its epoch (1, or one past a row it replaces)."""
        data, deadline = encode(record), record.deadline

        def run(db: sqlite3.Connection, now: float) -> int:
            row = db.execute("SELECT epoch FROM sessions WHERE id = ?", (record.id,)).fetchone()
            epoch = row[0] + 1 if row else 1
            db.execute("INSERT OR REPLACE INTO sessions (id, data, holder, epoch, expires) "
                       "VALUES (?, ?, ?, ?, ?)", (record.id, data, self.replica, epoch, deadline))
            return epoch

        return await self._run(self._tx, run)

    async def claim(self, session_id: str) -> Claim:
        """Take a session (no other process can hold one here, so any holder is a dead one)."""

        def run(db: sqlite3.Connection, now: float) -> tuple[int, bytes] | None:
            row = db.execute(f"SELECT data, epoch FROM sessions WHERE id = ? AND {_LIVE}",
                             (session_id, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE sessions SET holder = ?, epoch = ? WHERE id = ?",
                       (self.replica, row[1] + 1, session_id))
            return row[1] + 1, row[0]

        def claimed() -> Claim:
            got = self._tx(run)
            return Claim(found=False) if got is None else Claim(epoch=got[0], record=decode(got[1]))

        return await self._run(claimed)

    async def save(self, items: Sequence[tuple[Record, int]]) -> list[str]:
        """Write a batch in one transaction; returns the ids refused (stale epoch, released or gone)."""
        rows = [(r.id, encode(r), r.deadline, epoch) for r, epoch in items]
        if not rows:
            return []

        def run(db: sqlite3.Connection, now: float) -> list[str]:
            refused = []
            for sid, data, deadline, epoch in rows:
                cur = db.execute(f"UPDATE sessions SET data = ?, expires = ? WHERE id = ? AND epoch = ? "
                                 f"AND holder = ? AND {_LIVE}",
                                 (data, deadline, sid, epoch, self.replica, now))
                if cur.rowcount:
                    db.execute("UPDATE aliases SET expires = ? WHERE sid = ?", (deadline, sid))
                else:
                    refused.append(sid)
            return refused

        refused = await self._run(self._tx, run)
        if refused:
            log.debug("%s: save refused for %d sessions", self.where, len(refused))
        return refused

    async def release(self, session_id: str, epoch: int, record: Record | None = None) -> bool:
        """Write the final record (if given) and let the session go; False if the epoch is stale."""
        data = None if record is None else encode(record)
        deadline = None if record is None else record.deadline

        def run(db: sqlite3.Connection, now: float) -> bool:
            cur = db.execute("UPDATE sessions SET holder = '', data = COALESCE(?1, data), "
                             "expires = COALESCE(?2, expires) "
                             "WHERE id = ?3 AND epoch = ?4 AND (expires = 0 OR expires >= ?5)",
                             (data, deadline, session_id, epoch, now))
            if cur.rowcount and deadline is not None:
                db.execute("UPDATE aliases SET expires = ? WHERE sid = ?", (deadline, session_id))
            return cur.rowcount > 0

        return await self._run(self._tx, run)

    async def release_all(self, items: Sequence[tuple[str, int]]) -> None:
        """Let many sessions go in one transaction (shutdown)."""
        def run(db: sqlite3.Connection, now: float) -> None:
            db.executemany("UPDATE sessions SET holder = '' WHERE id = ? AND epoch = ?", list(items))

        await self._run(self._tx, run)

    async def delete(self, session_id: str, epoch: int) -> None:
        """Remove a session and its aliases while `epoch` is current."""

        def run(db: sqlite3.Connection, now: float) -> None:
            if db.execute("DELETE FROM sessions WHERE id = ? AND epoch = ?", (session_id, epoch)).rowcount:
                db.execute("DELETE FROM aliases WHERE sid = ?", (session_id,))

        await self._run(self._tx, run)

    async def ask_release(self, session_id: str, holder: str) -> None:
        """Never needed: no other process holds sessions of this store."""
        log.debug("%s: ask_release(%s, %s) ignored (the store is not shared)", self.where, session_id, holder)

    async def count(self) -> int:
        """Sessions that have not expired (the lazy sweep runs with the writes, not here)."""

        def run(db: sqlite3.Connection, now: float) -> int:
            return int(db.execute(f"SELECT COUNT(*) FROM sessions WHERE {_LIVE}", (now,)).fetchone()[0])

        return await self._run(self._tx, run)

    async def get_alias(self, key: str) -> str | None:
        """The session an alias names, while that session lives."""

        def run() -> str | None:
            assert self._db is not None
            row = self._db.execute(
                "SELECT a.sid FROM aliases a JOIN sessions s ON s.id = a.sid WHERE a.key = ?1 "
                "AND (a.expires = 0 OR a.expires >= ?2) AND (s.expires = 0 OR s.expires >= ?2)",
                (key, time.time())).fetchone()
            return None if row is None else str(row[0])

        return await self._run(run)

    async def set_alias(self, key: str, session_id: str, idle_timeout: float) -> None:
        """Point an alias at a session; it names it while the session lives (its expiry follows it)."""

        def run(db: sqlite3.Connection, now: float) -> None:
            row = db.execute("SELECT expires FROM sessions WHERE id = ?", (session_id,)).fetchone()
            expires = row[0] if row else now + idle_timeout if idle_timeout > 0 else 0.0
            db.execute("INSERT OR REPLACE INTO aliases (key, sid, expires) VALUES (?, ?, ?)",
                       (key, session_id, expires))

        await self._run(self._tx, run)

    async def del_alias(self, key: str, session_id: str | None = None) -> None:
        """Remove an alias (only if it still names `session_id`, when given)."""

        def run(db: sqlite3.Connection, now: float) -> None:
            if session_id is None:
                db.execute("DELETE FROM aliases WHERE key = ?", (key,))
            else:
                db.execute("DELETE FROM aliases WHERE key = ? AND sid = ?", (key, session_id))

        await self._run(self._tx, run)
