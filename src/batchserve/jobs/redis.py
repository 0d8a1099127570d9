"""`RedisQueue`: the shared `JobQueue` several api and worker processes use (`--queue redis://`).

Layout under one key prefix (default `batchserve`):
- `{p}:jobs` a Stream, one entry `{job: id}` per accepted job; consumer group `workers`. An
  entry is delivered to one worker (`XREADGROUP >`), stays in the group's pending list (PEL)
  until acknowledged, and is claimed by another worker (`XAUTOCLAIM`) once it has been idle past
  the visibility timeout. Acknowledged entries are deleted, so the stream holds only live work.
- `{p}:job:{id}` a hash: `record` (the `JobRecord` JSON) and `entry` (its stream entry id),
  expiring `ttl_s` after its last change.
- `{p}:idem:{owner}:{key}` the job id an idempotency key gave, `SET NX` with the same TTL.
- `{p}:waiting:{tenant}` a sorted set of the tenant's jobs still queued (status `queued`), each
  scored by when its record would expire: what the tenant's `max_queued` counts of its jobs on
  every api process (`waiting_by`); `create` adds, `transition` adds or removes with the record.
- `{p}:progress:{id}` a running job's newest step and preview (JSON), overwritten by its worker,
  expiring `PROGRESS_TTL_S` after the last write: what an api process streams as progress.

Every read-modify-write is one Lua script, so concurrent api and worker processes never
interleave inside one: `create` (idempotency check + XADD + record) and `transition` (a
compare-and-set on the record bytes; the move itself is `JobRecord.moved`, the one rule).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..progress import Progress
from .protocol import BackendUnavailable, Delivery
from .record import JobRecord, Status, TransitionRefused

GROUP = "workers"
# Blocking reads stay well inside the socket timeout so a dead server shows as an error, not a
# hang; callers loop on `pull` anyway.
_SOCKET_TIMEOUT_S = 10.0
PROGRESS_TTL_S = 30.0  # a worker that died mid-job stops showing progress soon
_MAX_BLOCK_S = 5.0
# `position` and the `waiting` fallback count stream entries; past this they say "at least".
_COUNT_CAP = 10_000
_CAS_TRIES = 20

# Redis's clock in ms, for the waiting sets' scores (every api and worker process reads the same).
_NOW_MS = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: stream, job key, idempotency key ("" for none), the tenant's waiting set ("" for none).
# ARGV: id, record, ttl ms, job key prefix, the stream's approximate MAXLEN (a safety net far
# above --max-jobs-waiting, see `max_len`).
# Returns {1, record} when created, {0, existing record} when the key had already made a job.
_CREATE = _NOW_MS + """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local rec = redis.call('HGET', ARGV[4] .. existing, 'record')
    if rec then return {0, rec} end
  end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
