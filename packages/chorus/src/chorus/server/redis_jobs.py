"""The cluster's job store: every accepted job, its state and its finished video in Redis, shared by the ingress
and every replica.

The same interface as the SQLite `JobStore`, plus what a cluster needs: a replica *claims* a job (one Lua script:
only a queued job can be claimed, so a job dispatched twice runs once), holds it under a *lease* it renews while
it runs, and only the lease holder can finish it. A replica that dies stops renewing; the ingress puts every job
whose lease ran out back in the queue (`release_expired`), and it runs again elsewhere. Every change is one Lua
script, and with the append-only file fsynced on every write (`appendonly yes`, `appendfsync always`) a job Redis
acknowledged survives a crash of Redis itself.

Keys under `PREFIX:jobs:`: `seq` (counter), `j:ID` (hash), `all` (sorted by seq), `st:STATUS` (sorted by seq;
`st:in_progress` by lease end), `v:ID` (the MP4 and its thumbnail), `durations` (recent job seconds).
"""

from __future__ import annotations

import json
import logging
import time

from .jobs import MAX_ATTEMPTS, STATUSES, Job, QueueFullError, _json_default, new_job_id

log = logging.getLogger("chorus.server.jobs")

_ADD = """
local p, id = ARGV[1], ARGV[2]
local depth = redis.call('ZCARD', p .. 'st:queued')
if depth >= tonumber(ARGV[3]) then return {-1, depth} end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'j:' .. id, 'seq', seq, 'id', id, 'status', 'queued', 'progress', 0, 'attempts', 0,
  unpack(ARGV, 4))
redis.call('ZADD', p .. 'all', seq, id)
redis.call('ZADD', p .. 'st:queued', seq, id)
return {seq, depth}
"""

_CLAIM = """
local p, id, owner, now, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. 'j:' .. id
if redis.call('HGET', key, 'status') ~= 'queued' then return nil end
redis.call('HSET', key, 'status', 'in_progress', 'progress', 0, 'started_at', now, 'replica', owner,
  'lease_until', lease)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('ZREM', p .. 'st:queued', id)
redis.call('ZADD', p .. 'st:in_progress', lease, id)
return redis.call('HGETALL', key)
"""

_BEAT = """
local p, id, owner, lease, progress = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. 'j:' .. id
local st = redis.call('HMGET', key, 'status', 'replica')
if st[1] ~= 'in_progress' or st[2] ~= owner then return 0 end
redis.call('HSET', key, 'lease_until', lease)
if progress ~= '' then redis.call('HSET', key, 'progress', progress) end
redis.call('ZADD', p .. 'st:in_progress', lease, id)
return 1
"""

_FINISH = """
local p, id, owner, status, now, field, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = p .. 'j:' .. id
local st = redis.call('HMGET', key, 'status', 'replica', 'seq')
if st[1] ~= 'in_progress' or (owner ~= '' and st[2] ~= owner) then return 0 end
redis.call('HSET', key, 'status', status, 'completed_at', now, field, value, 'lease_until', '')
if status == 'completed' then redis.call('HSET', key, 'progress', 100) end
redis.call('ZREM', p .. 'st:in_progress', id)
redis.call('ZADD', p .. 'st:' .. status, st[3], id)
return 1
"""

# Back to the queue: a job whose replica gave it up (owner given) or whose lease ran out (owner empty, lease < now).
# `undo` = 1 takes the attempt back (a shutdown is not the job's fault); a job tried `max` times fails instead.
_REQUEUE = """
local p, id, owner, now, undo, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local key = p .. 'j:' .. id
local st = redis.call('HMGET', key, 'status', 'replica', 'seq', 'attempts', 'lease_until')
if st[1] ~= 'in_progress' then return st[1] or false end
if owner ~= '' and st[2] ~= owner then return 'moved' end
if owner == '' and tonumber(st[5]) >= now then return 'leased' end
local attempts = tonumber(st[4]) - undo
redis.call('ZREM', p .. 'st:in_progress', id)
if attempts >= tonumber(max) then
  local msg = 'the replica running this job was lost ' .. max .. ' times'
  local err = cjson.encode({code = 'interrupted', message = msg})
  redis.call('HSET', key, 'status', 'failed', 'error', err, 'completed_at', now, 'attempts', attempts,
    'lease_until', '')
  redis.call('ZADD', p .. 'st:failed', st[3], id)
  return 'failed'
end
redis.call('HSET', key, 'status', 'queued', 'progress', 0, 'started_at', '', 'attempts', attempts, 'lease_until', '')
redis.call('ZADD', p .. 'st:queued', st[3], id)
return 'queued'
"""

