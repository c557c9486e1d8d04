"""The Chorus engine: runs each request's denoising loop and reuses the work of earlier, similar requests.

A request is looked up in the cache by its prompt embedding among entries with the same generation signature.
An exact repeat (same prompt, signature and seed) returns the stored result with no denoising. Otherwise the
planner turns the best match's similarity into a stage plan; on a hit the loop starts from the source's latent
after k1 steps and computes the rest. Every finished request is stored for the requests after it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import transformer_flops
from .cache import (
    CacheEntry,
    DiskStore,
    EntryMeta,
    GenerationSignature,
    MemoryStore,
    RequestCache,
    make_policy,
    new_entry_id,
)
from .embed import Embedder, make_embedder
from .models import FlowVideoDiTAdapter, load_adapter
from .planner import Planner, PlannerConfig, StagePlan
from .report import GenerationReport
from .request import GenerationRequest, ModelLimits
from .stage2 import Region, RegionReuse, Stage2Config

log = logging.getLogger(__name__)

# The request `_generate` runs: a `GenerationRequest` with the model's defaults filled in (`ModelLimits.complete`).
Request = GenerationRequest


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] float32 in [0, 1]
    report: GenerationReport


class ChorusEngine:
    def __init__(
        self,
        adapter: FlowVideoDiTAdapter,
        cache: RequestCache | None = None,
        embedder: Embedder | None = None,
        planner: Planner | None = None,
        cache_dtype: torch.dtype = torch.float16,
        stage2: Stage2Config | None = None,
        intra_cache=None,
    ):
        """`intra_cache`: a `diffusers.hooks` cache config (e.g. `FirstBlockCacheConfig`) to combine with reuse
        across requests; it skips work within each request's own remaining steps."""
        self.adapter = adapter
        self.intra_cache = intra_cache
        if intra_cache is not None:
            adapter.transformer.enable_cache(intra_cache)
        self.cache = cache
        self.embedder = embedder or (make_embedder("auto", adapter) if cache is not None else None)
        self.planner = planner or Planner()
        stage2 = stage2 or Stage2Config()
        # Stage 2 installs Chorus's attention processors; without a cache there is nothing to reuse.
        self.region_reuse = RegionReuse(adapter, self.planner, stage2) if cache is not None and stage2.enabled else None
        self.cache_dtype = cache_dtype
        self._calls = 0
        self._count_handle = adapter.transformer.register_forward_pre_hook(self._count_call)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "builtin",
        *,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        cache_bytes: int = 4 << 30,
        eviction: str = "benefit",
        embedder: str = "auto",
        planner: PlannerConfig | None = None,
        cache_dtype: torch.dtype = torch.float16,
        stage2: Stage2Config | None = None,
        intra_cache=None,
        device: str = "cpu",
    ) -> ChorusEngine:
        """An engine for a model name or directory; a disk cache under `cache_dir`, else an in-memory one."""
        adapter = load_adapter(model, device=device)
        cache = None
        if use_cache:
            policy = make_policy(eviction)
            store = (
                DiskStore(cache_dir, cache_bytes, policy) if cache_dir is not None else MemoryStore(cache_bytes, policy)
            )
            emb = make_embedder(embedder, adapter)
            cache = RequestCache(store, emb.dim)
            return cls(adapter, cache, emb, Planner(planner), cache_dtype, stage2, intra_cache)
        return cls(adapter, None, None, Planner(planner), cache_dtype, intra_cache=intra_cache)

    def close(self) -> None:
        """Take Chorus's hooks and processors off the model and close the cache store."""
        self._count_handle.remove()
        if self.intra_cache is not None:
            self.adapter.transformer.disable_cache()
        if self.region_reuse is not None:
            self.region_reuse.controller.remove()
        if self.cache is not None and hasattr(self.cache.store, "close"):
            self.cache.store.close()

    def _count_call(self, module, args):
        self._calls += 1

    # ---- the request path -------------------------------------------------------------------------------

    def signature(self, req: Request) -> GenerationSignature:
        return GenerationSignature(
            **self.adapter.identity(),
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_steps,
            guidance_scale=req.guidance_scale,
            negative_prompt=req.negative_prompt if req.guidance_scale > 1.0 else "",
            max_sequence_length=self.adapter.defaults.max_sequence_length,
        )

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        guidance_scale: float | None = None,
        cache_policy: str = "reuse",
        progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate one video; the arguments mirror `WanPipeline.__call__`. Bad arguments raise
        `chorus.request.RequestError` (a ValueError naming the field) before anything is computed or stored.
        `on_step(done, total)` is called after every denoising step (reused steps count as done at once)."""
        req = ModelLimits.from_adapter(self.adapter).complete(
            GenerationRequest.parse(
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                num_frames=num_frames,
                guidance_scale=guidance_scale,
                cache_policy=cache_policy,
            )
        )
        with self._lock:
            return self._generate(req, progress, on_step, request_id)

    def _generate(self, req: Request, progress, on_step, request_id) -> GenerationResult:
        t_start = time.perf_counter()
        calls_before = self._calls
        signature = self.signature(req)
        key, steps = signature.key(), req.num_steps
        report = GenerationReport(
            request_id=request_id or new_entry_id(),
            prompt=req.prompt,
            seed=req.seed,
            signature_key=key,
            outcome="off" if self.cache is None or req.cache_policy == "off" else "miss",
            num_steps=steps,
        )
        seconds = report.seconds
        reading = report.outcome != "off" and req.cache_policy == "reuse"
        writing = report.outcome != "off"

        with _timed(seconds, "retrieval"):
            exact_id = self.cache.exact(key, req.prompt, req.seed) if reading else None
            exact = self.cache.load(exact_id) if exact_id else None
        if exact is not None:
            return self._serve_exact(exact, report, t_start)

        with _timed(seconds, "retrieval"):
            embedding = self.embedder.embed([req.prompt])[0] if writing else None
            plan, source = self._plan(key, embedding, steps) if reading else (StagePlan(steps), None)

        with _timed(seconds, "encode"):
            embeds = self.adapter.encode_prompt(
                req.prompt, req.negative_prompt, req.guidance_scale, self.adapter.defaults.max_sequence_length
            )
            latents = self.adapter.initial_latents(req.height, req.width, req.num_frames, req.seed)
        passes = 2 if embeds.uncond is not None else 1
        run = _Run(plan=plan, source=source, trajectory=[latents[0].to(self.cache_dtype)], passes=passes)
        if source is not None:
            # Stage 1: skip the first k1 steps by continuing from where the source stood after them.
            run.trajectory = list(source.trajectory[: plan.k1 + 1])
            latents = source.trajectory[plan.k1][None].to(latents.device, torch.float32)
            if self.region_reuse is not None:
                with _timed(seconds, "region"):
                    run.region = self.region_reuse.prepare(source, req.prompt, embeds, plan, latents.shape)
                if run.region is not None:
                    run.plan = plan = self.planner.with_mask_fraction(plan, run.region.fraction)
        if writing and self.region_reuse is not None:
            run.capture_q, run.capture_kv = self.region_reuse.capture_steps(steps, latents.shape, passes)

        latents = self._denoise(latents, embeds, req.guidance_scale, run, seconds, progress, on_step)

        with _timed(seconds, "decode"):
            frames = self.adapter.decode(latents).numpy()

        report.k1, report.k2 = plan.k1, plan.k2
        report.steps_reused, report.steps_computed = plan.k1, steps - plan.k1
        report.transformer_calls = self._calls - calls_before
        self._report_stage2(report, run, embeds, latents.shape)
        computing = sum(seconds.get(s, 0.0) for s in ("stage2", "stage3"))
        if source is not None:
            report.outcome, report.similarity = "hit", plan.similarity
            report.source_id, report.source_prompt = source.meta.entry_id, source.meta.prompt
            report.seconds_saved_estimate = computing / max(report.steps_computed, 1) * plan.k1
            self.cache.record_hit(source.meta.entry_id, plan.k1)
        elif plan.similarity is not None:
            report.similarity = plan.similarity
        if writing:
            report.stored = self._store(report, signature, req, embedding, run, latents)
        report.total_seconds = time.perf_counter() - t_start
        log.info("generation done", extra={"report": report.to_dict()})
        return GenerationResult(frames, report)

    def _plan(self, key: str, embedding: np.ndarray, steps: int) -> tuple[StagePlan, CacheEntry | None]:
        match = self.cache.nearest(key, embedding)
        if match is None:
            return StagePlan(steps), None
        plan = self.planner.plan(match.similarity, steps, match.entry_id)
        if not plan.is_hit:
            return plan, None
        source = self.cache.load(match.entry_id)
        if source is None:  # evicted or unreadable since the search: a miss
            return StagePlan(steps, similarity=match.similarity), None
        return plan, source

    def _denoise(self, latents, embeds, guidance, run: _Run, seconds, progress, on_step) -> torch.Tensor:
        plan, source, region = run.plan, run.source, run.region
        scheduler = self.adapter.new_scheduler()
        scheduler.set_timesteps(plan.num_steps, device=self.adapter.device)
        scheduler.set_begin_index(plan.k1)
        timesteps, sigmas = scheduler.timesteps, scheduler.sigmas
        bar = tqdm(total=plan.num_steps, initial=plan.k1, desc="denoising", disable=not progress, leave=False)
        self._reset_intra_cache()
        try:
            for i in range(plan.k1, plan.num_steps):
                t = timesteps[i]
                restricted = (
                    region is not None
                    and plan.stage_of(i) == "stage2"
                    and self.region_reuse.has_features(source, i, run.passes)
                )
                if self.region_reuse is not None:
                    self.region_reuse.configure_step(
                        i, plan, region, source, i in run.capture_q, i in run.capture_kv, restricted
                    )
                if restricted:
                    self._reset_intra_cache()  # intra-request caches compare whole-grid activations across steps
                with _timed(seconds, plan.stage_of(i)):
                    if restricted and not region.token_mask.any():
                        noise = None  # nothing to recompute: the step is the source's
                    else:
                        noise = self.adapter.predict(
                            latents, t, embeds, guidance, step_index=i, sigma=float(sigmas[i]), num_steps=len(timesteps)
                        )
                    if restricted:
                        # Outside the mask, follow the source: its velocity keeps multistep schedulers' history
                        # consistent, and its next latent is taken exactly.
                        src_now, src_next = (source.trajectory[j][None].to(latents) for j in (i, i + 1))
                        src_velocity = (src_next - src_now) / (sigmas[i + 1] - sigmas[i]).to(latents)
                        noise = src_velocity if noise is None else torch.where(region.latent_mask, noise, src_velocity)
                        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                        latents = torch.where(region.latent_mask, latents, src_next)
                        run.restricted_steps.append(i)
                        self._reset_intra_cache()
                    else:
                        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                run.trajectory.append(latents[0].to(self.cache_dtype))
                bar.update()
                if on_step is not None:
                    on_step(i + 1, plan.num_steps)
        finally:
            bar.close()
            if self.region_reuse is not None:
                run.captured = self.region_reuse.take_captured()
                self.region_reuse.runtime.reset()
        return latents

    def _reset_intra_cache(self) -> None:
        if self.intra_cache is not None:
            self.adapter.transformer._reset_stateful_cache()

    def _report_stage2(self, report: GenerationReport, run: _Run, embeds, latent_shape) -> None:
        if run.region is None:
            return
        report.mask_fraction = run.region.fraction
        report.prompt_diff = run.region.diff.describe()
        report.alpha = self.region_reuse.config.alpha
        report.stage2_restricted_steps = list(run.restricted_steps)
        grid = self.region_reuse.token_grid(latent_shape)
        tokens, text = math.prod(grid), embeds.cond.shape[1]
        transformer = self.adapter.transformer
        report.flops_full_step = run.passes * transformer_flops(transformer, tokens, text)
        report.flops_stage2_step = run.passes * transformer_flops(
            transformer, tokens, text, int(run.region.token_mask.sum())
        )

    def _serve_exact(self, entry: CacheEntry, report: GenerationReport, t_start: float) -> GenerationResult:
        with _timed(report.seconds, "decode"):
            frames = self.adapter.decode(entry.final_latent.to(self.adapter.device)).numpy()
        report.outcome, report.similarity = "exact", 1.0
        report.source_id, report.source_prompt = entry.meta.entry_id, entry.meta.prompt
        report.k1 = report.k2 = report.steps_reused = report.num_steps
        self.cache.record_hit(entry.meta.entry_id, report.num_steps)
        report.total_seconds = time.perf_counter() - t_start
        log.info("generation done", extra={"report": report.to_dict()})
        return GenerationResult(frames, report)

    @staticmethod
    def _features_to_keep(run: _Run) -> dict[str, torch.Tensor]:
        """This run's recorded features, plus the source's for the steps this run took from it (stage 1)."""
        kept = dict(run.captured)
        if run.source is not None:
            for name, tensor in run.source.extras.items():
                if int(name.split(".")[1]) <= run.plan.k1 and name not in kept:
                    kept[name] = tensor
        return kept

    def _store(self, report, signature, req: Request, embedding, run: _Run, final_latent) -> bool:
        meta = EntryMeta(
            entry_id=report.request_id,
            signature_key=report.signature_key,
            prompt=req.prompt,
            seed=req.seed,
            embedding=np.asarray(embedding, dtype=np.float32),
            nbytes=0,
        )
        entry = CacheEntry(
            meta=meta,
            signature=signature,
            trajectory=torch.stack([t.cpu() for t in run.trajectory]),
            final_latent=final_latent.detach().float().cpu(),
            extras=self._features_to_keep(run),
        )
        self.cache.insert(entry)
        return report.request_id in self.cache.store


@dataclass
class _Run:
    """The state of one request's denoising run."""

    plan: StagePlan
    source: CacheEntry | None
    trajectory: list[torch.Tensor]  # boundary latents, batch dimension dropped, in the cache dtype
    passes: int  # transformer calls per step (2 under classifier-free guidance)
    region: Region | None = None
    capture_q: set[int] = field(default_factory=set)
    capture_kv: set[int] = field(default_factory=set)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    restricted_steps: list[int] = field(default_factory=list)


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
