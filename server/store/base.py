"""The session store's one small interface: records, ownership with epochs (fencing), aliases.

A session is held by one replica (server process) at a time. Holding it is a claim with an epoch
that grows by one at every claim, so a replica that lost a session (taken over while it was paused
or cut off) can never overwrite the newer state: every write names its epoch and a stale one is
refused. A replica keeps a heartbeat in the store while it runs; a session whose holder has no
heartbeat is free to take. To take a session a live replica holds, a replica asks it to release
(`ask_release`); the holder finishes what runs on the session, writes it, releases it and ends its
own stream for it, and the asker's next claim succeeds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .record import Record


class StoreUnavailable(Exception):
    """The store cannot be reached (or answered with an error); the message says which and where."""


@dataclass(frozen=True)
class Claim:
    """What claiming a session gave: ours (epoch > 0, with the last record written), held by a live
    replica elsewhere (holder), or not in the store at all (found False: never written, closed or expired)."""

    epoch: int = 0
    record: Record | None = None
    holder: str = ""
    found: bool = True


class SessionStore(ABC):
    """Where sessions live between requests, across restarts and, when shared, across replicas."""

    #: this process's id as a holder of sessions
    replica: str = ""
    #: whether other processes may hold sessions of this store (so hand-offs can happen)
    shared: bool = False
    #: a short description for logs and errors ("sqlite:/path", "redis://host:port/db")
    where: str = ""

    def lease_ok(self) -> bool:
        """Whether this replica's heartbeat is surely alive in the store now (its claims stand); a store
        that is not shared has no lease to lose."""
        return True

    @abstractmethod
    async def start(self, on_release_request: Callable[[str], None]) -> None:
        """Connect, start this replica's heartbeat, and call on_release_request(session id) whenever
        another replica asks this one to release a session (from the event loop)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the heartbeat and disconnect (sessions still held become free once it has lapsed)."""

    @abstractmethod
    async def create(self, record: Record) -> int:
        """Write a new session held by this replica; returns its epoch (1)."""

    @abstractmethod
    async def claim(self, session_id: str) -> Claim:
        """Take a session that is free, already ours, or held by a replica with no heartbeat (epoch + 1)."""

    @abstractmethod
    async def save(self, items: Sequence[tuple[Record, int]]) -> list[str]:
        """Write (record, epoch) pairs of sessions this replica holds, in one batch; returns the ids refused
        because their epoch is stale (another replica has claimed them since) or they are gone."""

    @abstractmethod
    async def release(self, session_id: str, epoch: int, record: Record | None = None) -> bool:
        """Write the final record (if given) and let the session go, so another replica can claim it at
        once; False (nothing written) if the epoch is stale."""

    async def release_all(self, items: Sequence[tuple[str, int]]) -> None:
        """Let many sessions go at once (shutdown), each while its epoch is current; stores may batch it."""
        for sid, epoch in items:
            await self.release(sid, epoch)

    @abstractmethod
    async def delete(self, session_id: str, epoch: int) -> None:
        """A session closed or expired: remove it (only while `epoch` is current)."""

    @abstractmethod
    async def ask_release(self, session_id: str, holder: str) -> None:
        """Ask the live replica `holder` to release a session (it finishes the work under way first)."""

    @abstractmethod
    async def count(self) -> int:
        """Sessions in the store that have not expired."""

    @abstractmethod
    async def get_alias(self, key: str) -> str | None:
        """The session id an alias names (a KServe sequence id, per model and principal), if any."""

    @abstractmethod
    async def set_alias(self, key: str, session_id: str, idle_timeout: float) -> None:
        """Point an alias at a session (expiring with it)."""

    @abstractmethod
    async def del_alias(self, key: str, session_id: str | None = None) -> None:
        """Remove an alias (only if it still names `session_id`, when given)."""
