"""The report every generation carries: what was reused, from where, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationReport:
    request_id: str
    prompt: str
    seed: int
    signature_key: str
    outcome: str  # "miss", "hit" (steps reused), "exact" (stored result, no denoising) or "off" (cache disabled)
    num_steps: int
    # The model that made it: its name, family (`chorus.models.loading.FAMILIES`), device and dtype.
    model: str = ""
    family: str = ""
    device: str = ""
    dtype: str = ""
    # What the planner found (`chorus.planner`): "exact", "none", "local", "global", "miss" or "unassessed", and the
    # plan in short: one letter per step, c(ompute), r(egion), - (reused).
    difference: str = "miss"
    plan: str = ""
    miss_reason: str | None = None
    k1: int = 0  # leading steps taken from the source
    similarity: float | None = None
    source_id: str | None = None
    source_prompt: str | None = None
    candidates_compared: int = 0  # cached requests whose first-step prediction was compared with this one's
    transformer_calls: int = 0
    steps_computed: int = 0
    steps_reused: int = 0
    stage2_steps: list[int] = field(default_factory=list)  # steps computed only in the region
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: retrieval, encode, probe, stage1..3, decode
    total_seconds: float = 0.0
    steps_saved: float = 0.0  # reused steps plus the share of each region step's work not done
    seconds_saved_estimate: float = 0.0
    stored: bool = False
    # stage 2
    mask_fraction: float | None = None  # share of the latent tokens that differ from the source (the region)
    alpha: float | None = None  # TGAA factor
    prompt_diff: dict | None = None  # {"changed": target words, "dropped": source words}
    stage2_fallback: str | None = None  # why a local difference was computed in full (a family without region steps)
    experts: list[int] | None = None  # which expert ran each step (models with several, e.g. Wan 2.2 A14B)
    flops_full_step: int | None = None  # transformer FLOPs of one full step (all passes)
    flops_region_step: int | None = None  # ... and of one region step
    flops: int | None = None  # transformer FLOPs the plan computes in all

    @property
    def hit(self) -> bool:
        return self.outcome in ("hit", "exact")

    def to_dict(self) -> dict:
        return {**asdict(self), "hit": self.hit}
