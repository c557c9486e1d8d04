"""The request cache: entries, stores, eviction and retrieval."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .entry import CacheEntry, EntryMeta, GenerationSignature, new_entry_id
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
        for meta in store.metas():  # a disk store brings its entries back after a restart
            self.index.add(meta.signature_key, meta.entry_id, meta.embedding)

    def __len__(self) -> int:
        return len(self.store)

    def nearest(self, signature_key: str, embedding: np.ndarray) -> Match | None:
        found = self.index.search(signature_key, embedding, k=1)
        return Match(*found[0]) if found else None

    def exact(self, signature_key: str, prompt: str, seed: int) -> str | None:
        """The id of an entry made by the same prompt, signature and seed, if any."""
        for meta in self.store.metas():
            if meta.signature_key == signature_key and meta.prompt == prompt and meta.seed == seed:
                return meta.entry_id
        return None

    def load(self, entry_id: str) -> CacheEntry | None:
        entry = self.store.get(entry_id)
        if entry is None:
            self.index.remove(entry_id)
        return entry

    def insert(self, entry: CacheEntry) -> None:
        evicted = self.store.put(entry)
        if entry.meta.entry_id not in evicted:
            self.index.add(entry.meta.signature_key, entry.meta.entry_id, entry.meta.embedding)
        for entry_id in evicted:
            self.index.remove(entry_id)
        if evicted:
            log.info("cache evicted %d entries (%s policy)", len(evicted), self.store.policy.name)

    def record_hit(self, entry_id: str, saved_steps: int) -> None:
        self.store.record_hit(entry_id, saved_steps)


__all__ = [
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
