"""The Chorus engine: runs each request's denoising loop and reuses the work of earlier, similar requests.

A request goes through three phases:

1. **plan**: an exact repeat (same prompt, signature and seed) is served from the cache with no denoising. Otherwise
   the nearest cached requests by prompt embedding (same signature) are the candidates, and the planner
   (`chorus.planner`) turns them into a plan: which steps to compute, which to take from a source, which to compute
   only in a region. Chorus's planner decides after the first step, by comparing the model's prediction there with
   each candidate's (what differs is what must be recomputed).
2. **execute**: the denoising loop runs the plan. Region steps go through stage 2's hooks (`chorus.stage2`):
   only the region's tokens are computed, and outside it the latent follows the source exactly.
3. **commit**: the request is stored for later ones (its trajectory, its first-step prediction and the features
   later region steps need); a request whose every later step was its source's is stored as an alias of it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import (
    FINAL_LATENT,
    PROBE,
    TRAJECTORY,
    UNSETTLED,
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
from .models.device import dtype_name
from .planner import Plan, Planner, PlannerConfig, StageOnePlanner, token_difference
from .regions import prompt_diff
from .report import GenerationReport
from .request import GenerationRequest, ModelLimits
from .stage2 import FeatureBank, FeatureRecorder, RegionHooks, RunState, region_support, transformer_flops

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
        planner: Planner | StageOnePlanner | None = None,
        cache_dtype: torch.dtype = torch.float16,
        intra_cache=None,
    ):
        """`intra_cache`: a `diffusers.hooks` cache config (e.g. `FirstBlockCacheConfig`) to combine with reuse
        across requests; it skips work within each request's own remaining steps."""
        self.adapter = adapter
        self.intra_cache = intra_cache
        if intra_cache is not None:
            for transformer in adapter.transformers:
                transformer.enable_cache(intra_cache)
        self.cache = cache
        self.embedder = embedder or (make_embedder("auto", adapter) if cache is not None else None)
        self.planner = planner or Planner()
        # Without a cache there is nothing to record or reuse: the model runs with no hook of Chorus's. A family
        # without region steps (joint attention) records nothing and computes its region steps in full.
        self.region_fallback = region_support(adapter.transformers)
        regions = cache is not None and self.planner.kind == "probe" and self.region_fallback is None
        self.hooks = RegionHooks(adapter.transformers) if regions else None
        self.cache_dtype = cache_dtype
        self._calls = 0
        self._count_handles = [t.register_forward_pre_hook(self._count_call) for t in adapter.transformers]
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
        intra_cache=None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ChorusEngine:
        """An engine for a model name or directory; a disk cache under `cache_dir`, else an in-memory one.
        `device`: cpu, cuda or cuda:N (None: cuda when available); `dtype`: float32, bfloat16 or float16 (None:
        the model card's, else bfloat16 for a diffusers pipeline on a GPU and float32 otherwise)."""
        adapter = load_adapter(model, device=device, dtype=dtype)
        if not use_cache:
            return cls(adapter, None, None, Planner(planner), cache_dtype, intra_cache)
        policy = make_policy(eviction)
        store = DiskStore(cache_dir, cache_bytes, policy) if cache_dir is not None else MemoryStore(cache_bytes, policy)
        emb = make_embedder(embedder, adapter)
        return cls(adapter, RequestCache(store, emb.dim), emb, Planner(planner), cache_dtype, intra_cache)

    def close(self) -> None:
        """Take Chorus's hooks off the model and close the cache store."""
        for handle in self._count_handles:
            handle.remove()
        if self.intra_cache is not None:
            for transformer in self.adapter.transformers:
                transformer.disable_cache()
        if self.hooks is not None:
            self.hooks.remove()
        if self.cache is not None and hasattr(self.cache.store, "close"):
            self.cache.store.close()

    def _count_call(self, module, args):
        self._calls += 1

    def _model_fields(self) -> dict:
        """What every report says about the model that made it."""
        a = self.adapter
        return {"model": a.name, "family": a.family, "device": str(a.device), "dtype": dtype_name(a.dtype)}

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
        report = GenerationReport(
            request_id=request_id or new_entry_id(),
            prompt=req.prompt,
            seed=req.seed,
            signature_key=signature.key(),
            outcome="off" if self.cache is None or req.cache_policy == "off" else "miss",
            num_steps=req.num_steps,
            **self._model_fields(),
        )
        reading = report.outcome != "off" and req.cache_policy == "reuse"
        writing = report.outcome != "off"

        with _timed(report.seconds, "retrieval"):
            exact_id = self.cache.exact(report.signature_key, req.prompt, req.seed) if reading else None
            exact = self.cache.load(exact_id, {FINAL_LATENT}) if exact_id else None
        if exact is not None:
            return self._serve_exact(exact, report, t_start)

        run = self._plan(req, report, reading, writing)
        latents = self._execute(req, run, report, progress, on_step)
        with _timed(report.seconds, "decode"):
            frames = self.adapter.decode(latents).numpy()
        self._describe(report, run, latents.shape)
        report.transformer_calls = self._calls - calls_before
        if run.source is not None and run.plan.is_hit:
            self.cache.record_hit(run.source.meta.origin, run.plan.steps_reused + len(run.plan.region_steps))
        if writing:
            report.stored = self._commit(report, signature, req, run, latents)
        report.total_seconds = time.perf_counter() - t_start
        log.info("generation done", extra={"report": report.to_dict()})
        return GenerationResult(frames, report)

    # ---- plan ---------------------------------------------------------------------------------------------

    def _plan(self, req: Request, report: GenerationReport, reading: bool, writing: bool) -> _Run:
        steps = req.num_steps
        with _timed(report.seconds, "retrieval"):
            embedding = self.embedder.embed([req.prompt])[0] if writing else None
            candidates = []
            if reading and self.cache.seeds(report.signature_key, req.prompt):
                # The cache has this very prompt under another seed: the request asks for another sample of it.
                report.miss_reason = "a new seed for a cached prompt"
            elif reading:
                candidates = self.cache.nearest(report.signature_key, embedding, k=self.planner.candidates)
            plan = self.planner.before(candidates, steps)
            source = None
            if plan.is_hit:  # a stage-1 plan, final already
                source = self.cache.load(plan.source_id, {TRAJECTORY})
                if source is None:  # evicted since the search: a miss
                    plan = Plan(steps, similarity=plan.similarity)
        record = set(self.planner.feature_steps(steps)) if writing and self.hooks is not None else set()
        return _Run(plan, source, candidates, embedding, record)

    def _decide(self, run: _Run, req: Request, x0: torch.Tensor, embeds, report: GenerationReport) -> None:
        """After the first step: compare its predicted clean latent with each candidate's, and plan around the
        closest; load what the plan needs and set the hooks up for its region steps."""
        differences, similarities, unsettled, probes = {}, {}, {}, {}
        for match in run.candidates:
            if match.similarity < self.planner.config.min_similarity:
                continue
            entry = self.cache.load(match.entry_id, {PROBE, UNSETTLED})
            if entry is None or entry.probe is None:
                continue
            owner = entry.meta.origin  # aliases share their origin's tensors
            if owner in differences:
                continue
            differences[owner] = token_difference(x0, entry.probe, self.adapter.patch_size)
            probes[owner] = entry.probe
            similarities[owner] = match.similarity
            if entry.unsettled is not None:
                unsettled[owner] = entry.unsettled.float()
        report.candidates_compared = len(differences)
        plan = self.planner.after_probe(run.plan, differences, similarities, unsettled)
        if plan.is_hit:
            names = {TRAJECTORY, FINAL_LATENT} | set(FeatureBank.names(plan.region_steps, run.branches, run.experts))
            run.source = self.cache.load(plan.source_id, names)
            if run.source is None:
                plan = Plan(plan.num_steps, similarity=plan.similarity)
            elif plan.region_steps:
                plan = self._arm_region(run, plan, req, embeds)
                run.source_probe = probes[plan.source_id]
        run.plan = plan

    def _arm_region(self, run: _Run, plan: Plan, req: Request, embeds) -> Plan:
        """Point the hooks at the source's features and the region; a step whose features the source lacks is
        computed in full instead (every region step, on a family without them: `region_fallback`)."""
        device = self.adapter.device
        bank = run.source.features
        have = bank.steps_for(run.branches, run.experts) if self.hooks is not None else set()
        # A step the source did not record (an intra-request cache skipped its blocks there) uses the keys and
        # values of the source's last recorded step before it, by the same expert: the intra-request cache
        # judged the two steps' activations alike.
        feature_steps = {}
        for i in plan.region_steps:
            earlier = [j for j in have if j <= i and run.experts[j] == run.experts[i]]
            if earlier:
                feature_steps[i] = max(earlier)
        actions = tuple(
            "compute" if a == "region" and i not in feature_steps else a for i, a in enumerate(plan.actions)
        )
        plan = replace(plan, actions=actions)
        if not plan.region_steps:
            run.miss_reason = self.region_fallback or "the source has no features for its region steps"
            return plan
        if device.type == "cuda":  # region steps copy each step's features to the GPU without blocking the host
            bank = bank.pinned()
        diff = prompt_diff(
            self.adapter.tokenizer, run.source.meta.prompt, req.prompt, self.adapter.defaults.max_sequence_length
        )
        run.changed_words = diff.describe()
        bias = None
        alpha = self.planner.config.alpha
        if alpha != 1.0 and diff.changed_tokens:
            bias = torch.zeros(embeds.cond.shape[1], device=device)
            bias[[t for t in diff.changed_tokens if t < bias.numel()]] = math.log(alpha)
        run.state.region_steps = frozenset(plan.region_steps)
        run.state.feature_steps = feature_steps
        run.state.token_index = plan.token_mask.flatten().nonzero().flatten().to(device)
        run.state.num_tokens = plan.token_mask.numel()
        run.state.source = bank
        run.state.text_bias = bias
        run.latent_mask = self._latent_mask(plan.token_mask).to(device)
        return plan

    def _latent_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.adapter.patch_size
        mask = token_mask.repeat_interleave(pt, 0).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        return mask[None, None]

    # ---- execute ------------------------------------------------------------------------------------------

    def _execute(self, req: Request, run: _Run, report: GenerationReport, progress, on_step) -> torch.Tensor:
        with _timed(report.seconds, "encode"):
            embeds = self.adapter.encode_prompt(
                req.prompt, req.negative_prompt, req.guidance_scale, self.adapter.defaults.max_sequence_length
            )
            latents = self.adapter.initial_latents(req.height, req.width, req.num_frames, req.seed)
        run.branches = ("cond", "uncond") if embeds.uncond is not None else ("cond",)
        run.trajectory = [latents[0].to(self.cache_dtype)]
        if run.record:
            heads = self.adapter.transformer.config.num_attention_heads
            run.state.recorder = FeatureRecorder(heads, self.cache_dtype, self.hooks.layout)
            run.state.record_steps = frozenset(run.record)
        adapter = self.adapter
        scheduler = adapter.scheduler_for(req.num_steps, latents.shape)
        timesteps = scheduler.timesteps
        run.experts = [adapter.expert_at(i, t) for i, t in enumerate(timesteps[: req.num_steps])]
        bar = tqdm(total=req.num_steps, desc="denoising", disable=not progress, leave=False)
        if self.hooks is not None:
            self.hooks.start(run.state)
        self._reset_intra_cache()
        previous = "compute"
        try:
            for i in range(req.num_steps):
                action = run.plan.actions[i]
                if action != previous:
                    # Intra-request caches compare a step's activations with the last computed step's: valid only
                    # while the same tokens are computed from a latent the request itself produced.
                    self._reset_intra_cache()
                previous = action
                with _timed(report.seconds, "probe" if i == 0 and run.plan.probe_pending else run.plan.stage_of(i)):
                    if action == "reuse":
                        latents = self._follow_source(scheduler, run, i)
                    else:
                        output = adapter.predict(
                            latents,
                            timesteps[i],
                            embeds,
                            req.guidance_scale,
                            step_index=i,
                            sigma=adapter.noise_level(scheduler, i),
                            num_steps=req.num_steps,
                        )
                        if i == 0:
                            run.probe = adapter.predicted_clean(scheduler, i, latents, output)[0]
                        if action == "region":
                            latents = self._region_step(scheduler, run, i, latents, output)
                        else:
                            latents = adapter.step(scheduler, i, output, latents)
                    if i == 0 and run.plan.probe_pending:
                        self._decide(run, req, run.probe, embeds, report)
                run.trajectory.append(latents[0].to(self.cache_dtype))
                bar.update()
                if on_step is not None:
                    on_step(i + 1, req.num_steps)
        finally:
            bar.close()
            if self.hooks is not None:
                self.hooks.finish()
        return latents

    def _source_output(self, scheduler, run: _Run, i: int, like: torch.Tensor) -> torch.Tensor:
        """The model output that takes step i along the source's trajectory (a velocity under flow matching)."""
        now, following = (run.source.trajectory[j][None].to(like) for j in (i, i + 1))
        return self.adapter.output_towards(scheduler, i, now, following)

    def _follow_source(self, scheduler, run: _Run, i: int) -> torch.Tensor:
        """A reused step: the scheduler steps with the source's output (keeping multistep history consistent) and
        the latent becomes the source's; the last one is the source's exact final latent."""
        latents = run.source.trajectory[i][None].to(self.adapter.device, torch.float32)
        self.adapter.step(scheduler, i, self._source_output(scheduler, run, i, latents), latents)
        if i + 1 == run.plan.num_steps and FINAL_LATENT in run.source.tensors:
            return run.source.final_latent.to(self.adapter.device, torch.float32)
        return run.source.trajectory[i + 1][None].to(self.adapter.device, torch.float32)

    def _region_step(self, scheduler, run: _Run, i: int, latents, output) -> torch.Tensor:
        """Inside the region the model's output; outside, the source's, and then exactly the source's latent."""
        mask = run.latent_mask
        output = torch.where(mask, output, self._source_output(scheduler, run, i, latents))
        latents = self.adapter.step(scheduler, i, output, latents)
        following = run.source.trajectory[i + 1][None].to(latents)
        return torch.where(mask, latents, following)

    def _reset_intra_cache(self) -> None:
        if self.intra_cache is not None:
            for transformer in self.adapter.transformers:
                transformer._reset_stateful_cache()

    # ---- report and commit --------------------------------------------------------------------------------

    def _describe(self, report: GenerationReport, run: _Run, latent_shape) -> None:
        plan = run.plan
        report.difference, report.plan = plan.difference, plan.code
        report.similarity = plan.similarity
        report.k1 = plan.k1
        report.steps_reused = plan.steps_reused
        report.stage2_steps = plan.region_steps
        report.steps_computed = plan.actions.count("compute")
        if plan.is_hit:
            report.outcome = "hit"
            report.source_id, report.source_prompt = run.source.meta.entry_id, run.source.meta.prompt
        report.mask_fraction = plan.region_fraction
        report.miss_reason = report.miss_reason or run.miss_reason
        if plan.region_steps:
            report.prompt_diff = run.changed_words
            report.alpha = self.planner.config.alpha
        if self.region_fallback and plan.difference == "local":
            report.stage2_fallback = self.region_fallback
        if len(self.adapter.transformers) > 1:
            report.experts = list(run.experts)
        pt, ph, pw = self.adapter.patch_size
        _, _, f, h, w = latent_shape
        tokens, text, passes = (f // pt) * (h // ph) * (w // pw), self.adapter.text_tokens, len(run.branches)
        # Per expert (Wan 2.2 A14B's two may differ in size): each step counts the FLOPs of the expert it ran.
        full = [passes * transformer_flops(t, tokens, text) for t in self.adapter.transformers]
        region = [0] * len(full)
        if plan.region_steps:
            selected = len(run.state.token_index)
            region = [passes * transformer_flops(t, tokens, text, selected) for t in self.adapter.transformers]
            report.flops_region_step = region[0]
        report.flops_full_step = full[0]
        report.flops = sum(
            full[e] if a == "compute" else region[e] if a == "region" else 0
            for a, e in zip(plan.actions, run.experts, strict=True)
        )
        report.steps_saved = report.steps_reused + sum(
            1.0 - region[e] / full[e] for i, e in enumerate(run.experts) if plan.actions[i] == "region"
        )
        computing = sum(v for k, v in report.seconds.items() if k in ("probe", "stage2", "stage3"))
        equivalents = plan.num_steps - report.steps_saved
        report.seconds_saved_estimate = computing / equivalents * report.steps_saved if equivalents > 0 else 0.0

    def _serve_exact(self, entry: CacheEntry, report: GenerationReport, t_start: float) -> GenerationResult:
        with _timed(report.seconds, "decode"):
            frames = self.adapter.decode(entry.final_latent.to(self.adapter.device)).numpy()
        report.outcome = report.difference = "exact"
        report.similarity = 1.0
        report.source_id, report.source_prompt = entry.meta.entry_id, entry.meta.prompt
        report.k1 = report.steps_reused = report.num_steps
        report.steps_saved = float(report.num_steps)
        report.plan = "-" * report.num_steps
        self.cache.record_hit(entry.meta.origin, report.num_steps)
        report.total_seconds = time.perf_counter() - t_start
        log.info("generation done", extra={"report": report.to_dict()})
        return GenerationResult(frames, report)

    def _commit(self, report, signature, req: Request, run: _Run, final_latent) -> bool:
        meta = EntryMeta(
            entry_id=report.request_id,
            signature_key=report.signature_key,
            prompt=req.prompt,
            seed=req.seed,
            embedding=np.asarray(run.embedding, dtype=np.float32),
            nbytes=0,
        )
        plan = run.plan
        if plan.difference == "none" and plan.actions[-1] == "reuse":
            # Every step after the first was the source's: the result is the source's final latent.
            meta.alias_of = run.source.meta.origin
            entry = CacheEntry(meta, signature)
        else:
            recorder = run.state.recorder
            probe, unsettled = None, None
            if run.probe is not None:
                probe = run.probe
                if run.source_probe is not None and plan.region_steps:
                    # Outside its region a hit's video is its source's, so what a later request must compare with
                    # there is the source's prediction, not this request's own: else differences add up along a
                    # chain of hits, each within the threshold of the one before.
                    probe = torch.where(run.latent_mask[0].to(probe.device), probe, run.source_probe.to(probe))
                unsettled = token_difference(final_latent[0], probe, self.adapter.patch_size).half().cpu()
                probe = probe.to(self.cache_dtype).cpu()
            entry = CacheEntry.build(
                meta,
                signature,
                trajectory=torch.stack([t.cpu() for t in run.trajectory]),
                final_latent=final_latent.detach().float().cpu(),
                probe=probe,
                unsettled=unsettled,
                features=recorder.bank() if recorder is not None else None,
            )
        self.cache.insert(entry)
        return report.request_id in self.cache.store


@dataclass
class _Run:
    """One request's run: its plan, the source and what it recorded."""

    plan: Plan
    source: CacheEntry | None
    candidates: list
    embedding: np.ndarray | None
    record: set[int]
    state: RunState = field(default_factory=RunState)
    branches: tuple[str, ...] = ("cond",)
    experts: list[int] = field(default_factory=list)  # which of the model's transformers runs each step
    trajectory: list[torch.Tensor] = field(default_factory=list)  # boundary latents in the cache dtype
    probe: torch.Tensor | None = None  # the clean latent predicted at the first step
    source_probe: torch.Tensor | None = None  # the source's, where the plan has region steps
    latent_mask: torch.Tensor | None = None
    changed_words: dict | None = None
    miss_reason: str | None = None


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
