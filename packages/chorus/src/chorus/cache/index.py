"""FAISS inner-product search over prompt embeddings, one index per generation signature."""

from __future__ import annotations

import itertools
import threading

import faiss
import numpy as np


class VectorIndex:
    """Exact cosine search (inner product over L2-normalised vectors), partitioned by signature key."""

    def __init__(self, dim: int):
        self.dim = dim
        self._indexes: dict[str, faiss.IndexIDMap2] = {}
        self._ids = itertools.count(1)
        self._by_entry: dict[str, tuple[str, int]] = {}
        self._by_int: dict[int, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_entry)

    def add(self, signature_key: str, entry_id: str, embedding: np.ndarray) -> None:
        vector = self._check(embedding)
        with self._lock:
            if entry_id in self._by_entry:
                return
            index = self._indexes.get(signature_key)
            if index is None:
                index = self._indexes[signature_key] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            int_id = next(self._ids)
            index.add_with_ids(vector, np.array([int_id], dtype=np.int64))
            self._by_entry[entry_id] = (signature_key, int_id)
            self._by_int[int_id] = entry_id

    def entry_ids(self) -> list[str]:
        with self._lock:
            return list(self._by_entry)

    def remove(self, entry_id: str) -> None:
        with self._lock:
            found = self._by_entry.pop(entry_id, None)
            if found is None:
                return
            signature_key, int_id = found
            self._indexes[signature_key].remove_ids(np.array([int_id], dtype=np.int64))
            del self._by_int[int_id]

    def search(self, signature_key: str, embedding: np.ndarray, k: int = 1) -> list[tuple[str, float]]:
        """The k nearest entries with this signature, as (entry_id, cosine similarity), best first."""
        vector = self._check(embedding)
        with self._lock:
            index = self._indexes.get(signature_key)
            if index is None or index.ntotal == 0:
                return []
            scores, ids = index.search(vector, min(k, index.ntotal))
            return [(self._by_int[int(i)], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def _check(self, embedding: np.ndarray) -> np.ndarray:
        vector = np.ascontiguousarray(embedding, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"embedding has dimension {vector.shape[1]}, the index expects {self.dim}")
        return vector
