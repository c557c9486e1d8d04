"""A cache store shared by every replica: entries in Redis, with a bounded in-memory tier per process.

Layout under `PREFIX:cache:` (one Redis database, standalone or a primary with replicas):

    ids             SET    the visible entries: an id is here only once its entry is complete
    m:ID            HASH   its metadata (`EntryMeta`'s fields, the embedding as float32 bytes, the tensor names)
    t:ID            HASH   its tensors, one field each (safetensors bytes), so a plan reads only what it names
    aliases:ID      SET    the aliases of an origin, deleted with it
    holders:ID      SET    the processes whose local tier holds some of its tensors (what the router asks)
    bytes           INT    the bytes of all visible entries: the budget holds across replicas
    events          STREAM add/remove events, so each process keeps its vector index in step without rereading
    lock            STR    held while one process evicts

A write stages the tensors first under a one-hour expiry, then one Lua script checks the alias's origin, writes
the metadata, makes the tensors permanent and adds the id to `ids` and the event: a reader never sees a
half-written entry, and the tensors of a writer that died before its commit expire on their own. Deletion is one
script too (entry, aliases, holders, bytes). Eviction runs under `lock` with the store's policy over every entry's
metadata read fresh from Redis, so the budget and the policy are the cluster's, not one replica's.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .entry import CacheEntry, EntryMeta
from .eviction import EvictionPolicy
from .store import CacheStore

log = logging.getLogger(__name__)

STAGE_TTL_S = 3600  # staged tensors of a writer that never committed vanish after this
EVENTS_MAXLEN = 100_000

_COMMIT = """
local p, id, alias = ARGV[1], ARGV[2], ARGV[3]
if alias ~= '' and redis.call('SISMEMBER', p .. 'ids', alias) == 0 then return 0 end
redis.call('HSET', p .. 'm:' .. id, unpack(ARGV, 5, #ARGV - 1))
if alias == '' then
  redis.call('PERSIST', p .. 't:' .. id)
else
  redis.call('SADD', p .. 'aliases:' .. alias, id)
end
if redis.call('SADD', p .. 'ids', id) == 1 then redis.call('INCRBY', p .. 'bytes', tonumber(ARGV[4])) end
redis.call('XADD', p .. 'events', 'MAXLEN', '~', ARGV[#ARGV], '*', 'op', 'add', 'id', id)
return 1
"""

_DELETE = """
local p, gone = ARGV[1], {}
local function drop(id)
  if redis.call('SREM', p .. 'ids', id) == 0 then return end
  local n = tonumber(redis.call('HGET', p .. 'm:' .. id, 'nbytes') or '0')
  local origin = redis.call('HGET', p .. 'm:' .. id, 'alias_of')
  if origin and origin ~= '' then redis.call('SREM', p .. 'aliases:' .. origin, id) end
  redis.call('DEL', p .. 'm:' .. id, p .. 't:' .. id, p .. 'holders:' .. id)
  redis.call('DECRBY', p .. 'bytes', n)
  redis.call('XADD', p .. 'events', 'MAXLEN', '~', ARGV[3], '*', 'op', 'remove', 'id', id)
  table.insert(gone, id)
end
local id = ARGV[2]
for _, alias in ipairs(redis.call('SMEMBERS', p .. 'aliases:' .. id)) do drop(alias) end
redis.call('DEL', p .. 'aliases:' .. id)
drop(id)
return gone
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def connect(url: str):
    """A Redis client for `redis://HOST:PORT/DB` (bytes in, bytes out)."""
    import redis

    return redis.Redis.from_url(url, decode_responses=False, health_check_interval=30)


class LocalTier:
    """The tensors this process read or wrote lately, least recently used out first, within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._tensors: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._per_entry: dict[str, int] = {}
        self.nbytes = 0

    def get(self, entry_id: str, name: str) -> torch.Tensor | None:
        tensor = self._tensors.get((entry_id, name))
        if tensor is not None:
            self._tensors.move_to_end((entry_id, name))
        return tensor

    def put(self, entry_id: str, name: str, tensor: torch.Tensor) -> list[str]:
        """Keep a tensor; returns the entries of which nothing is left here afterwards."""
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes or (entry_id, name) in self._tensors:
            return []
        self._tensors[(entry_id, name)] = tensor
        self._per_entry[entry_id] = self._per_entry.get(entry_id, 0) + 1
        self.nbytes += size
        left = []
        while self.nbytes > self.max_bytes:
            (old_id, _), old = self._tensors.popitem(last=False)
            left += self._drop_one(old_id, old)
        return left

    def drop(self, entry_id: str) -> None:
        for key in [k for k in self._tensors if k[0] == entry_id]:
            self._drop_one(entry_id, self._tensors.pop(key))

    def _drop_one(self, entry_id: str, tensor: torch.Tensor) -> list[str]:
        self.nbytes -= tensor.numel() * tensor.element_size()
        self._per_entry[entry_id] -= 1
        if self._per_entry[entry_id] == 0:
            del self._per_entry[entry_id]
            return [entry_id]
        return []

    def entries(self) -> set[str]:
        return set(self._per_entry)


class RedisStore(CacheStore):
    """A `CacheStore` in Redis, shared by processes on any machine, each with a `LocalTier` of `local_bytes`.

    `name` identifies this process in `holders:ID` (the router's view of who holds what); None: publish nothing.
    """

    def __init__(
        self,
        client,
        budget_bytes: int = 20 << 30,
        policy: EvictionPolicy | None = None,
        *,
        prefix: str = "chorus",
        local_bytes: int = 1 << 30,
        name: str | None = None,
    ):
        super().__init__(budget_bytes, policy)
        self.redis = connect(client) if isinstance(client, str) else client
        self.p = f"{prefix}:cache:"
        self.name = name
        self.tier = LocalTier(local_bytes)
        self._commit = self.redis.register_script(_COMMIT)
        self._delete_script = self.redis.register_script(_DELETE)
        self._unlock = self.redis.register_script(_UNLOCK)
        self._meta: dict[str, EntryMeta] = {}
        self._names: dict[str, list[str]] = {}
        self._headers: dict[str, dict] = {}
        self._added: list[EntryMeta] = []
        self._removed: list[str] = []
        self._last_event = b"0-0"
        self.reads: dict[str, str] = {}  # entry id -> "local" or "shared": where its last read found its tensors
        self._reload()

    # ---- keeping the mirror in step ---------------------------------------------------------------------

    def _reload(self) -> None:
        """Read every entry's metadata (at start, and when events were trimmed away before this process read them)."""
        last = self.redis.xrevrange(self.p + "events", count=1)
        ids = [i.decode() for i in self.redis.smembers(self.p + "ids")]
        before = set(self._meta)
        self._meta.clear()
        for entry_id, fields in zip(ids, self._fetch_metas(ids), strict=True):
            if fields:
                self._keep(entry_id, fields)
        self._removed += list(before - set(self._meta))
        self._added += [m for i, m in self._meta.items() if i not in before]
        self._last_event = last[0][0] if last else b"0-0"

    def _fetch_metas(self, ids: list[str]) -> list[dict]:
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hgetall(self.p + "m:" + entry_id)
        return pipe.execute() if ids else []

    def _keep(self, entry_id: str, fields: dict) -> EntryMeta:
        meta = _meta_from(entry_id, fields)
        self._meta[entry_id] = meta
        self._names[entry_id] = json.loads(fields[b"names"])
        self._headers[entry_id] = json.loads(fields[b"header"]) if fields.get(b"header") else {}
        return meta

    def _sync(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(self.p + "events", count=1)
        pipe.xrange(self.p + "events", min=b"(" + self._last_event, count=10_000)
        first, events = pipe.execute()
        if first and _event_key(first[0][0]) > _event_key(self._last_event):
            log.info("cache events trimmed before this process read them: reloading the index")
            self._reload()
            return
        added = []
        for event_id, fields in events:
            entry_id = fields[b"id"].decode()
            if fields[b"op"] == b"add":
                added.append(entry_id)
            else:
                added = [i for i in added if i != entry_id]
                if self._meta.pop(entry_id, None) is not None:
                    self._removed.append(entry_id)
                self._names.pop(entry_id, None)
                self._headers.pop(entry_id, None)
                self.tier.drop(entry_id)
            self._last_event = event_id
        added = [i for i in dict.fromkeys(added) if i not in self._meta]
        for entry_id, fields in zip(added, self._fetch_metas(added), strict=True):
            if fields:  # empty: removed again since the event
                self._added.append(self._keep(entry_id, fields))

    def changes(self) -> tuple[list[EntryMeta], list[str]]:
        with self._lock:
            self._sync()
            added, removed = self._added, self._removed
            self._added, self._removed = [], []
            return added, removed

    # ---- storage primitives -----------------------------------------------------------------------------

    def _metas(self):
        self._sync()
        return self._meta

    def stage(self, entry: CacheEntry) -> None:
        """Write an entry's tensors, invisible until `commit` (and gone after an hour without one)."""
        key = self.p + "t:" + entry.meta.entry_id
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={name: st_save({name: t.contiguous()}) for name, t in entry.tensors.items()})
        pipe.expire(key, STAGE_TTL_S)
        pipe.execute()

    def commit(self, entry: CacheEntry) -> bool:
        """Make a staged entry visible to every process; False if it is an alias whose origin has left."""
        m = entry.meta
        fields = {
            "signature_key": m.signature_key,
            "prompt": m.prompt,
            "seed": m.seed,
            "embedding": np.asarray(m.embedding, dtype=np.float32).tobytes(),
            "nbytes": m.nbytes,
            "created_at": repr(m.created_at),
            "last_access": repr(m.last_access),
            "hits": m.hits,
            "saved_steps": m.saved_steps,
            "alias_of": m.alias_of or "",
            "names": json.dumps(sorted(entry.tensors)),
            "header": json.dumps(entry.header()) if not m.alias_of else "",
        }
        flat = [x for kv in fields.items() for x in kv]
        args = [self.p, m.entry_id, m.alias_of or "", m.nbytes, *flat, EVENTS_MAXLEN]
        return bool(self._commit(keys=[self.p + "ids"], args=args))

    def _write(self, entry):
        if not entry.meta.alias_of:
            self.stage(entry)
        if not self.commit(entry):
            return False
        self._meta[entry.meta.entry_id] = entry.meta
        self._names[entry.meta.entry_id] = sorted(entry.tensors)
        self._headers[entry.meta.entry_id] = entry.header()
        if not entry.meta.alias_of:  # what this process computed is what its next similar request will want
            for name, tensor in entry.tensors.items():
                self._tier_put(entry.meta.entry_id, name, tensor)
        return True

    def _read(self, meta, names):
        entry_id = meta.entry_id
        wanted = [n for n in self._names.get(entry_id, []) if names is None or n in names]
        tensors = {n: t for n in wanted if (t := self.tier.get(entry_id, n)) is not None}
        missing = [n for n in wanted if n not in tensors]
        if missing:
            blobs = self.redis.hmget(self.p + "t:" + entry_id, missing)
            for name, blob in zip(missing, blobs, strict=True):
                if blob is None:
                    raise KeyError(f"tensor {name!r} of entry {entry_id} is gone from Redis")
                tensors[name] = st_load(blob)[name]
                self._tier_put(entry_id, name, tensors[name])
        self.reads[entry_id] = "shared" if missing else "local"
        return CacheEntry.from_tensors(tensors, self._headers[entry_id], meta)

    def get(self, entry_id: str, names: Collection[str] | None = None) -> CacheEntry | None:
        entry = super().get(entry_id, names)
        if entry is not None and entry.meta.alias_of:  # read through its origin
            self.reads[entry_id] = self.reads[entry.meta.alias_of]
        return entry

    def _read_failed(self, origin: EntryMeta, exc: Exception) -> None:
        """An entry another process deleted during the read, or a Redis out of reach: a miss, and nothing to drop."""
        from redis.exceptions import RedisError

        if isinstance(exc, KeyError | RedisError):
            log.info("cache entry %s not read: %s", origin.entry_id, exc)
        else:
            super()._read_failed(origin, exc)

    def _tier_put(self, entry_id: str, name: str, tensor: torch.Tensor) -> None:
        fresh = entry_id not in self.tier.entries()
        left = self.tier.put(entry_id, name, tensor)
        if self.name is None:
            return
        pipe = self.redis.pipeline(transaction=False)
        if fresh and entry_id in self.tier.entries():
            pipe.sadd(self.p + "holders:" + entry_id, self.name)
        for gone in left:
            pipe.srem(self.p + "holders:" + gone, self.name)
        pipe.execute()

    def _delete(self, entry_id):
        self._delete_ids(entry_id)

    def _delete_ids(self, entry_id: str) -> list[str]:
        gone = [g.decode() for g in self._delete_script(keys=[self.p + "ids"], args=[self.p, entry_id, EVENTS_MAXLEN])]
        for gid in [entry_id, *gone]:
            self._meta.pop(gid, None)
            self.tier.drop(gid)
        return gone

    def _save_meta(self, meta):
        pass  # record_hit writes the counters in Redis itself

    # ---- the public interface, made cluster-wide --------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return int(self.redis.get(self.p + "bytes") or 0)

    def _remove(self, entry_id: str) -> list[str]:
        return self._delete_ids(entry_id)

    def record_hit(self, entry_id: str, saved_steps: int) -> None:
        key = self.p + "m:" + entry_id
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(key)
        pipe.hincrby(key, "hits", 1)
        pipe.hincrby(key, "saved_steps", int(saved_steps))
        pipe.hset(key, "last_access", repr(time.time()))
        exists = pipe.execute()[0]
        if not exists:  # removed meanwhile: the counters just written must not resurrect it
            self.redis.delete(key)

    def _evict(self, keep: str) -> list[str]:
        if self.nbytes <= self.budget_bytes:
            return []
        token = uuid.uuid4().hex
        deadline = time.monotonic() + 30
        while not self.redis.set(self.p + "lock", token, nx=True, px=30_000):
            if time.monotonic() > deadline:
                log.warning("cache eviction lock held for 30 s by another process: skipped this time")
                return []
            time.sleep(0.01)
        try:
            ids = [i.decode() for i in self.redis.smembers(self.p + "ids")]
            metas = [_meta_from(i, f) for i, f in zip(ids, self._fetch_metas(ids), strict=True) if f]
            total = self.nbytes
            evicted: list[str] = []
            for meta in self.policy.order([m for m in metas if m.entry_id != keep and not m.alias_of]):
                if total <= self.budget_bytes:
                    break
                total -= meta.nbytes
                evicted += self._delete_ids(meta.entry_id)
            return evicted
        finally:
            self._unlock(keys=[self.p + "lock"], args=[token])

    def holders(self, entry_id: str) -> set[str]:
        """The processes whose local tier holds some of this entry's tensors (an alias's: its origin's)."""
        meta = self._meta.get(entry_id)
        origin = meta.alias_of if meta is not None and meta.alias_of else entry_id
        return {h.decode() for h in self.redis.smembers(self.p + "holders:" + origin)}

    def close(self) -> None:
        if self.name is not None:  # this process's tier goes with it
            pipe = self.redis.pipeline(transaction=False)
            for entry_id in self.tier.entries():
                pipe.srem(self.p + "holders:" + entry_id, self.name)
            pipe.execute()
        self.redis.close()


def _event_key(event_id: bytes) -> tuple[int, int]:
    ms, seq = event_id.split(b"-")
    return int(ms), int(seq)


def _meta_from(entry_id: str, f: dict) -> EntryMeta:
    return EntryMeta(
        entry_id=entry_id,
        signature_key=f[b"signature_key"].decode(),
        prompt=f[b"prompt"].decode(),
        seed=int(f[b"seed"]),
        embedding=np.frombuffer(f[b"embedding"], dtype=np.float32).copy(),
        nbytes=int(f[b"nbytes"]),
        created_at=float(f[b"created_at"]),
        last_access=float(f[b"last_access"]),
        hits=int(f[b"hits"]),
        saved_steps=int(f[b"saved_steps"]),
        alias_of=f[b"alias_of"].decode() or None,
    )


__all__ = ["LocalTier", "RedisStore", "connect"]
