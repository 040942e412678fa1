"""The Redis session store: shared by many replicas, which hand sessions to each other.

Keys (prefix `rnnserve:`): `s:{sid}` a hash (d record bytes, h holder or "", e epoch, x deadline or 0,
a JSON list of the alias keys naming it); `r:{replica}` a heartbeat (PX 3000, renewed every second);
`idx` a sorted set of sids by deadline (+inf: never) for count(); `a:{key}` an alias (the sid). Every
write is one Lua script, so claims, fenced writes and releases are atomic. Session keys and aliases
expire in Redis SLACK seconds after their deadline; until then the scripts treat them as gone.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .base import Claim, SessionStore, StoreUnavailable
from .record import Record, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")

P = "rnnserve:"
IDX = P + "idx"
MAX_CONNECTIONS = 64  # per replica; more calls at once queue for a connection
HEARTBEAT_TTL_MS = 3000
HEARTBEAT_EVERY = 1.0
RETRY_EVERY = 0.5  # backoff of the heartbeat and the subscription while Redis is away
SOCKET_TIMEOUT = 2.0
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)  # what "Redis is away (or failed)" looks like
SLACK = 60.0  # seconds a key outlives its deadline in Redis (the scripts treat it as gone at the deadline)

_LIB = """
local function expire(key, at)
  if at == '0' then redis.call('PERSIST', key) else redis.call('PEXPIREAT', key, at) end
end
local function live(key, now)  -- the epoch of a session that exists and has not expired, else nil
  local v = redis.call('HMGET', key, 'e', 'x')
  local x = tonumber(v[2] or '0')
  if not v[1] or (x > 0 and x < tonumber(now)) then return nil end
  return tonumber(v[1])
end
local function write(key, sid, data, deadline, at)  -- the record, its expiry, its index entry, its aliases'
  redis.call('HSET', key, 'd', data, 'x', deadline)
  expire(key, at)
  redis.call('ZADD', KEYS[1], deadline == '0' and 'inf' or deadline, sid)
  local a, keep = redis.call('HGET', key, 'a'), {}
  if not a then return end
  for _, k in ipairs(cjson.decode(a)) do
    if redis.call('GET', k) == sid then expire(k, at); keep[#keep + 1] = k end
  end
  if #keep == 0 then redis.call('HDEL', key, 'a') else redis.call('HSET', key, 'a', cjson.encode(keep)) end
end
"""
# KEYS[1] is the index, KEYS[2] the session or alias; ARGV[1] is this replica, ARGV[2] now, ARGV[3] the sid.
_CREATE = _LIB + """
local e = tonumber(redis.call('HGET', KEYS[2], 'e') or '0') + 1
redis.call('HSET', KEYS[2], 'h', ARGV[1], 'e', e)
write(KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return e
"""
_CLAIM = _LIB + """
local e = live(KEYS[2], ARGV[2])
if not e then return {-1} end
local h = redis.call('HGET', KEYS[2], 'h') or ''
if h ~= '' and h ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. h) == 1 then return {0, h} end
redis.call('HSET', KEYS[2], 'h', ARGV[1], 'e', e + 1)
return {e + 1, redis.call('HGET', KEYS[2], 'd')}
"""
_SAVE = _LIB + """
local refused = {}
for i = 2, #KEYS do
  local j = 3 + (i - 2) * 5  -- sid, epoch, data, deadline, at
  if live(KEYS[i], ARGV[2]) == tonumber(ARGV[j + 1]) and redis.call('HGET', KEYS[i], 'h') == ARGV[1] then
    write(KEYS[i], ARGV[j], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4])
  else refused[#refused + 1] = ARGV[j] end
end
return refused
"""
_RELEASE = _LIB + """
if live(KEYS[2], ARGV[2]) ~= tonumber(ARGV[4]) then return 0 end
if ARGV[5] == '1' then write(KEYS[2], ARGV[3], ARGV[6], ARGV[7], ARGV[8]) end
redis.call('HSET', KEYS[2], 'h', '')
redis.call('PUBLISH', ARGV[9] .. ARGV[3], ARGV[3])
return 1
"""
_DELETE = """
if tonumber(redis.call('HGET', KEYS[2], 'e') or '-1') ~= tonumber(ARGV[4]) then return 0 end
local a = redis.call('HGET', KEYS[2], 'a')
for _, k in ipairs(a and cjson.decode(a) or {}) do
  if redis.call('GET', k) == ARGV[3] then redis.call('DEL', k) end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[3])
