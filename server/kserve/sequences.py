"""Triton sequence (correlation) ids, per model, mapped onto the engine's sessions.

A sequence is an ordinary engine session (same batching, idle timeout and cap as the native
protocol); this table only remembers which session a (model, sequence id) names, keeps each
sequence's requests in arrival order, and remembers why an id is gone (ended, expired), so
a request without START can be told exactly what happened.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..engine import Engine
from ..errors import InvalidArgument, NotFound, shown
from ..repository import ModelVersion
from .codec import Sequence

log = logging.getLogger(__name__)

Key = tuple[str, int | str, str]  # (model name, sequence id, principal): each principal has its own ids
TOMBSTONES = 65536  # how many gone sequence ids we remember, to say why they are gone ...
TOMBSTONE_BYTES = 8 << 20  # ... and how many bytes of ids and reasons at most
SWEEP_FLOOR = 1024  # look for sessions expired under us once the table doubles past this


@dataclass
class Step:
    """What one request on a sequence (or a stateless request) produced."""

    model: ModelVersion
    logits: np.ndarray  # (T, V)
    state: np.ndarray | None  # (S,) when asked for
    restarted: bool = False  # START on an id that was live: the old session was closed
    session_id: str = ""  # the engine session (set on START)
    held: str = ""  # the engine session the request ran on (unless the sequence ended with it)
    forecast: np.ndarray | None = None  # (H, O) a forecaster's rollout when the request set `horizon`


def describe(key: Key) -> str:
    """'sequence id 7 of model "tiny"' (string ids quoted, so 7 and "7" read differently; long ones cut)."""
    return f"sequence id {shown(key[1])} of model {shown(key[0])}"


def _alias(key: Key) -> str:
    """The store's name for a principal's sequence id (typed, so 7 and "7" stay apart)."""
    return "kserve/" + json.dumps([key[2], key[0], key[1]])


def _size(key: Key, why: str) -> int:
    return len(key[0]) + (len(key[1]) if isinstance(key[1], str) else 8) + len(why) + 64


class Sequences:
    """(model, sequence id) -> engine session id, with per-sequence ordering and tombstones."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: dict[Key, str] = {}
        self.gone: OrderedDict[Key, tuple[str, float]] = OrderedDict()  # why, when (wall clock)
        self._gone_bytes = 0
        self._tails: dict[Key, asyncio.Future] = {}
        self._sweep_at = SWEEP_FLOOR

    # -- ordering ---------------------------------------------------------------------------------
    async def run(self, key: Key, seq: Sequence, name: str, version: int, tokens_of, want_state: bool,
                  horizon: int = 0) -> Step:
        """Run one request of a sequence after the earlier ones of the same sequence (any stream)."""
        prev = self._tails.get(key)
        fut = asyncio.get_running_loop().create_future()
        self._tails[key] = fut
        try:
            if prev is not None and not prev.done():
                await prev
            return await self._step(key, seq, name, version, tokens_of, want_state, horizon)
        finally:
            if prev is None or prev.done():
                fut.set_result(None)
            else:  # cancelled while waiting: keep the order for those queued behind us
                prev.add_done_callback(lambda _f: fut.done() or fut.set_result(None))
            if self._tails.get(key) is fut:
                del self._tails[key]

    # -- one step -----------------------------------------------------------------------------------
    async def _step(self, key: Key, seq: Sequence, name: str, version: int, tokens_of,
                    want_state: bool, horizon: int = 0) -> Step:
        eng = self.engine
        restarted = False
        sid = self.live.get(key) or await eng.alias(_alias(key))  # here, or in the shared store
        if seq.start:
            mv = eng.model(name, version)
            tokens = tokens_of(mv)  # validate before touching the old session
            if sid is not None:
                try:
                    await eng.close(sid)
                    restarted = True
                    log.info("%s restarted by sequence_start while live (old session closed)", describe(key))
                except NotFound:
                    pass  # expired meanwhile: a plain start
                self.live.pop(key, None)
            sid = (await eng.open(name, mv.version)).session_id
            self.live[key] = sid
            await eng.set_alias(_alias(key), sid)
            old = self.gone.pop(key, None)
            if old is not None:
                self._gone_bytes -= _size(key, old[0])
            if len(self.live) > self._sweep_at:
                self._sweep()
        else:
            if sid is None:
                raise NotFound(self.why_gone(key))
            self.live[key] = sid
            mv = await self._session_model(key, sid)
            if version and version != mv.version:
                raise InvalidArgument(f"{describe(key)} runs on version {mv.version}; this request asks for "
                                      f"version {version} (leave model_version empty, or start a new sequence)")
            tokens = tokens_of(mv)
        try:
            out = await eng.feed(sid, tokens, "all", horizon=horizon)
        except NotFound as e:  # expired or closed between the lookup and the feed
            self._forget(key, sid, e)
            raise NotFound(self.why_gone(key)) from None
        state = (await eng.get_state(sid)).state if want_state else None
        if seq.end:
            await eng.close(sid)
            await eng.del_alias(_alias(key), sid)
            self.live.pop(key, None)
            self._bury(key, "was ended by a request with sequence_end")
        return Step(mv, out.logits, state, restarted, sid if seq.start else "", "" if seq.end else sid,
                    out.forecast)

    async def stateless(self, name: str, version: int, tokens_of, want_state: bool, horizon: int = 0) -> Step:
        """A request without a sequence id: from the model's initial state, nothing kept."""
        mv = self.engine.model(name, version)
        logits, state, forecast = await self.engine.infer(name, mv.version, tokens_of(mv), horizon=horizon,
                                                          with_forecast=True)
        return Step(mv, logits, state if want_state else None, forecast=forecast)

    # -- gone ids ------------------------------------------------------------------------------------
    async def _session_model(self, key: Key, sid: str) -> ModelVersion:
        try:
            return await self.engine.session_model(sid)
        except NotFound as e:
            self._forget(key, sid, e)
            raise NotFound(self.why_gone(key)) from None

    def _forget(self, key: Key, sid: str, e: NotFound) -> None:
        """The engine no longer has this sequence's session: remember why (its text, minus the session id)."""
        if self.live.get(key) == sid:
            del self.live[key]
        why = e.message
        for prefix in (f"session {sid} ", f"session {sid!r} "):
            why = why.removeprefix(prefix)
        self._bury(key, why)

    def _bury(self, key: Key, why: str) -> None:
        old = self.gone.pop(key, None)
        if old is not None:
            self._gone_bytes -= _size(key, old[0])
        self.gone[key] = (why, time.time())
        self._gone_bytes += _size(key, why)
        while len(self.gone) > TOMBSTONES or self._gone_bytes > TOMBSTONE_BYTES:
            k, (w, _) = self.gone.popitem(last=False)
            self._gone_bytes -= _size(k, w)

    def why_gone(self, key: Key) -> str:
        """The NOT_FOUND text for a request without sequence_start on an id that has no live sequence."""
        hint = "its first request must set sequence_start=true"
        entry = self.gone.get(key)
        if entry is None:
            return (f"{describe(key)} was never started on this server (or ended long ago and forgotten): "
                    f"{hint}")
        why, when = entry
        ago = max(0.0, time.time() - when)
        return f"{describe(key)} {why} ({ago:.0f} s ago); to use this id again, {hint}"

    def _sweep(self) -> None:
        """Drop entries whose session the engine expired under us (amortized: runs when the table doubles)."""
        for key, sid in list(self.live.items()):
            if not self.engine.has_session(sid):
                why = self.engine.gone_reason(sid) or "is no longer held here"
                self._forget(key, sid, NotFound(f"session {sid} {why}"))
        self._sweep_at = max(SWEEP_FLOOR, 2 * len(self.live))
