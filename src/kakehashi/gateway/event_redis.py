"""Event topics on Redis Streams: several gateways serve the same topics.

With ``gateway serve --db redis://...`` the topics live in Redis, not in one
gateway's memory, so a publisher may post to any gateway and a watcher may poll any
of them with the same cursor; a gateway that dies (even ``kill -9``) takes no event
with it, since the publisher hears ``202`` only after Redis has the event.

Layout (``<p>`` is the key prefix, ``kakehashi:`` by default):

* ``<p>gateway-events:TOPIC``: a stream per topic whose entry IDs are ``0-SEQ``:
  ``XADD ... 0-*`` lets Redis number them 1, 2, 3 ... atomically, so the sequence
  number that watchers use as their cursor is the stream ID itself, the same on every
  gateway (no mapping to keep). Each entry holds ``ts`` (Redis's clock) and ``d``
  (the payload bytes).
* ``<p>gateway-topics``: the set of topic names (``max_topics`` bounds it).
* ``<p>gateway-topic-bytes``: a hash of each topic's retained payload bytes.
* ``<p>gateway-publish:ID``: each publish's answer for ``PUBLISH_ID_TTL`` s, so a
  publish that the client library retries after a connection error is answered
  with the event it already made, never appended twice; a publisher's own
  ``Idempotency-Key`` gives the ID (kept ``PUBLISH_KEY_TTL`` s), so its repeat on
  another gateway after losing an answer is answered the same way.
* ``<p>gateway-events-notify``: a short stream (``MAXLEN ~``) with one entry per
  publish naming the topic; every gateway follows it with one ``XREAD BLOCK`` and
  wakes its own long polls of that topic. A follower that reconnects resumes from
  the last entry it read, so no wake-up is lost either.

Publishing and polling are each one Lua script (one round trip, atomic): append
and apply retention (count, bytes, age: the same :class:`Retention` as the
in-memory hub), or apply retention and read after a cursor with the same answers
as :meth:`TopicLog.since` (gap, "only new" cursors, a cursor from a Redis that lost
its data). A poll reads at most ``reply_bytes`` of events (the endpoint's reply
limit); the rest comes with the next poll.

Redis keeps what its configuration keeps: without persistence a Redis restart
empties the topics and numbering starts again, which watchers see as a gap (as with
``--memory-events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from typing import Any

from kakehashi.core.store.redis import async_client, key_prefix, redacted
from kakehashi.gateway.events import (
    PUBLISH_KEY_TTL,
    TOPIC_RE,
    Batch,
    Event,
    EventsUnavailable,
    Retention,
)

log = logging.getLogger("kakehashi.gateway.events")

#: entries kept in the notify stream (only a follower that was away longer misses some,
#: and it then wakes every waiter to look for itself)
NOTIFY_LEN = 10_000
#: seconds one XREAD BLOCK of the follower waits before it asks again
FOLLOW_BLOCK = 5.0
#: seconds between reconnection attempts of the follower
FOLLOW_RETRY = 0.5
#: seconds a publish's answer is kept for a retry of the same publish (a command is
#: retried when its connection failed, and it may have run before it failed)
PUBLISH_ID_TTL = 30

_SCRIPT = r"""
local stream, topics, sizes, notify = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, topic = ARGV[1], ARGV[2]
local max_events, max_bytes, max_age = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function seq_of(id) return tonumber(string.sub(id, 3)) end

