"""What the cache keeps of a finished request, and the signature that says which requests may share it."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class GenerationSignature:
    """Everything besides the prompt and seed that shapes a denoising trajectory.

    Only requests with equal signatures may reuse each other's latents: a latent of another size, step count,
    scheduler, guidance or dtype is not a point on the target's trajectory. The device is not in it: a cache serves
    the same model on any device.
    """

    model: str
    family: str
    dtype: str
    model_config: str
    scheduler: str
    scheduler_config: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str
    max_sequence_length: int

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def to_dict(self) -> dict:
        return asdict(self)


def new_entry_id() -> str:
    return uuid.uuid4().hex


@dataclass
class EntryMeta:
    """The small part of an entry: what retrieval and eviction read without loading tensors."""

    entry_id: str
    signature_key: str
    prompt: str
    seed: int
    embedding: np.ndarray  # float32 [dim], L2-normalised
    nbytes: int
    created_at: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)
    hits: int = 0
    saved_steps: int = 0  # denoising steps this entry has saved over all its hits
    # A request whose result is another entry's (every step after its first was the source's) stores no tensors of
    # its own: its row names that entry, and goes when it goes.
    alias_of: str | None = None

    @property
    def origin(self) -> str:
        """The entry whose tensors these are: its own, or the one it is an alias of."""
        return self.alias_of or self.entry_id


# Tensor names in an entry; the features are named by `chorus.stage2.FeatureKey`.
TRAJECTORY = "trajectory"  # [N + 1, C, F, H, W]: the latent at every step boundary, in the cache dtype
FINAL_LATENT = "final_latent"  # [1, C, F, H, W] float32: an exact repeat decodes to the very same frames
PROBE = "probe"  # [C, F, H, W]: the clean latent the model predicted at the first step (what a later request compares)
# [F', H', W'] per latent token: how far the final latent moved from that first prediction (where it was not settled)
UNSETTLED = "unsettled"
EMBEDDING = "embedding"


@dataclass
class CacheEntry:
    """A finished request's tensors (all of them, or the subset a plan loaded) with its metadata.

    `trajectory[k]` is the latent after k denoising steps (k = 0 is the initial noise, k = N the final latent).
    """

    meta: EntryMeta
    signature: GenerationSignature
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, meta, signature, trajectory, final_latent, probe=None, unsettled=None, features=None) -> CacheEntry:
        tensors = {TRAJECTORY: trajectory.contiguous(), FINAL_LATENT: final_latent.contiguous()}
        if probe is not None:
            tensors[PROBE] = probe.contiguous()
        if unsettled is not None:
            tensors[UNSETTLED] = unsettled.contiguous()
        if features is not None:
            tensors.update({name: t.contiguous() for name, t in features.to_tensors().items()})
        tensors[EMBEDDING] = torch.from_numpy(np.ascontiguousarray(meta.embedding, dtype=np.float32))
        return cls(meta, signature, tensors)

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"cache entry {self.meta.entry_id}: tensor {name!r} was not loaded or is not stored")
        return self.tensors[name]

    @property
    def trajectory(self) -> torch.Tensor:
        return self._get(TRAJECTORY)

    @property
    def final_latent(self) -> torch.Tensor:
        return self._get(FINAL_LATENT)

    @property
    def probe(self) -> torch.Tensor | None:
        return self.tensors.get(PROBE)

    @property
    def unsettled(self) -> torch.Tensor | None:
        return self.tensors.get(UNSETTLED)

    @property
    def features(self):
        from ..stage2.bank import FeatureBank

        return FeatureBank.from_tensors(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def header(self) -> dict[str, str]:
        """String metadata stored inside the entry's file, so a file alone is enough to rebuild its entry."""
        m = self.meta
        return {
            "entry_id": m.entry_id,
            "prompt": m.prompt,
            "seed": str(m.seed),
            "signature": json.dumps(self.signature.to_dict(), sort_keys=True),
            "created_at": repr(m.created_at),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], header: dict[str, str], meta: EntryMeta) -> CacheEntry:
        signature = GenerationSignature(**json.loads(header["signature"]))
        if header["entry_id"] != meta.entry_id or signature.key() != meta.signature_key:
            raise ValueError(f"cache entry {meta.entry_id}: file header does not match its index row")
        return cls(meta, signature, tensors)