return 1
"""
_SET_ALIAS = _LIB + """
redis.call('SET', KEYS[3], ARGV[3])
if not live(KEYS[2], ARGV[2]) then expire(KEYS[3], ARGV[4]); return 1 end
local x = redis.call('HGET', KEYS[2], 'x')
expire(KEYS[3], x == '0' and '0' or tostring(math.floor((tonumber(x) + tonumber(ARGV[5])) * 1000)))
local a = redis.call('HGET', KEYS[2], 'a')
local list = a and cjson.decode(a) or {}
for _, k in ipairs(list) do if k == KEYS[3] then return 1 end end
list[#list + 1] = KEYS[3]
redis.call('HSET', KEYS[2], 'a', cjson.encode(list))
return 1
"""
_GET_ALIAS = _LIB + """
local sid = redis.call('GET', KEYS[2])
if not sid or not live(ARGV[3] .. sid, ARGV[2]) then return false end
return sid
"""
_DEL_ALIAS = "if ARGV[3] == '' or redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end"
_SCRIPTS = {"create": _CREATE, "claim": _CLAIM, "save": _SAVE, "release": _RELEASE, "delete": _DELETE,
            "set_alias": _SET_ALIAS, "get_alias": _GET_ALIAS, "del_alias": _DEL_ALIAS}


def redact(url: str) -> str:
    """The URL without its password (in the userinfo or a `password=` query option)."""
    u = urlsplit(url)
    netloc = u.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = "&".join(q for q in u.query.split("&") if q and not q.lower().startswith("password="))
    return f"{u.scheme}://{netloc}{u.path}" + (f"?{query}" if query else "")


async def _drop(pubsub: PubSub | None) -> None:
    """Close a pub/sub connection, whatever state it is in."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


def _at(deadline: float) -> str:
    """PEXPIREAT milliseconds for a deadline ('0': no expiry)."""
    return str(int((deadline + SLACK) * 1000)) if deadline > 0 else "0"


def _body(r: Record) -> list[Any]:
    """A record as the scripts take it: bytes, deadline ('0': never), PEXPIREAT ms ('0': none)."""
    return [encode(r), repr(r.deadline) if r.deadline > 0 else "0", _at(r.deadline)]


class RedisStore(SessionStore):
    """Sessions in Redis, held by one replica at a time, fenced by epochs, handed over on request."""

    shared = True

    def __init__(self, url: str, replica: str = "") -> None:
        self.url = url
        self.where = redact(url)
        self.replica = replica or secrets.token_hex(8)
        self._hb_key = f"{P}r:{self.replica}"
        self._channel = f"{P}release:{self.replica}"
        self._r: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._resubscribe = asyncio.Event()
        self._on_release: Callable[[str], None] = lambda sid: None
        self._scripts: dict[str, Any] = {}
        self._hb_value = f"{socket.gethostname()}:{os.getpid()}"
        self._beat_at = -math.inf  # monotonic time the last heartbeat that landed was sent

    # -- lifecycle

    async def start(self, on_release_request: Callable[[str], None]) -> None:
        """Connect, write the first heartbeat, subscribe to release requests, start the background tasks."""
        if self._r is not None:
            return
        self._on_release = on_release_request
        # a blocking pool: past its connections a call waits its turn (up to the socket timeout) instead of
        # failing at once with "Too many connections" when hundreds of requests need the store together
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=5)
        self._r = aioredis.Redis(connection_pool=pool)
        self._scripts = {name: self._r.register_script(src) for name, src in _SCRIPTS.items()}
        try:
            await self._call("heartbeat", self._beat())
            pubsub = await self._call("subscribe", self._subscribe())
        except BaseException:
            await self.close()
            raise
        self._tasks = [asyncio.create_task(self._heartbeat(), name=f"rnnserve-heartbeat-{self.replica}"),
                       asyncio.create_task(self._listen(pubsub), name=f"rnnserve-release-{self.replica}")]
        log.info("session store %s open (replica %s)", self.where, self.replica)

    async def close(self) -> None:
        """Stop the tasks, delete our heartbeat (so others may take over at once) and disconnect."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        r, self._r = self._r, None
        if r is None:
            return
        if not tasks:  # start() failed: no heartbeat worth deleting on a Redis that just failed us
            await r.aclose()
            return
        try:
            await asyncio.wait_for(r.delete(self._hb_key), SOCKET_TIMEOUT + 1)
        except _ERRORS as e:
            log.warning("redis at %s: could not delete heartbeat of %s: %s", self.where, self.replica, e)
        await r.aclose()

    async def _call(self, what: str, aw: Awaitable[T]) -> T:
        """Await a Redis operation; every Redis error (or a hang) becomes StoreUnavailable."""
        try:
            return await asyncio.wait_for(aw, 2 * SOCKET_TIMEOUT + 1)
        except _ERRORS as e:
            raise StoreUnavailable(f"redis at {self.where}: {what}: {e or type(e).__name__}") from e

    def _client(self) -> aioredis.Redis:
        """The client; StoreUnavailable before start() or after close()."""
        if self._r is None:
            raise StoreUnavailable(f"redis at {self.where}: the store is not open")
        return self._r

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of the scripts (KEYS[1] the index, ARGV starting with me, now)."""
        self._client()
        return await self._call(name, self._scripts[name](keys=[IDX, *keys],
                                                          args=[self.replica, repr(time.time()), *args]))

    async def _beat(self) -> None:
        """Write the heartbeat once (the lease runs from when it was sent)."""
        sent = time.monotonic()
        await self._client().set(self._hb_key, self._hb_value, px=HEARTBEAT_TTL_MS)
        self._beat_at = sent

    def lease_ok(self) -> bool:
        """Whether the last heartbeat written is younger than its TTL, with half a second to spare: past
        that (Redis out of reach, or this process paused), another replica may claim our sessions."""
        return time.monotonic() - self._beat_at < HEARTBEAT_TTL_MS / 1000 - 0.5

    async def _subscribe(self) -> PubSub:
        """A pub/sub connection subscribed to this replica's release requests."""
        pubsub = self._client().pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
        except BaseException:
            await _drop(pubsub)
            raise
        return pubsub

    async def _heartbeat(self) -> None:
        """Renew the heartbeat every second; through an outage, log once and retry."""
        down = False
        while True:
            try:
                await asyncio.wait_for(self._beat(), 2 * SOCKET_TIMEOUT + 1)
            except _ERRORS as e:
                if not down:
                    log.warning("redis at %s unreachable, heartbeat of %s retrying: %s",
                                self.where, self.replica, e)
                down = True
                await asyncio.sleep(RETRY_EVERY)
                continue
            if down:
                log.info("redis at %s reachable again, heartbeat of %s renewed", self.where, self.replica)
                down = False
                self._resubscribe.set()  # the subscription's connection may have died silently meanwhile
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def _listen(self, pubsub: PubSub | None) -> None:
        """Hand each release request to the callback; through an outage, log once, retry and resubscribe."""
        down = False
        try:
            while True:
                try:
                    if pubsub is None or self._resubscribe.is_set():
                        self._resubscribe.clear()
                        pubsub = await _drop(pubsub)
                        pubsub = await asyncio.wait_for(self._subscribe(), 2 * SOCKET_TIMEOUT + 1)
                        if down:
                            log.info("redis at %s: release requests of %s resubscribed",
                                     self.where, self.replica)
                        down = False
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                except _ERRORS as e:
                    if not down:
                        log.warning("redis at %s: release requests of %s lost, resubscribing: %s",
                                    self.where, self.replica, e)
                    down, pubsub = True, await _drop(pubsub)
                    await asyncio.sleep(RETRY_EVERY)
                    continue
                if msg and msg.get("type") == "message":
                    sid = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    try:
                        self._on_release(sid)
                    except Exception:
                        log.exception("release request callback failed for session %s", sid)
        finally:
            await _drop(pubsub)

    # -- the interface

    async def create(self, record: Record) -> int:
        """Write a new session held by this replica; returns its epoch (1, or one past a key it replaces)."""
        return int(await self._run("create", [f"{P}s:{record.id}"], [record.id, *_body(record)]))

    async def claim(self, session_id: str) -> Claim:
        """Take a session that is free, ours, or held by a replica with no heartbeat (epoch + 1)."""
        got = await self._run("claim", [f"{P}s:{session_id}"], [session_id, f"{P}r:"])
        epoch = int(got[0])
        if epoch <= 0:
            return Claim(found=False) if epoch < 0 else Claim(holder=got[1].decode())
        return Claim(epoch=epoch, record=decode(got[1]))

    async def save(self, items: Sequence[tuple[Record, int]]) -> list[str]:
        """Write a batch in one script; returns the ids refused (stale epoch, released or gone)."""
        if not items:
            return []
        args = [a for r, epoch in items for a in (r.id, epoch, *_body(r))]
        refused = await self._run("save", [f"{P}s:{r.id}" for r, _ in items], args)
        return [sid.decode() for sid in refused]

    async def release(self, session_id: str, epoch: int, record: Record | None = None) -> bool:
        """Write the final record (if given), let the session go, announce it; False if the epoch is stale."""
        rec = ["0", "", "0", "0"] if record is None else ["1", *_body(record)]
        return bool(await self._run("release", [f"{P}s:{session_id}"],
                                    [session_id, epoch, *rec, f"{P}released:"]))

    async def release_all(self, items: Sequence[tuple[str, int]]) -> None:
        """Let many sessions go (shutdown), MAX_CONNECTIONS releases in flight at a time."""
        for i in range(0, len(items), MAX_CONNECTIONS):
            await asyncio.gather(*(self.release(sid, epoch) for sid, epoch in items[i:i + MAX_CONNECTIONS]))

    async def delete(self, session_id: str, epoch: int) -> None:
        """Remove a session and its aliases while `epoch` is current."""
        await self._run("delete", [f"{P}s:{session_id}"], [session_id, epoch])

    async def ask_release(self, session_id: str, holder: str) -> None:
        """Ask the live replica `holder` to release a session."""
        await self._call("ask_release", self._client().publish(f"{P}release:{holder}", session_id))

    async def count(self) -> int:
        """Sessions that have not expired (dropping the expired ones from the index)."""
        now = time.time()
        async with self._client().pipeline(transaction=True) as p:
            p.zremrangebyscore(IDX, "-inf", f"({now!r}")
            p.zcount(IDX, repr(now), "+inf")
            _, n = await self._call("count", p.execute())
        return int(n)

    async def get_alias(self, key: str) -> str | None:
        """The session an alias names, while that session lives."""
        sid = await self._run("get_alias", [f"{P}a:{key}"], [f"{P}s:"])
        return None if sid is None else sid.decode()

    async def set_alias(self, key: str, session_id: str, idle_timeout: float) -> None:
        """Point an alias at a session; it names it while the session lives (its key expires with it)."""
        at = _at(time.time() + idle_timeout) if idle_timeout > 0 else "0"
        await self._run("set_alias", [f"{P}s:{session_id}", f"{P}a:{key}"], [session_id, at, SLACK])

    async def del_alias(self, key: str, session_id: str | None = None) -> None:
        """Remove an alias (only if it still names `session_id`, when given)."""
        await self._run("del_alias", [f"{P}a:{key}"], [session_id or ""])