_DELETE = """
local p, id = ARGV[1], ARGV[2]
local fields = redis.call('HGETALL', p .. 'j:' .. id)
if #fields == 0 then return nil end
redis.call('DEL', p .. 'j:' .. id, p .. 'v:' .. id)
redis.call('ZREM', p .. 'all', id)
for _, s in ipairs({'queued', 'in_progress', 'completed', 'failed'}) do redis.call('ZREM', p .. 'st:' .. s, id) end
return fields
"""

_OPTIONAL = ("started_at", "completed_at", "error", "report", "replica")


class RedisJobStore:
    """`JobStore`'s interface over Redis. `owner`: the replica this store acts for (claims, leases, finishing)."""

    def __init__(
        self, client, *, prefix: str = "chorus", max_queue: int = 64, owner: str | None = None, lease_s: float = 10.0
    ):
        from ..cache.redis_store import connect

        self.redis = connect(client) if isinstance(client, str) else client
        self.p = f"{prefix}:jobs:"
        self.max_queue, self.owner, self.lease_s = max_queue, owner, lease_s
        self.on_lost = None  # called with a job's id when its owner finds it deleted or moved
        self._add, self._claim, self._beat = (self.redis.register_script(s) for s in (_ADD, _CLAIM, _BEAT))
        self._finish, self._requeue = self.redis.register_script(_FINISH), self.redis.register_script(_REQUEUE)
        self._delete = self.redis.register_script(_DELETE)

    def durability(self) -> list[str]:
        """What keeps an acknowledged job from surviving a crash of Redis: empty when AOF fsyncs every write."""
        config = {
            k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in {**self.redis.config_get("appendonly"), **self.redis.config_get("appendfsync")}.items()
        }
        problems = []
        if config.get("appendonly") != "yes":
            problems.append("appendonly is not 'yes'")
        if config.get("appendfsync") != "always":
            problems.append(f"appendfsync is {config.get('appendfsync')!r}, not 'always'")
        return problems

    def close(self) -> None:
        self.redis.close()

    # ---- writes -----------------------------------------------------------------------------------------

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> tuple[list[str], list[str]]:
        """Jobs whose replica is gone: back to the queue, or failed after `max_attempts` (see `release_expired`)."""
        released = self.release_expired(max_attempts)
        return [i for i, s in released if s == "queued"], [i for i, s in released if s == "failed"]

    def add(self, *, model: str, prompt: str, seconds: str, size: str, params: dict) -> Job:
        job_id = new_job_id()
        fields = {
            "created_at": repr(time.time()),
            "model": model,
            "prompt": prompt,
            "seconds": seconds,
            "size": size,
            "params": json.dumps(params),
        }
        seq, depth = self._add(args=[self.p, job_id, self.max_queue, *_flat(fields)])
        if seq < 0:
            raise QueueFullError(depth)
        return self.get(job_id)

    def claim(self, job_id: str) -> Job | None:
        """Start `job_id` on this store's owner if it is still queued; None if it is not (run, done or deleted)."""
        now = time.time()
        flat = self._claim(args=[self.p, job_id, self.owner, repr(now), repr(now + self.lease_s)])
        return _job(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None

    def claim_next(self) -> Job | None:
        ids = self.queued_ids(limit=1)
        return self.claim(ids[0]) if ids else None

    def heartbeat(self, job_id: str, progress: int | None = None) -> bool:
        """Renew this owner's lease on a running job; False if it is no longer this owner's (deleted, moved)."""
        args = [self.p, job_id, self.owner, repr(time.time() + self.lease_s), "" if progress is None else progress]
        return bool(self._beat(args=args))

    def set_progress(self, job_id: str, progress: int) -> None:
        if not self.heartbeat(job_id, int(progress)) and self.on_lost is not None:
            self.on_lost(job_id)

    def complete(self, job_id: str, report: dict) -> bool:
        """Mark the job completed (only by its lease holder); its generation time feeds `Retry-After`."""
        value = json.dumps(report, default=_json_default)
        if report.get("total_seconds"):
            self.record_duration(float(report["total_seconds"]))
        return bool(
            self._finish(args=[self.p, job_id, self.owner or "", "completed", repr(time.time()), "report", value])
        )

    def fail(self, job_id: str, code: str, message: str) -> bool:
        value = json.dumps({"code": code, "message": message})
        return bool(self._finish(args=[self.p, job_id, self.owner or "", "failed", repr(time.time()), "error", value]))

    def requeue(self, job_id: str) -> None:
        """Put back a job this owner gave up at shutdown, as if it had not been tried."""
        self._requeue(args=[self.p, job_id, self.owner or "", repr(time.time()), 1, MAX_ATTEMPTS + 1])

    def release_expired(self, max_attempts: int = MAX_ATTEMPTS) -> list[tuple[str, str]]:
        """Jobs whose lease ran out (their replica died or hangs): queued again, or failed after `max_attempts`."""
        now = time.time()
        out = []
        for raw in self.redis.zrangebyscore(self.p + "st:in_progress", "-inf", now):
            job_id = raw.decode()
            status = self._requeue(args=[self.p, job_id, "", repr(now), 0, max_attempts])
            status = status.decode() if isinstance(status, bytes) else status
            if status in ("queued", "failed"):
                out.append((job_id, status))
        return out

    def delete(self, job_id: str) -> Job | None:
        flat = self._delete(args=[self.p, job_id])
        return _job(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None

    # ---- results: the video and its thumbnail, readable by any ingress --------------------------------

    def put_video(self, job_id: str, mp4: bytes, png: bytes) -> None:
        self.redis.hset(self.p + "v:" + job_id, mapping={"video": mp4, "thumbnail": png})

    def video(self, job_id: str, variant: str) -> bytes | None:
        return self.redis.hget(self.p + "v:" + job_id, variant)

    def drop_video(self, job_id: str) -> None:
        self.redis.delete(self.p + "v:" + job_id)

    def record_duration(self, seconds: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.p + "durations", repr(seconds))
        pipe.ltrim(self.p + "durations", 0, 19)
        pipe.execute()

    def typical_job_seconds(self) -> float:
        recent = [float(x) for x in self.redis.lrange(self.p + "durations", 0, 19)]
        return sum(recent) / len(recent) if recent else 1.0

    # ---- reads ------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        fields = self.redis.hgetall(self.p + "j:" + job_id)
        return _job(fields) if fields else None

    def queued_ids(self, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else limit - 1
        return [i.decode() for i in self.redis.zrange(self.p + "st:queued", 0, end)]

    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        key = self.p + "all"
        if after is None:
            lo, hi = "-inf", "+inf"
        else:
            anchor = self.redis.zscore(key, after)
            if anchor is None:
                raise KeyError(after)
            lo, hi = (f"({int(anchor)}", "+inf") if order == "asc" else ("-inf", f"({int(anchor)}")
        if order == "asc":
            ids = self.redis.zrangebyscore(key, lo, hi, start=0, num=limit + 1)
        else:
            ids = self.redis.zrevrangebyscore(key, hi, lo, start=0, num=limit + 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids[:limit]:
            pipe.hgetall(self.p + "j:" + job_id.decode())
        jobs = [_job(f) for f in (pipe.execute() if ids else []) if f]
        return jobs, len(ids) > limit

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self.p + "st:" + status)
        return dict(zip(STATUSES, pipe.execute(), strict=True))


def _flat(fields: dict) -> list:
    return [x for kv in fields.items() for x in kv]


def _job(raw: dict) -> Job:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    opt = {k: (f.get(k) or None) for k in _OPTIONAL}
    return Job(
        seq=int(f["seq"]),
        id=f["id"],
        status=f["status"],
        progress=int(f["progress"]),
        attempts=int(f["attempts"]),
        created_at=float(f["created_at"]),
        started_at=float(opt["started_at"]) if opt["started_at"] else None,
        completed_at=float(opt["completed_at"]) if opt["completed_at"] else None,
        model=f["model"],
        prompt=f["prompt"],
        seconds=f["seconds"],
        size=f["size"],
        params=json.loads(f["params"]),
        error=json.loads(opt["error"]) if opt["error"] else None,
        report=json.loads(opt["report"]) if opt["report"] else None,
        replica=opt["replica"],
    )
