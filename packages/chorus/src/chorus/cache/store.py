"""Cache stores: in memory with a byte budget, and on disk (safetensors files plus a SQLite index).

Both keep the same small metadata (`EntryMeta`) for retrieval and eviction, and load only the tensors a plan asks
for (`get(entry_id, names)`): an exact repeat reads the final latent, a comparison the first step's prediction.
An alias row (`EntryMeta.alias_of`) has no tensors of its own: reading it reads its origin's, and it leaves with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from .entry import CacheEntry, EntryMeta
from .eviction import EvictionPolicy, LRUPolicy

log = logging.getLogger(__name__)


class CacheStore(ABC):
    """A byte-budgeted set of entries; `put` evicts by the policy until the budget holds again."""

    def __init__(self, budget_bytes: int, policy: EvictionPolicy | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes={budget_bytes}: must be positive")
        self.budget_bytes = int(budget_bytes)
        self.policy = policy or LRUPolicy()
        self._lock = threading.RLock()

    # Storage primitives, called with the lock held.
    @abstractmethod
    def _metas(self) -> dict[str, EntryMeta]: ...

    @abstractmethod
    def _write(self, entry: CacheEntry) -> None: ...

    @abstractmethod
    def _read(self, meta: EntryMeta, names: Collection[str] | None) -> CacheEntry: ...

    @abstractmethod
    def _delete(self, entry_id: str) -> None: ...

    @abstractmethod
    def _save_meta(self, meta: EntryMeta) -> None: ...

    # Public interface.
    def changes(self) -> tuple[list[EntryMeta], list[str]]:
        """Entries other processes added and removed since the last call; a store of one process has none."""
        return [], []

    def metas(self) -> list[EntryMeta]:
        with self._lock:
            return list(self._metas().values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._metas())

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._metas()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._metas().values())

    def put(self, entry: CacheEntry) -> list[str]:
        """Store an entry; returns the ids evicted to make room (the new entry's own id if it cannot be stored)."""
        meta = entry.meta
        meta.nbytes = 0 if meta.alias_of else entry.nbytes
        if meta.nbytes > self.budget_bytes:
            log.warning("cache entry of %d bytes exceeds the budget of %d: not stored", meta.nbytes, self.budget_bytes)
            return [meta.entry_id]
        with self._lock:
            if meta.alias_of and meta.alias_of not in self._metas():
                return [meta.entry_id]  # its origin left meanwhile
            if self._write(entry) is False:  # a shared store's origin check, made where the write is atomic
                return [meta.entry_id]
            return self._evict(keep=meta.entry_id)

    def get(self, entry_id: str, names: Collection[str] | None = None) -> CacheEntry | None:
        """Load an entry with the tensors named (all when None; names it lacks are left out); None if it is gone
        or unreadable (an unreadable entry is dropped)."""
        with self._lock:
            meta = self._metas().get(entry_id)
            origin = self._metas().get(meta.alias_of) if meta is not None and meta.alias_of else meta
            if origin is None:
                return None
            try:
                entry = self._read(origin, names)
            except Exception as exc:  # a damaged file must not take the request down: it is a miss
                self._read_failed(origin, exc)
                return None
            return entry if origin is meta else CacheEntry(meta, entry.signature, entry.tensors)

    def _read_failed(self, origin: EntryMeta, exc: Exception) -> None:
        log.warning("dropping unreadable cache entry %s: %s", origin.entry_id, exc)
        self._remove(origin.entry_id)

    def aliases(self, entry_id: str) -> list[str]:
        with self._lock:
            return [m.entry_id for m in self._metas().values() if m.alias_of == entry_id]

    def record_hit(self, entry_id: str, saved_steps: int) -> None:
        with self._lock:
            meta = self._metas().get(entry_id)
            if meta is None:
                return
            meta.hits += 1
            meta.saved_steps += int(saved_steps)
            meta.last_access = time.time()
            self._save_meta(meta)

    def remove(self, entry_id: str) -> list[str]:
        """Delete an entry and its aliases; returns the ids deleted."""
        with self._lock:
            return self._remove(entry_id)

    def _remove(self, entry_id: str) -> list[str]:
        gone = [entry_id, *(m.entry_id for m in self._metas().values() if m.alias_of == entry_id)]
        for gid in gone:
            self._delete(gid)
        return gone

    def _evict(self, keep: str) -> list[str]:
        metas = self._metas()
        total = sum(m.nbytes for m in metas.values())
        evicted: list[str] = []
        for meta in self.policy.order([m for m in metas.values() if m.entry_id != keep and not m.alias_of]):
            if total <= self.budget_bytes:
                break
            total -= meta.nbytes
            evicted += self._remove(meta.entry_id)
        return evicted


class MemoryStore(CacheStore):
    """Entries kept as tensors in this process."""

    def __init__(self, budget_bytes: int = 2 << 30, policy: EvictionPolicy | None = None):
        super().__init__(budget_bytes, policy)
        self._entries: dict[str, CacheEntry] = {}
        self._meta: dict[str, EntryMeta] = {}

    def _metas(self):
        return self._meta

    def _write(self, entry):
        if not entry.meta.alias_of:
            self._entries[entry.meta.entry_id] = entry
        self._meta[entry.meta.entry_id] = entry.meta

    def _read(self, meta, names):
        entry = self._entries[meta.entry_id]
        if names is None:
            return entry
        return CacheEntry(meta, entry.signature, {n: t for n, t in entry.tensors.items() if n in names})

    def _delete(self, entry_id):
        self._entries.pop(entry_id, None)
        self._meta.pop(entry_id, None)

    def _save_meta(self, meta):
        pass  # the meta object is the stored one


class DiskStore(CacheStore):
    """Entries as `entries/<id>.safetensors` plus a SQLite index, surviving restarts and crashes.

    Write order makes every crash safe: the file is written under a temporary name, fsynced and renamed into
    place, and only then is its index row committed. At open, rows without a file and files without a row (a
    crash between the two) are removed, as are leftover temporary files. A row therefore always names a complete
    file, and a file that still fails to load (disk damage) is dropped on read.
    """

    def __init__(self, root: str | Path, budget_bytes: int = 20 << 30, policy: EvictionPolicy | None = None):
        super().__init__(budget_bytes, policy)
        self.root = Path(root)
        self.entries_dir = self.root / "entries"
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS entries (
                entry_id TEXT PRIMARY KEY, signature_key TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
                embedding BLOB NOT NULL, nbytes INTEGER NOT NULL, created_at REAL NOT NULL,
                last_access REAL NOT NULL, hits INTEGER NOT NULL, saved_steps INTEGER NOT NULL, alias_of TEXT)"""
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        if "alias_of" not in columns:  # an index written before aliases existed
            self._db.execute("ALTER TABLE entries ADD COLUMN alias_of TEXT")
        self._meta = self._load_index()
        self._recover()

    def _path(self, entry_id: str) -> Path:
        return self.entries_dir / f"{entry_id}.safetensors"

    def _load_index(self) -> dict[str, EntryMeta]:
        rows = self._db.execute(
            "SELECT entry_id, signature_key, prompt, seed, embedding, nbytes, created_at, last_access, hits,"
            " saved_steps, alias_of FROM entries"
        ).fetchall()
        return {
            r[0]: EntryMeta(r[0], r[1], r[2], r[3], np.frombuffer(r[4], dtype=np.float32).copy(), *r[5:]) for r in rows
        }

    def _recover(self) -> None:
        for tmp in self.entries_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        on_disk = {p.stem for p in self.entries_dir.glob("*.safetensors")}
        for entry_id in {i for i, m in self._meta.items() if not m.alias_of} - on_disk:
            log.warning("cache index row %s has no file: removed", entry_id)
            self._remove(entry_id)
        for entry_id in [i for i, m in self._meta.items() if m.alias_of and m.alias_of not in self._meta]:
            self._delete(entry_id)
        for entry_id in on_disk - set(self._meta):
            log.warning("cache file %s has no index row (interrupted write): removed", entry_id)
            self._path(entry_id).unlink(missing_ok=True)

    def _metas(self):
        return self._meta

    def _write(self, entry):
        meta = entry.meta
        if not meta.alias_of:
            final = self._path(meta.entry_id)
            tmp = self.entries_dir / f".tmp-{meta.entry_id}-{os.getpid()}"
            try:
                save_file(entry.tensors, str(tmp), metadata=entry.header())
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.entries_dir)
            finally:
                tmp.unlink(missing_ok=True)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.entry_id,
                meta.signature_key,
                meta.prompt,
                meta.seed,
                np.asarray(meta.embedding, dtype=np.float32).tobytes(),
                meta.nbytes,
                meta.created_at,
                meta.last_access,
                meta.hits,
                meta.saved_steps,
                meta.alias_of,
            ),
        )
        self._meta[meta.entry_id] = meta

    def _read(self, meta, names):
        with safe_open(str(self._path(meta.entry_id)), framework="pt") as f:
            header = f.metadata()
            stored = f.keys()
            tensors = {name: f.get_tensor(name) for name in stored if names is None or name in names}
        return CacheEntry.from_tensors(tensors, header, meta)

    def _delete(self, entry_id):
        # Row first: a crash after it leaves an orphan file, which the next open removes.
        self._db.execute("DELETE FROM entries WHERE entry_id = ?", (entry_id,))
        self._meta.pop(entry_id, None)
        self._path(entry_id).unlink(missing_ok=True)

    def _save_meta(self, meta):
        self._db.execute(
            "UPDATE entries SET last_access = ?, hits = ?, saved_steps = ? WHERE entry_id = ?",
            (meta.last_access, meta.hits, meta.saved_steps, meta.entry_id),
        )

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._db.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