end
local entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'job', ARGV[1])
-- The entry's sequence number (entries ever added, this one included) gives its queue position
-- by subtraction instead of a scan.
local info, seq = redis.call('XINFO', 'STREAM', KEYS[1]), 0
for i = 1, #info, 2 do if info[i] == 'entries-added' then seq = info[i + 1] end end
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'entry', entry, 'idem', KEYS[3], 'seq', seq,
           'waiting', KEYS[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if KEYS[4] ~= '' then
  redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return {1, ARGV[2]}
"""

# KEYS: job key, stream. ARGV: expected record, new record, ttl ms, "1" to drop the stream entry,
# "1" when the new record is queued (in its tenant's waiting set) else "0", the job id.
# Returns 1 when written, 0 when the record changed (or vanished) since it was read.
_CAS = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'record') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local waiting = redis.call('HGET', KEYS[1], 'waiting')
if waiting and waiting ~= '' then
  if ARGV[5] == '1' then
    redis.call('ZADD', waiting, now_ms + tonumber(ARGV[3]), ARGV[6])
    redis.call('PEXPIRE', waiting, ARGV[3])
  else
    redis.call('ZREM', waiting, ARGV[6])
  end
end
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' then redis.call('PEXPIRE', idem, ARGV[3]) end
if ARGV[4] == '1' then
  local entry = redis.call('HGET', KEYS[1], 'entry')
  if entry then
    redis.call('XACK', KEYS[2], '""" + GROUP + """', entry)
    redis.call('XDEL', KEYS[2], entry)
    redis.call('HDEL', KEYS[1], 'entry')
  end
end
return 1
"""

# KEYS: a tenant's waiting set. Drops the jobs whose records have expired (never moved out of
# `queued`, e.g. their api died before a worker took them) and returns how many remain.
_COUNT_WAITING = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Restarts the idle time of each entry still
# pending for this consumer (XCLAIM to itself, JUSTID: no delivery counted); an entry another
# worker claimed meanwhile stays theirs. Returns how many were renewed.
_RENEW = """
local renewed = 0
for i = 3, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""


def max_len(max_waiting: int) -> int:
    """The stream's approximate MAXLEN. The real bound is `--max-jobs-waiting`, checked by the
    api against `waiting` before each XADD; this one only stops a stream growing without end
    when that check is raced (many api processes at the edge) or skipped (an older api). It
    counts held entries too (delivered, not acknowledged), hence far above the bound: trimming
    would drop the oldest entries, jobs that then never run."""
    return max(10 * max_waiting, max_waiting + 100_000)


# KEYS: stream. ARGV: group, min idle ms, one consumer's name ("" for all). Deletes consumers
# that hold no pending entry: the one named (whatever its idle time), or every one idle at least
# the given time. Never one with pending entries: DELCONSUMER would drop them from the PEL and
# their jobs would never run. Returns how many were deleted.
_PRUNE = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  local named = ARGV[3] ~= '' and info['name'] == ARGV[3]
  local dead = ARGV[3] == '' and tonumber(info['idle']) >= tonumber(ARGV[2])
  if tonumber(info['pending']) == 0 and (named or dead) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""
# A consumer is dead once idle this many visibility timeouts: a live worker calls XREADGROUP at
# least every `_MAX_BLOCK_S`, so its idle time never gets near.
DEAD_CONSUMER_TIMEOUTS = 3


class RedisQueue:
    """`JobQueue` on a Redis Stream with a consumer group (see the module docstring)."""

    def __init__(self, url: str, *, ttl_s: float, visibility_timeout_s: float,
                 prefix: str = "batchserve", max_waiting: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._visibility_ms = max(1, round(visibility_timeout_s * 1000))
        self._stream = f"{prefix}:jobs"
        self._max_len = max_len(max_waiting)
        self._job_prefix = f"{prefix}:job:"
        self._idem_prefix = f"{prefix}:idem:"
        self._progress_prefix = f"{prefix}:progress:"
        self._waiting_prefix = f"{prefix}:waiting:"
        # A short retry rides out a dropped connection; a server that is down fails fast so the
        # api answers 503 at once and workers back off on their own schedule.
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=_SOCKET_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            health_check_interval=15)
        self._create_script = self._redis.register_script(_CREATE)
        self._cas_script = self._redis.register_script(_CAS)
        self._renew_script = self._redis.register_script(_RENEW)
        self._prune_script = self._redis.register_script(_PRUNE)
        self._count_waiting_script = self._redis.register_script(_COUNT_WAITING)
        self._clock = clock
        self._pruned_at: float | None = None
        self._group_ready = False

    # --- records -------------------------------------------------------------------------

    async def create(self, record: JobRecord, idempotency_key: str | None = None) -> JobRecord:
        idem = f"{self._idem_prefix}{record.owner}:{idempotency_key}" if idempotency_key else ""
        waiting = self._waiting_prefix + record.tenant if record.tenant else ""
        keys = [self._stream, self._job_key(record.id), idem, waiting]
        args: list[bytes | str | int] = [record.id, record.dumps(), self._ttl_ms,
                                         self._job_prefix, self._max_len]
        async with self._guard():
            await self._ensure_group()
            _, raw = await self._create_script(keys=keys, args=args)
        return JobRecord.loads(raw)

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._guard():
            raw = await self._redis.hget(self._job_key(job_id), "record")
        return None if raw is None else JobRecord.loads(raw)

    async def transition(self, job_id: str, status: Status, **changes: object) -> JobRecord:
        key = self._job_key(job_id)
        for _ in range(_CAS_TRIES):
            async with self._guard():
                raw = await self._redis.hget(key, "record")
            if raw is None:
                raise KeyError(job_id)
            current = JobRecord.loads(raw)
            moved = current.moved(status, **changes)  # raises TransitionRefused
            # A job that ends before any worker finished it (canceled, failed while queued)
            # leaves the stream now, so no worker picks it up and `waiting` stops counting it.
            drop = "1" if status.terminal and current.status is Status.QUEUED else "0"
            queued = "1" if moved.status is Status.QUEUED else "0"
            async with self._guard():
                written = await self._cas_script(
                    keys=[key, self._stream],
                    args=[raw, moved.dumps(), self._ttl_ms, drop, queued, job_id])
            if written:
                return moved
        raise TransitionRefused(f"job {job_id}: record kept changing; gave up")

    async def delete(self, job_id: str) -> None:
        key = self._job_key(job_id)
        async with self._guard():
            entry, idem, waiting = await self._redis.hmget(key, ["entry", "idem", "waiting"])
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if idem:
                    pipe.delete(idem)
                if waiting:
                    pipe.zrem(waiting, job_id)
                if entry is not None:
                    pipe.xack(self._stream, GROUP, entry)
                    pipe.xdel(self._stream, entry)
                await pipe.execute()

    # --- work ----------------------------------------------------------------------------

    async def pull(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        if max_count <= 0:
            return []
        async with self._guard():
            await self._ensure_group()
            await self._prune_dead()
            deliveries = await self._reclaim(consumer, max_count)
            want = max_count - len(deliveries)
            if want > 0:
                # Block only when there is nothing to hand back yet.
                block_ms = None if deliveries or block_s <= 0 else round(
                    min(block_s, _MAX_BLOCK_S) * 1000)
                reply: Any = await self._redis.xreadgroup(
                    GROUP, consumer, {self._stream: ">"}, count=want, block=block_ms)
                deliveries += [Delivery(_text(_field(fields, "job")), _text(eid), 1)
                               for _, entries in reply or [] for eid, fields in entries]
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        async with self._guard(), self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, GROUP, delivery.token)
            pipe.xdel(self._stream, delivery.token)
            await pipe.execute()

    async def release(self, delivery: Delivery) -> None:
        # Still pending, but idle as if past the visibility timeout: the next `pull` of any
        # worker claims it first. RETRYCOUNT gives back this delivery's attempt, since the
        # worker is not lost, only leaving.
        async with self._guard():
            await self._redis.xclaim(self._stream, GROUP, "released", 0, [delivery.token],
                                     idle=self._visibility_ms,
                                     retrycount=max(0, delivery.attempts - 1), justid=True)

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> int:
        if not deliveries:
            return 0
        async with self._guard():
            renewed = await self._renew_script(
                keys=[self._stream], args=[GROUP, consumer, *(d.token for d in deliveries)])
        return int(renewed)

    async def leave(self, consumer: str) -> None:
        async with self._guard():
            await self._ensure_group()
            await self._prune_script(keys=[self._stream], args=[GROUP, 0, consumer])

    async def prune(self) -> int:
        """Deletes the consumers dead past `DEAD_CONSUMER_TIMEOUTS` visibility timeouts that
        hold nothing (workers killed without a clean stop); every `pull` does it, at most once
        per visibility timeout, so any live worker cleans up after the dead ones."""
        async with self._guard():
            await self._ensure_group()
            return await self._sweep()

    async def _prune_dead(self) -> None:
        due = self._pruned_at is None or (
            self._clock() - self._pruned_at >= self._visibility_ms / 1000)
        if due:
            await self._sweep()

    async def _sweep(self) -> int:
        self._pruned_at = self._clock()
        removed = await self._prune_script(
            keys=[self._stream], args=[GROUP, DEAD_CONSUMER_TIMEOUTS * self._visibility_ms, ""])
        return int(removed)

    async def waiting(self) -> int:
        async with self._guard():
            await self._ensure_group()
            last, lag, _ = await self._progress()
            if lag is None:  # an XDEL ahead of the group makes Redis unsure: count entries
                lag = len(await self._entries("(" + last, "+"))
            return lag + len(await self._stale())

    async def waiting_by(self, tenant: str) -> int:
        async with self._guard():
            return int(await self._count_waiting_script(keys=[self._waiting_prefix + tenant]))

    async def put_progress(self, job_id: str, progress: Progress) -> None:
        """`{p}:progress:{id}`: the newest step (and preview) of a running job, for an api
        process's event stream; overwritten each time, gone `PROGRESS_TTL_S` after the last."""
        value = orjson.dumps({"step": progress.step, "steps": progress.steps,
                              "preview": (base64.b64encode(progress.preview).decode("ascii")
                                          if progress.preview else None)})
        async with self._guard():
            await self._redis.set(self._progress_prefix + job_id, value,
                                  px=round(PROGRESS_TTL_S * 1000))

    async def progress(self, job_id: str) -> Progress | None:
        async with self._guard():
            raw = await self._redis.get(self._progress_prefix + job_id)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            preview = base64.b64decode(data["preview"]) if data.get("preview") else None
            return Progress(int(data["step"]), int(data["steps"]), preview)
        except (ValueError, KeyError, TypeError):
            return None  # written by another version: progress is best effort

    async def position(self, job_id: str) -> int | None:
        """Stale entries first (the next `pull` claims them before new ones, oldest first),
        then the undelivered ones in stream order."""
        async with self._guard():
            raw, seq = await self._redis.hmget(self._job_key(job_id), ["entry", "seq"])
            if raw is None:
                return None
            entry = _text(raw)
            await self._ensure_group()
            last, lag, read = await self._progress()
            stale = await self._stale()
            if _entry_key(entry) <= _entry_key(last):  # delivered: waiting only if handed back
                return stale.index(entry) if entry in stale else None
            if lag is not None and read is not None and seq is not None:
                # No deletion ahead of the group: sequence numbers are exact, no scan needed.
                return len(stale) + int(seq) - read - 1
            return len(stale) + len(await self._entries("(" + last, "(" + entry))

    async def ping(self) -> None:
        async with self._guard():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    # --- internals -----------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return self._job_prefix + job_id

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Connection trouble -> `BackendUnavailable`; a group lost with the data (a restart
        without persistence, FLUSHDB) is recreated by the next call."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable(f"redis unreachable: {exc}") from exc
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._group_ready = False
                raise BackendUnavailable("redis lost the consumer group; recreated") from exc
            if "LOADING" in str(exc):
                raise BackendUnavailable("redis is loading its data") from exc
            raise

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _progress(self) -> tuple[str, int | None, int | None]:
        """The group's last delivered entry id, its lag (entries never delivered) and how many
        entries it has read; the last two None when Redis cannot tell (deletions ahead)."""
        for group in await self._redis.xinfo_groups(self._stream):
            info = {_text(k): v for k, v in group.items()}
            if _text(info["name"]) == GROUP:
                lag, read = info.get("lag"), info.get("entries-read")
                return (_text(info["last-delivered-id"]), None if lag is None else int(lag),
                        None if read is None else int(read))
        raise ResponseError("NOGROUP consumer group missing")

    async def _entries(self, start: str, end: str) -> list[Any]:
        return list(await self._redis.xrange(self._stream, start, end, count=_COUNT_CAP) or [])

    async def _stale(self) -> list[str]:
        """Pending entries idle past the visibility timeout (released, or left by a worker
        that died): waiting for a worker again, oldest first."""
        pending = await self._redis.xpending_range(self._stream, GROUP, "-", "+", _COUNT_CAP,
                                                   idle=self._visibility_ms)
        return [_text(p["message_id"]) for p in pending]

    async def _reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        """Entries whose worker held them past the visibility timeout, now `consumer`'s, with
        their delivery count (this one included) as `attempts`."""
        claimed: list[tuple[str, Any]] = []
        cursor = "0-0"
        for _ in range(4):  # each XAUTOCLAIM scans at most 10 * COUNT pending entries
            reply = await self._redis.xautoclaim(self._stream, GROUP, consumer,
                                                 self._visibility_ms, cursor,
                                                 count=max_count - len(claimed))
            cursor = _text(reply[0])
            claimed += [(_text(eid), fields) for eid, fields in reply[1] if fields]
            if cursor == "0-0" or len(claimed) >= max_count:
                break
        if not claimed:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for eid, _ in claimed:
                pipe.xpending_range(self._stream, GROUP, eid, eid, 1)
            pending = await pipe.execute()
        return [Delivery(_text(_field(fields, "job")), eid,
                         int(p[0]["times_delivered"]) if p else 1)
                for (eid, fields), p in zip(claimed, pending, strict=True)]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: str) -> object:
    mapping = cast(dict[Any, Any], fields)
    return mapping.get(name.encode(), mapping.get(name))


def _entry_key(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)
