"""The request cache: entries, stores, eviction and retrieval."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .entry import (
    EMBEDDING,
    FINAL_LATENT,
    PROBE,
    TRAJECTORY,
    UNSETTLED,
    CacheEntry,
    EntryMeta,
    GenerationSignature,
    new_entry_id,
)
from .eviction import BenefitPolicy, EvictionPolicy, LRUPolicy, make_policy
from .index import VectorIndex
from .store import CacheStore, DiskStore, MemoryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    entry_id: str
    similarity: float


class RequestCache:
    """A store plus the vector index over its entries; the engine's only view of the cache."""

    def __init__(self, store: CacheStore, embedding_dim: int):
        self.store = store
        self.index = VectorIndex(embedding_dim)
        self._by_prompt: dict[tuple[str, str], dict[int, str]] = {}  # (signature, prompt) -> seed -> entry id
        for meta in store.metas():  # a disk store brings its entries back after a restart
            self._remember(meta)

    def __len__(self) -> int:
        return len(self.store)

    def nearest(self, signature_key: str, embedding: np.ndarray, k: int = 1, exclude_prompt: str | None = None):
        """Up to k matches with this signature, best first, leaving out entries of the prompt `exclude_prompt`."""
        self.sync()
        skip = set(self._by_prompt.get((signature_key, exclude_prompt), {}).values()) if exclude_prompt else set()
        found = self.index.search(signature_key, embedding, k=k + len(skip))
        return [Match(entry_id, sim) for entry_id, sim in found if entry_id not in skip][:k]

    def exact(self, signature_key: str, prompt: str, seed: int) -> str | None:
        """The id of an entry made by the same prompt, signature and seed, if any."""
        self.sync()
        return self._by_prompt.get((signature_key, prompt), {}).get(seed)

    def seeds(self, signature_key: str, prompt: str) -> set[int]:
        """The seeds this very prompt is cached under."""
        self.sync()
        return set(self._by_prompt.get((signature_key, prompt), {}))

    def load(self, entry_id: str, names=None) -> CacheEntry | None:
        """The entry with the tensors named (all when None), or None if it is gone (then forgotten)."""
        entry = self.store.get(entry_id, names)
        if entry is None:  # evicted, or unreadable and dropped with its aliases
            known = {m.entry_id for m in self.store.metas()}
            self._forget([entry_id, *(i for i in self.index.entry_ids() if i not in known)])
        return entry

    def insert(self, entry: CacheEntry) -> None:
        evicted = self.store.put(entry)
        if entry.meta.entry_id not in evicted:
            self._remember(entry.meta)
        self._forget(evicted)
        if evicted:
            log.info("cache evicted %d entries (%s policy)", len(evicted), self.store.policy.name)

    def record_hit(self, entry_id: str, saved_steps: int) -> None:
        self.store.record_hit(entry_id, saved_steps)

    def sync(self) -> None:
        """Take in what other processes sharing the store added or removed (a shared store: `RedisStore`)."""
        added, removed = self.store.changes()
        for meta in added:
            self._remember(meta)
        if removed:
            self._forget(removed)

    def _remember(self, meta: EntryMeta) -> None:
        self.index.add(meta.signature_key, meta.entry_id, meta.embedding)
        self._by_prompt.setdefault((meta.signature_key, meta.prompt), {})[meta.seed] = meta.entry_id

    def _forget(self, entry_ids) -> None:
        for entry_id in entry_ids:
            self.index.remove(entry_id)
        gone = set(entry_ids)
        for key, seeds in list(self._by_prompt.items()):
            for seed, entry_id in list(seeds.items()):
                if entry_id in gone:
                    del seeds[seed]
            if not seeds:
                del self._by_prompt[key]


__all__ = [
    "EMBEDDING",
    "FINAL_LATENT",
    "PROBE",
    "TRAJECTORY",
    "UNSETTLED",
    "BenefitPolicy",
    "CacheEntry",
    "CacheStore",
    "DiskStore",
    "EntryMeta",
    "EvictionPolicy",
    "GenerationSignature",
    "LRUPolicy",
    "Match",
    "MemoryStore",
    "RequestCache",
    "VectorIndex",
    "make_policy",
    "new_entry_id",
]
