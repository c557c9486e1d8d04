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
    scheduler or guidance is not a point on the target's trajectory.
    """

    model: str
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


@dataclass
class CacheEntry:
    """A finished request: its trajectory (latent at every step boundary) and what stage 2 will need.

    `trajectory[k]` is the latent after k denoising steps (k = 0 is the initial noise, k = N the final latent),
    stored in the cache dtype; `final_latent` keeps the final latent in float32 so that an exact repeat decodes
    to the very same frames. `extras` holds named tensors for later stages (attention maps, layer features).
    """

    meta: EntryMeta
    signature: GenerationSignature
    trajectory: torch.Tensor
    final_latent: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "trajectory": self.trajectory.contiguous(),
            "final_latent": self.final_latent.contiguous(),
            "embedding": torch.from_numpy(np.ascontiguousarray(self.meta.embedding, dtype=np.float32)),
        }
        out.update({f"extra.{name}": t.contiguous() for name, t in self.extras.items()})
        return out

    @staticmethod
    def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

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
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(meta, signature, tensors["trajectory"], tensors["final_latent"], extras)
