"""Which entries leave when a store is over its byte budget."""

from __future__ import annotations

from typing import Protocol

from .entry import EntryMeta


class EvictionPolicy(Protocol):
    name: str

    def order(self, metas: list[EntryMeta]) -> list[EntryMeta]:
        """The entries, first to evict first."""


class LRUPolicy:
    """Least recently used (created or hit) goes first."""

    name = "lru"

    def order(self, metas: list[EntryMeta]) -> list[EntryMeta]:
        return sorted(metas, key=lambda m: m.last_access)


class BenefitPolicy:
    """NIRVANA's idea (LCBFU): keep what saves the most compute, per byte: what a hit saves times how often hit.

    score = (hits + 1) * steps saved per hit / size. An entry never hit yet is credited `prior_saved_steps` per hit
    so that new entries get a chance; ties go to the least recently used.
    """

    name = "benefit"

    def __init__(self, prior_saved_steps: float = 1.0):
        self.prior_saved_steps = prior_saved_steps

    def score(self, m: EntryMeta) -> float:
        per_hit = m.saved_steps / m.hits if m.hits else self.prior_saved_steps
        return (m.hits + 1) * per_hit / max(m.nbytes, 1)

    def order(self, metas: list[EntryMeta]) -> list[EntryMeta]:
        return sorted(metas, key=lambda m: (self.score(m), m.last_access))


def make_policy(name: str) -> EvictionPolicy:
    policies = {"lru": LRUPolicy, "benefit": BenefitPolicy}
    if name not in policies:
        raise ValueError(f"eviction policy {name!r}: expected one of {sorted(policies)}")
    return policies[name]()
