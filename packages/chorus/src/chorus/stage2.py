"""Stage 2 of a hit: selective region denoising with Token-Guided Attention Amplification (TGAA).

In the middle steps k1..k2 a hit recomputes only the latent tokens tied to what differs between the two prompts
(the region mask from `regions`), and the rest follows the source's cached trajectory. The work really shrinks:
only masked tokens enter the transformer, and in self-attention they see the unmasked tokens through the source's
cached keys/values of that step (see `attention`). To serve as a source later, a request records those features
(and the cross-attention queries the mask is computed from) at the steps a hit could use, within a byte budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .attention import Stage2Controller, kv_name, query_name
from .planner import Planner, StagePlan
from .regions import MaskConfig, PromptDiff, prompt_diff, region_mask


@dataclass(frozen=True)
class Stage2Config:
    enabled: bool = True
    alpha: float = 2.0  # TGAA factor on the attention to the changed prompt tokens; 1 disables TGAA
    alpha_schedule: str = "constant"  # or "linear": from alpha at k1 down to 1 at the end of amplification
    tgaa_stage3_steps: int = 0  # keep amplifying (inside the mask) for this many steps of stage 3
    # Measured on the built-in model (docs/stage2/mask_quality_4.json, 12 colour edits): the average of the
    # best-localising quarter of the (layer, head) maps peaks on the object to change; with half of them it is
    # flat and the 0.5 threshold takes 69% of the tokens. One token of spatial dilation raises the object's recall
    # from 0.45 to 0.83 at 26% of the tokens.
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(top_fraction=0.25, dilate=1, temporal_window=0))
    max_feature_bytes: int = 256 << 20  # per cached request: self-attention K/V and queries for later hits

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r}: must be a positive finite number")
        if self.alpha_schedule not in ("constant", "linear"):
            raise ValueError(f"alpha_schedule={self.alpha_schedule!r}: expected 'constant' or 'linear'")
        if self.tgaa_stage3_steps < 0:
            raise ValueError("tgaa_stage3_steps must be >= 0")


@dataclass
class Region:
    """The outcome of stage-2 preparation for one hit."""

    diff: PromptDiff
    token_mask: torch.Tensor  # bool [F', H', W'] over latent tokens
    latent_mask: torch.Tensor  # bool [1, 1, F, H, W] over latent elements
    text_bias: torch.Tensor | None  # [T] log(alpha) on the changed tokens, None when alpha = 1 or nothing changed

    @property
    def fraction(self) -> float:
        return float(self.token_mask.float().mean())

    @property
    def token_index(self) -> torch.Tensor:
        return self.token_mask.flatten().nonzero().flatten()


class RegionReuse:
    """Stage-2 machinery for one adapter: what to record while computing, and how to reuse it on a hit."""

    def __init__(self, adapter, planner: Planner, config: Stage2Config):
        self.adapter, self.planner, self.config = adapter, planner, config
        self.controller = Stage2Controller(adapter.transformer)
        self.runtime = self.controller.runtime

    # ---- geometry ----------------------------------------------------------------------------------------

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        pt, ph, pw = self.adapter.patch_size
        _, _, f, h, w = latent_shape
        return f // pt, h // ph, w // pw

    def latent_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.adapter.patch_size
        mask = token_mask.repeat_interleave(pt, 0).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        return mask[None, None]

    # ---- what a computing request records ----------------------------------------------------------------

    def capture_steps(self, num_steps: int, latent_shape, passes: int) -> tuple[set[int], set[int]]:
        """(steps whose cross-attention queries to record, steps whose self-attention K/V to record)."""
        if not self.config.enabled:
            return set(), set()
        plans = self.planner.candidates(num_steps)
        query_steps = {p.k1 for p in plans if p.k2 > p.k1}
        kv_steps = sorted({i for p in plans for i in range(p.k1, p.k2)})
        tokens = math.prod(self.token_grid(latent_shape))
        dim = self.adapter.transformer.config.num_attention_heads * self.adapter.transformer.config.attention_head_dim
        layers = len(self.adapter.transformer.blocks)
        query_bytes = len(query_steps) * layers * tokens * dim * 2
        kv_step_bytes = 2 * passes * layers * tokens * dim * 2
        budget = self.config.max_feature_bytes - query_bytes
        affordable = max(0, budget // max(kv_step_bytes, 1))
        return (query_steps if budget >= 0 else set()), set(kv_steps[:affordable])

    # ---- what a hit reuses ---------------------------------------------------------------------------------

    def prepare(self, source, target_prompt: str, target_embeds, plan: StagePlan, latent_shape) -> Region | None:
        """The region mask and TGAA bias for a hit, or None when the source lacks the features for it."""
        if not self.config.enabled or plan.k2 <= plan.k1:
            return None
        layers = len(self.adapter.transformer.blocks)
        names = [query_name(plan.k1, layer) for layer in range(layers)]
        if not all(n in source.extras for n in names):
            return None
        max_len = self.adapter.defaults.max_sequence_length
        diff = prompt_diff(self.adapter.tokenizer, source.meta.prompt, target_prompt, max_len)
        grid = self.token_grid(latent_shape)
        if diff.is_empty:
            token_mask = torch.zeros(grid, dtype=torch.bool)
        else:
            source_embeds = self.adapter.encode_prompt(source.meta.prompt, None, 1.0, max_len).cond
            queries = [source.extras[n][0] for n in names]
            # the mask is built on the CPU, where the cached queries live; the region then moves to the model
            target_keys = [k[0].cpu() for k in self.controller.text_keys(target_embeds.cond)]
            source_keys = [k[0].cpu() for k in self.controller.text_keys(source_embeds)]
            token_mask = region_mask(grid, diff, queries, target_keys, source_keys, self.config.mask)
        bias = None
        if self.config.alpha != 1.0 and diff.changed_tokens:
            bias = torch.zeros(max_len)
            bias[[t for t in diff.changed_tokens if t < max_len]] = math.log(self.config.alpha)
        device = self.adapter.device
        return Region(
            diff,
            token_mask.to(device),
            self.latent_mask(token_mask).to(device),
            None if bias is None else bias.to(device),
        )

    def has_features(self, source, step: int, passes: int) -> bool:
        layers = len(self.adapter.transformer.blocks)
        return all(
            kv_name(step, p, layer, which) in source.extras
            for p in range(passes)
            for layer in range(layers)
            for which in ("k", "v")
        )

    def alpha_scale(self, step: int, plan: StagePlan) -> float:
        """Multiplier of log(alpha) at this step (1 = full amplification)."""
        end = plan.k2 + self.config.tgaa_stage3_steps
        if step >= end:
            return 0.0
        if self.config.alpha_schedule == "constant":
            return 1.0
        return 1.0 - (step - plan.k1) / max(end - plan.k1, 1)

    def configure_step(self, step, plan, region, source, capture_q, capture_kv, restricted) -> None:
        """Set the shared runtime for the transformer calls of one step."""
        rt = self.runtime
        rt.reset()
        rt.begin_step(step)
        rt.capture_queries, rt.capture_kv = capture_q, capture_kv
        scale = self.alpha_scale(step, plan) if region is not None and region.text_bias is not None else 0.0
        if scale > 0:
            rt.text_bias, rt.bias_rows = region.text_bias * scale, region.token_mask.flatten()
        if restricted:
            rt.mode, rt.token_index, rt.num_tokens = "restricted", region.token_index, region.token_mask.numel()
            prefix = f"kv.{step}."
            device = self.adapter.device  # cached features live on the CPU
            rt.source_features = {k: v.to(device) for k, v in source.extras.items() if k.startswith(prefix)}
        elif capture_q or capture_kv or rt.text_bias is not None:
            rt.mode = "active"

    def take_captured(self) -> dict[str, torch.Tensor]:
        captured, self.runtime.captured = self.runtime.captured, {}
        return captured
