"""Session stores: where a session's state lives between requests, across restarts and replicas.

`memory` keeps sessions in the process alone (what an embedded App uses by default); `sqlite` (the
default of `rnn-serve`) is a file in --state-dir that one process owns, so a restart keeps every
session; `redis://HOST:PORT/DB` is shared by many replicas, which hand sessions to each other.
"""
from __future__ import annotations

from pathlib import Path

from .base import Claim, SessionStore, StoreUnavailable
from .record import Record, RecordError, decode, encode

__all__ = ["Claim", "Record", "RecordError", "SessionStore", "StoreUnavailable", "decode", "encode", "open_store"]


def open_store(url: str, state_dir: Path, replica: str = "") -> SessionStore | None:
    """The store a --session-store value names (None for `memory`); ValueError for one it does not know."""
    if url == "memory":
        return None
    if url == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(Path(state_dir), replica)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, replica)
    raise ValueError(f"--session-store must be memory, sqlite or redis://HOST:PORT/DB, got {url!r}")
