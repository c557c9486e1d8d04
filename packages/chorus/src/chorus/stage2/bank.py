"""The feature bank: the self-attention keys and values a request computed, indexed by step, branch and kind.

A region step of a later request computes only its masked tokens and lets them attend to every token; the keys and
values of the unmasked tokens come from its source's bank at the same step. One tensor per (step, branch, kind)
holds all layers, `[layers, tokens, heads * head_dim]`, keys after their norm and rotary embedding, so a region step
reads each tensor whole and a store can load just the steps a plan needs. A model with several experts (Wan 2.2
A14B) records each step's features with the expert that ran it, and a region step uses only its own expert's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

BRANCHES = ("cond", "uncond")  # the names the adapter gives its transformer calls (diffusers' cache_context)
KINDS = ("k", "v")
_NAME = re.compile(r"^features/(cond|uncond)/(\d+)/([kv])(?:@(\d+))?$")


@dataclass(frozen=True, order=True)
class FeatureKey:
    step: int
    branch: str
    kind: str
    expert: int = 0  # which of the model's transformers ran the step

    def __post_init__(self):
        if self.branch not in BRANCHES or self.kind not in KINDS or self.step < 0 or self.expert < 0:
            raise ValueError(f"invalid feature key {self!r}")

    @property
    def name(self) -> str:
        """The tensor's name in a cache entry (`@expert` only for a model's second expert onwards)."""
        suffix = f"@{self.expert}" if self.expert else ""
        return f"features/{self.branch}/{self.step}/{self.kind}{suffix}"

    @classmethod
    def parse(cls, name: str) -> FeatureKey | None:
        """The key of a tensor name, or None for a tensor that is not a feature."""
        m = _NAME.match(name)
        return cls(int(m.group(2)), m.group(1), m.group(3), int(m.group(4) or 0)) if m else None


class FeatureBank(Mapping[FeatureKey, torch.Tensor]):
    """An immutable view of recorded features; `steps_for(branches)` says which steps a region step can use."""

    def __init__(self, tensors: Mapping[FeatureKey, torch.Tensor] | None = None):
        self._tensors = dict(tensors or {})

    def __getitem__(self, key: FeatureKey) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def kv(self, step: int, branch: str, expert: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._tensors[FeatureKey(step, branch, kind, expert)] for kind in KINDS)

    def steps_for(self, branches: Iterable[str], experts: Sequence[int] | None = None) -> set[int]:
        """Steps whose keys and values exist for every one of `branches`, recorded by the expert that runs the step
        (`experts[step]`; expert 0 for every step when None)."""
        branches = tuple(branches)
        steps = {k.step for k in self._tensors}
        return {
            s
            for s in steps
            if all(FeatureKey(s, b, kind, _expert(experts, s)) in self._tensors for b in branches for kind in KINDS)
        }

    def pinned(self) -> FeatureBank:
        """The same features in page-locked memory, so that copies to a GPU can run without blocking the host."""
        return FeatureBank({key: t.pin_memory() for key, t in self._tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {key.name: t for key, t in self._tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> FeatureBank:
        return cls({key: t for name, t in tensors.items() if (key := FeatureKey.parse(name)) is not None})

    @staticmethod
    def names(steps: Iterable[int], branches: Iterable[str], experts: Sequence[int] | None = None) -> list[str]:
        """The tensor names a plan needs for region steps `steps` under `branches` (`experts` as in `steps_for`)."""
        branches = tuple(branches)
        return [
            FeatureKey(s, b, kind, _expert(experts, s)).name
            for s in sorted(set(steps))
            for b in branches
            for kind in KINDS
        ]


def _expert(experts: Sequence[int] | None, step: int) -> int:
    return 0 if experts is None or step >= len(experts) else experts[step]