-- drop from the head what retention no longer keeps (count, bytes, age)
local function trim()
  local n = redis.call('XLEN', stream)
  if n == 0 then return end
  local size = tonumber(redis.call('HGET', sizes, topic) or '0')
  local last_dropped = nil
  local start = '-'
  local count = 1  -- usually the oldest entry stays: look at it alone first
  while n > 0 do
    local batch = redis.call('XRANGE', stream, start, '+', 'COUNT', count)
    count = math.min(count * 4, 256)
    if #batch == 0 then break end
    local keep = false
    for _, e in ipairs(batch) do
      local f = e[2]
      if n > max_events or size > max_bytes or now - tonumber(f[2]) > max_age then
        n = n - 1
        size = size - string.len(f[4])
        last_dropped = e[1]
      else
        keep = true
        break
      end
    end
    if keep then break end
    start = '(' .. batch[#batch][1]
  end
  if last_dropped then
    redis.call('XTRIM', stream, 'MINID', '0-' .. (seq_of(last_dropped) + 1))
    redis.call('HSET', sizes, topic, size)
  end
end

if mode == 'pub' then
  -- a retried publish (its answer was lost with a connection) is answered, not repeated
  local done = redis.call('GET', KEYS[5])
  if done then
    local sp = string.find(done, ' ')
    return {tonumber(string.sub(done, 1, sp - 1)), string.sub(done, sp + 1)}
  end
  if redis.call('SISMEMBER', topics, topic) == 0 then
    if redis.call('SCARD', topics) >= tonumber(ARGV[7]) then
      return redis.error_reply('too many topics')
    end
    redis.call('SADD', topics, topic)
  end
  local ts = string.format('%.6f', now)
  local id = redis.call('XADD', stream, '0-*', 'ts', ts, 'd', ARGV[6])
  redis.call('HINCRBY', sizes, topic, string.len(ARGV[6]))
  trim()
  redis.call('XADD', notify, 'MAXLEN', '~', ARGV[8], '*', 't', topic)
  redis.call('SET', KEYS[5], seq_of(id) .. ' ' .. ts, 'EX', ARGV[9])
  return {seq_of(id), ts}
end

-- read: {last_seq, gap, {{seq, ts, data}, ...}}
trim()
local last = 0
if redis.call('EXISTS', stream) == 1 then
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = seq_of(info[i + 1]) end
  end
end
local cursor = tonumber(ARGV[6])
if cursor < 0 then cursor = math.max(last + cursor + 1, 0) end
if cursor >= last then
  return {last, cursor > last and 1 or 0, {}}
end
local first = last + 1
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #head > 0 then first = seq_of(head[1][1]) end
local out, bytes = {}, 0
local entries = redis.call('XRANGE', stream, '(0-' .. cursor, '+', 'COUNT', tonumber(ARGV[7]))
for _, e in ipairs(entries) do
  local d = e[2][4]
  if #out > 0 and bytes + string.len(d) > tonumber(ARGV[8]) then break end
  bytes = bytes + string.len(d)
  out[#out + 1] = {seq_of(e[1]), e[2][2], d}
end
return {last, (cursor + 1 < first) and 1 or 0, out}
"""


class RedisEventHub:
    """The event hub's interface (:class:`~kakehashi.gateway.events.TopicHub`) over
    Redis Streams shared by several gateways (see the module docstring)."""

    def __init__(self, url: str, retention: Retention | None = None, *,
                 reply_bytes: int = 8 * 1024 * 1024) -> None:
        self.url = url
        self.retention = retention or Retention()
        self.reply_bytes = reply_bytes
        p = key_prefix(url)
        self._topics_key, self._sizes_key = f"{p}gateway-topics", f"{p}gateway-topic-bytes"
        self._notify_key = f"{p}gateway-events-notify"
        self._stream_prefix = f"{p}gateway-events:"
        self._publish_prefix = f"{p}gateway-publish:"
        self.redis = async_client(url)
        self._script = self.redis.register_script(_SCRIPT)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._follower: asyncio.Task[None] | None = None
        self.published = 0
        self.follower_restarts = 0  # for tests and curiosity

    def __repr__(self) -> str:
        return f"RedisEventHub({redacted(self.url)!r})"

    def _keys(self, topic: str) -> list[str]:
        if not TOPIC_RE.match(topic):
            raise ValueError("topic names are 1-128 of A-Z a-z 0-9 _ . -")
        return [self._stream_prefix + topic, self._topics_key, self._sizes_key,
                self._notify_key]

    def _limits(self) -> list[Any]:
        r = self.retention
        return [r.max_events, r.max_bytes, r.max_age]

    async def _call(self, keys: list[str], args: list[Any]) -> Any:
        import redis.exceptions

        try:
            return await self._script(keys=keys, args=args)
        except redis.exceptions.ResponseError as exc:
            if "too many topics" in str(exc):
                raise ValueError("too many topics") from None
            raise EventsUnavailable(f"Redis at {redacted(self.url)}: {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise EventsUnavailable(
                f"cannot reach Redis at {redacted(self.url)}: {exc}") from None

    # -- the TopicHub interface --------------------------------------------------------
    async def publish_stored(self, topic: str, data: bytes,
                             key: str | None = None) -> Event:
        """Append ``data`` to ``topic`` in Redis; returns once Redis has it. With
        ``key`` (the publisher's Idempotency-Key) a repeat on any gateway within
        ``PUBLISH_KEY_TTL`` s gets the event the first publish made."""
        if len(data) > self.retention.max_event:
            raise ValueError(f"event of {len(data)} bytes exceeds {self.retention.max_event}")
        if key is None:
            pid, ttl = secrets.token_hex(12), PUBLISH_ID_TTL
        else:
            digest = hashlib.sha256(f"{topic}\0{key}".encode()).hexdigest()[:32]
            pid, ttl = f"key:{digest}", int(PUBLISH_KEY_TTL)
        keys = [*self._keys(topic), f"{self._publish_prefix}{pid}"]
        seq, ts = await self._call(keys, ["pub", topic, *self._limits(), data,
                                          self.retention.max_topics, NOTIFY_LEN, ttl])
        self.published += 1
        self._wake(topic)  # this gateway's watchers need not wait for the notify stream
        return Event(int(seq), float(ts), data)

    async def poll(self, topic: str, cursor: int) -> Batch:
        keys = self._keys(topic)
        last, gap, rows = await self._call(
            keys, ["read", topic, *self._limits(), cursor, self.retention.max_batch,
                   self.reply_bytes])
        events = tuple(Event(int(seq), float(ts), bytes(data)) for seq, ts, data in rows)
        if not events and last == 0:  # a topic nobody published to
            return Batch((), max(cursor, 0), bool(gap))
        return Batch(events, events[-1].seq if events else int(last), bool(gap))

    async def wait(self, topic: str, cursor: int, timeout: float) -> Batch:
        """Long poll: at once if there are events, else when a publish on any gateway
        reaches this one's follower (or ``timeout``)."""
        batch = await self.poll(topic, cursor)
        if batch.events or timeout <= 0:
            return batch
        if cursor < 0:  # "only new": pin the cursor now so a publish during the wait counts
            cursor = batch.cursor
        self._start_follower()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(topic, set())
            waiters.add(fut)
            try:
                # parked first, then looked again: a publish between the two is not missed
                batch = await self.poll(topic, cursor)
                left = deadline - asyncio.get_running_loop().time()
                if batch.events or batch.gap or left <= 0:
                    return batch
                log.debug("long poll parked: topic %s after #%d, up to %.1f s", topic,
                          cursor, left)
                try:
                    await asyncio.wait_for(fut, left)
                except TimeoutError:
                    return await self.poll(topic, cursor)
            finally:
                waiters.discard(fut)
                if not waiters and self._waiters.get(topic) is waiters:
                    del self._waiters[topic]
            # woken (a publish on this topic, or the follower reconnected): look again

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await self.redis.aclose()

    # -- waking long polls -------------------------------------------------------------
    def _wake(self, topic: str | None) -> None:
        """Wake the long polls of ``topic`` (None: all of them)."""
        topics = list(self._waiters) if topic is None else [topic]
        for name in topics:
            for fut in self._waiters.pop(name, ()):
                if not fut.done():
                    fut.set_result(None)

    def _start_follower(self) -> None:
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Follow the notify stream with XREAD BLOCK (one connection per gateway)."""
        last_id: str | None = None
        delay = FOLLOW_RETRY
        while True:
            try:
                if last_id is None:  # start at the end: what came before is polled anyway
                    newest = await self.redis.xrevrange(self._notify_key, count=1)
                    last_id = newest[0][0].decode() if newest else "0-0"
                    self._wake(None)  # (re)connected: whatever was missed, look again
                async with asyncio.timeout(FOLLOW_BLOCK + 10):
                    got = await self.redis.xread({self._notify_key: last_id}, count=1000,
                                                 block=int(FOLLOW_BLOCK * 1000))
                delay = FOLLOW_RETRY
                for _, entries in got or ():
                    for entry_id, fields in entries:
                        last_id = entry_id.decode()
                        topic = fields.get(b"t", b"").decode(errors="replace")
                        self._wake(topic)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: retry, and let the polls see for themselves
                self.follower_restarts += 1
                log.warning("events: following %s failed (%s); retrying",
                            redacted(self.url), exc)
                self._wake(None)
                last_id = None if isinstance(exc, TimeoutError) else last_id
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
