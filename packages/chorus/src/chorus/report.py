"""The report every generation carries: what was reused, from where, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationReport:
    request_id: str
    prompt: str
    seed: int
    signature_key: str
    outcome: str  # "miss", "hit" (stage-1 reuse), "exact" (stored result, no denoising) or "off" (cache disabled)
    num_steps: int
    k1: int = 0
    k2: int = 0
    similarity: float | None = None
    source_id: str | None = None
    source_prompt: str | None = None
    transformer_calls: int = 0
    steps_computed: int = 0
    steps_reused: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: encode, retrieval, stage1..3, decode
    total_seconds: float = 0.0
    seconds_saved_estimate: float = 0.0
    stored: bool = False
    # stage 2 (region reuse with TGAA), when a hit had a region to recompute
    mask_fraction: float | None = None
    alpha: float | None = None
    prompt_diff: dict | None = None  # {"changed": target words, "dropped": source words}
    stage2_restricted_steps: list[int] = field(default_factory=list)
    flops_full_step: int | None = None  # transformer FLOPs of one full step (all passes)
    flops_stage2_step: int | None = None  # ... and of one region-restricted stage-2 step

    @property
    def hit(self) -> bool:
        return self.outcome in ("hit", "exact")

    def to_dict(self) -> dict:
        return {**asdict(self), "hit": self.hit}
