"""Replay a trace once per policy, each from an empty cache, and measure speed, reuse and quality.

In process (the default), each policy gets its own `ChorusEngine` over its own copy of the transformer: an empty
in-memory cache for the reusing policies, the policy's intra-request cache hooks, and nothing else different. Every
policy first serves one warm-up request (not stored, not timed). The policies are interleaved: request i is served
under every policy before request i + 1, so that a shared machine whose speed drifts (another job's load comes and
goes) slows every policy alike; each policy still sees the trace in order, back to back (closed loop). The time a
policy spends serving the trace (the sum of its requests' service times) is its `wall_s`; the benchmark's own
scoring, below, is not counted.

Quality, per request, after it has been timed:
- `alignment`: the built-in world's analyzer score of the video against its prompt, in points (0-100), the role CLIP
  score plays for real models; prompts outside the world get none;
- `fidelity_psnr`: PSNR (dB) of the video against the same request (prompt and seed) under `none`; identical videos
  count as 100 dB. The `none` videos are kept in memory for this, so `none` always runs first (it is added when
  not asked for).

Latency: `service` is one request's time in the engine. When the trace has arrival times, `latency_*` also include
queueing, as if one worker had served the requests as they arrived (computed from the measured service times);
without arrivals they equal the service times.

`--server URL` replays against a running `chorus serve` through its OpenAI-compatible API instead, one request at
a time: `none` sends `cache_policy="off"` and `chorus` sends `"reuse"` (the server's own planner settings); other
policies need their own engine configuration and are refused. Start the server on an empty data directory so that
`chorus` starts from an empty cache.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .policies import INTRA_NAMES, Policy, intra_cache_config, magnitude_ratios, make_policy
from .trace import TraceRequest

PSNR_IDENTICAL = 100.0
SEED_PAIR_BASE = 1_000_000_007  # seeds of the seed-diversity pairs: far from any trace's
ALIGNMENT_SLACK = 2.0  # points: how much alignment an intra-request cache may lose to count for chorus+best
WARMUP_PROMPT = "a red circle moving left on a white background"


@dataclass
class BenchSettings:
    steps: int | None = None  # the model's default when None
    generate_kwargs: dict = field(default_factory=dict)  # height/width/num_frames/guidance_scale overrides
    cache_bytes: int = 2 << 30
    eviction: str = "benefit"
    cache_dtype: torch.dtype = torch.float16
    warmup: int = 1
    intra_options: dict[str, dict] = field(default_factory=dict)
    progress: bool = True


@dataclass
class RequestRecord:
    index: int
    request_id: str | None
    source_id: str | None
    topic: int
    kind: str
    attribute: str | None  # what an edit changed (from the trace)
    outcome: str
    difference: str  # what the engine found (`chorus.planner.DIFFERENCES`)
    plan: str
    similarity: float | None
    steps_reused: int
    steps_saved: float  # reused steps plus the share of region steps' work not done
    transformer_calls: int
    service_s: float
    mask_fraction: float | None
    alignment: float | None
    psnr: float | None
    latency_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(vars(self))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_IDENTICAL if mse <= 10 ** (-PSNR_IDENTICAL / 10) else min(PSNR_IDENTICAL, 10 * math.log10(1.0 / mse))


def alignment_points(prompt: str, frames: np.ndarray) -> float | None:
    from ..world import analyzer

    try:
        return 100.0 * analyzer.alignment(prompt, frames)
    except ValueError:  # not a prompt of the built-in world
        return None


def _record(i: int, req: TraceRequest, report: dict, service: float, frames, reference) -> RequestRecord:
    return RequestRecord(
        index=i,
        request_id=report.get("request_id"),
        source_id=report.get("source_id"),
        topic=req.topic,
        kind=req.kind,
        attribute=req.attribute,
        outcome=report["outcome"],
        difference=report.get("difference", "miss"),
        plan=report.get("plan", ""),
        similarity=report.get("similarity"),
        steps_reused=report.get("steps_reused", 0),
        steps_saved=float(report.get("steps_saved") or 0.0),
        transformer_calls=report.get("transformer_calls", 0),
        service_s=service,
        mask_fraction=report.get("mask_fraction"),
        alignment=alignment_points(req.prompt, frames),
        psnr=psnr(frames, reference) if reference is not None else PSNR_IDENTICAL,
    )


def queue_latencies(trace: list[TraceRequest], service: list[float]) -> list[float]:
    """Per request, finish minus arrival under one FIFO worker; the service times when there are no arrivals."""
    if any(r.arrival_s is None for r in trace):
        return list(service)
    out, free_at = [], 0.0
    for r, s in zip(trace, service, strict=True):
        start = max(r.arrival_s, free_at)
        free_at = start + s
        out.append(free_at - r.arrival_s)
    return out


def order_policies(names: list[str]) -> list[str]:
    """`none` first (added when missing: it is every other policy's reference), `chorus+best` after the
    intra-request caches it chooses from; otherwise in the order given, without duplicates."""
    names = list(dict.fromkeys(names))
    if "none" not in names:
        names.insert(0, "none")
    rest = [n for n in names if n not in ("none", "chorus+best")]
    return ["none", *rest, *(["chorus+best"] if "chorus+best" in names else [])]


def choose_best_intra(results: dict[str, dict]) -> str | None:
    """The intra-request cache with the highest throughput among those within ALIGNMENT_SLACK of `none`
    (the most aligned one when none qualifies)."""
    intra = {n: r for n, r in results.items() if n in INTRA_NAMES}
    if not intra:
        return None
    base = results["none"]["alignment"]
    ok = {n: r for n, r in intra.items() if base is None or (r["alignment"] or 0) >= base - ALIGNMENT_SLACK}
    if ok:
        return max(ok, key=lambda n: ok[n]["throughput_rps"])
    return max(intra, key=lambda n: intra[n]["alignment"] or 0)


class InProcessRunner:
    """Each policy gets its own engine over its own copy of the transformer and its own prompt-encoding memo (text
    encoder and codec are shared and stateless), so policies can be interleaved request by request without one
    policy's work making another's free. The retrieval embedder is the engine's default (`auto`: the pipeline's
    own encoder pass when it is MiniLM) unless one is given."""

    def __init__(self, adapter, embedder, settings: BenchSettings):
        self.adapter, self.embedder, self.settings = adapter, embedder, settings
        self._mag_ratios: dict[int, list[float]] = {}

    @property
    def steps(self) -> int:
        return self.settings.steps or self.adapter.defaults.num_inference_steps

    def check(self, policy: Policy) -> None:
        pass

    def _calibrate(self, num_steps: int) -> list[float]:
        if num_steps not in self._mag_ratios:
            from ..engine import ChorusEngine

            adapter = self._clone()
            engine = ChorusEngine(adapter)
            try:
                self._mag_ratios[num_steps] = magnitude_ratios(
                    adapter, lambda: self._generate(engine, WARMUP_PROMPT, 1, "off"), num_steps
                )
            finally:
                engine.close()
        return self._mag_ratios[num_steps]

    def _clone(self):
        adapter = copy.copy(self.adapter)
        adapter.transformer = copy.deepcopy(self.adapter.transformer)
        if hasattr(adapter, "_text_memo"):  # the memo of prompt encodings must not be shared between policies
            adapter._text_memo = type(adapter._text_memo)()
            adapter._text_memo_bytes = 0
        return adapter

    def _generate(self, engine, prompt: str, seed: int, cache_policy: str):
        kw = self.settings.generate_kwargs
        return engine.generate(prompt, seed=seed, num_inference_steps=self.steps, cache_policy=cache_policy, **kw)

    def engine_for(self, policy: Policy):
        from ..cache import MemoryStore, RequestCache
        from ..cache import make_policy as make_eviction
        from ..engine import ChorusEngine

        intra = None
        if policy.intra is not None:
            options = {**self.settings.intra_options.get(policy.intra, {}), **policy.intra_options}
            intra = intra_cache_config(policy.intra, self.steps, options, self._calibrate)
        from ..embed import make_embedder

        adapter = self._clone()
        embedder = self.embedder if self.embedder is not None else make_embedder("auto", adapter)
        cache = None
        if policy.cache:
            store = MemoryStore(self.settings.cache_bytes, make_eviction(self.settings.eviction))
            cache = RequestCache(store, embedder.dim)
        return ChorusEngine(
            adapter,
            cache,
            embedder if cache is not None else None,
            policy.make_planner(),
            cache_dtype=self.settings.cache_dtype,
            intra_cache=intra,
        )

    @contextmanager
    def session(self, policy: Policy):
        """`serve(request) -> (report dict, frames)` under the policy, after its warm-up requests."""
        engine = self.engine_for(policy)
        cache_policy = "reuse" if policy.cache else "off"
        try:
            for w in range(self.settings.warmup):
                self._generate(engine, WARMUP_PROMPT, 10_000 + w, "off")

            def serve(req: TraceRequest):
                result = self._generate(engine, req.prompt, req.seed, cache_policy)
                return result.report.to_dict(), result.frames

            yield serve
        finally:
            engine.close()


class ServerRunner:
    """Replays against a running `chorus serve` (OpenAI Videos API), one request at a time."""

    POLICIES: ClassVar[dict[str, str]] = {"none": "off", "chorus": "reuse"}

    def __init__(self, url: str, settings: BenchSettings, poll_s: float = 0.02, timeout_s: float = 600.0):
        self.url, self.settings, self.poll_s, self.timeout_s = url.rstrip("/"), settings, poll_s, timeout_s
        self._body: dict | None = None

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def check(self, policy: Policy) -> None:
        if policy.name not in self.POLICIES:
            raise ValueError(
                f"policy {policy.name!r} cannot be replayed against a server (it needs its own engine settings); "
                f"with --server use {' and '.join(self.POLICIES)}"
            )

    def _settings_body(self) -> dict:
        """The bench's generation settings as API fields (frames become `seconds` at the server's frame rate)."""
        kw, body = self.settings.generate_kwargs, {}
        if self.settings.steps is not None:
            body["steps"] = self.settings.steps
        if "height" in kw or "width" in kw or "num_frames" in kw:
            info = json.loads(self._call("GET", "/v1/chorus/info"))
            w, h = (int(x) for x in info["default_size"].split("x"))
            body["size"] = f"{kw.get('width', w)}x{kw.get('height', h)}"
            if "num_frames" in kw:
                body["seconds"] = str(kw["num_frames"] / info["fps"])
        if "guidance_scale" in kw:
            body["guidance_scale"] = kw["guidance_scale"]
        return body

    def _one(self, req: TraceRequest, cache_policy: str) -> tuple[dict, np.ndarray]:
        if self._body is None:
            self._body = self._settings_body()
        body = {"prompt": req.prompt, "seed": req.seed, "cache_policy": cache_policy, **self._body}
        video = json.loads(self._call("POST", "/v1/videos", body))
        deadline = time.monotonic() + self.timeout_s
        while video["status"] not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"video {video['id']} not done after {self.timeout_s}s")
            time.sleep(self.poll_s)
            video = json.loads(self._call("GET", f"/v1/videos/{video['id']}"))
        if video["status"] == "failed":
            raise RuntimeError(f"video {video['id']} failed: {video.get('error')}")
        frames = decode_mp4(self._call("GET", f"/v1/videos/{video['id']}/content"))
        return video["chorus"]["report"], frames

    @contextmanager
    def session(self, policy: Policy):
        self.check(policy)
        yield lambda req: self._one(req, self.POLICIES[policy.name])


def decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames).astype(np.float32) / 255.0


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def computed_overhead(records: list[RequestRecord], none: list[RequestRecord]) -> float | None:
    """What a policy's requests computed in full (every step) cost over the same requests under `none`: the price
    of looking up, comparing and recording, as a fraction (0.02 = 2 % slower)."""
    pairs = [(r.service_s, n.service_s) for r, n in zip(records, none, strict=True) if r.plan and set(r.plan) == {"c"}]
    if not pairs:
        return None
    return sum(p for p, _ in pairs) / sum(n for _, n in pairs) - 1.0


def paired_ci95(values: list[float | None], reference: list[float | None]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean of `values - reference`, paired request by request
    (normal approximation): how far a policy's alignment delta against `none` could be from 0 by chance, since a
    hit's video is a draw of its own."""
    d = [v - r for v, r in zip(values, reference, strict=True) if v is not None and r is not None]
    if len(d) < 2:
        return None
    return 1.96 * float(np.std(d, ddof=1)) / math.sqrt(len(d))


def _alignments(records: list[RequestRecord]) -> list[float | None]:
    return [r.alignment for r in records]


def _same_topic(records: list[RequestRecord]) -> float | None:
    """Of the hits other than exact repeats, the share whose source is a request of the same topic (a retrieval
    precision the engine cannot see: only the trace knows the topics)."""
    topic_of = {r.request_id: r.topic for r in records if r.request_id}
    hits = [r for r in records if r.outcome == "hit" and r.source_id in topic_of]
    return sum(topic_of[r.source_id] == r.topic for r in hits) / len(hits) if hits else None


def summarize_policy(policy: Policy, trace: list[TraceRequest], records: list[RequestRecord], steps: int) -> dict:
    service = [r.service_s for r in records]
    latencies = queue_latencies(trace, service)
    for r, lat in zip(records, latencies, strict=True):
        r.latency_s = lat
    wall = float(sum(service))
    n = len(records)
    return {
        "requests": n,
        "wall_s": wall,
        "throughput_rps": n / wall if wall > 0 else None,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "service_p50_s": _percentile(service, 50),
        "service_p99_s": _percentile(service, 99),
        "hit_rate": sum(r.outcome in ("hit", "exact") for r in records) / n if n else 0.0,
        "exact_rate": sum(r.outcome == "exact" for r in records) / n if n else 0.0,
        "transformer_calls": int(sum(r.transformer_calls for r in records)),
        "transformer_calls_per_request": sum(r.transformer_calls for r in records) / n if n else 0.0,
        "steps_saved": float(sum(r.steps_saved for r in records)),
        "steps_saved_fraction": sum(r.steps_saved for r in records) / (n * steps) if n else 0.0,
        "alignment": _mean(r.alignment for r in records),
        "fidelity_psnr": _mean(r.psnr for r in records),
        "alignment_by_kind": {
            k: _mean(r.alignment for r in records if r.kind == k) for k in sorted({r.kind for r in records})
        },
        "alignment_by_attribute": {
            a: _mean(r.alignment for r in records if r.attribute == a)
            for a in sorted({r.attribute for r in records if r.attribute})
        },
        # what the engine decided for each kind of request, and what each decision cost on average
        "differences_by_kind": {
            k: dict(Counter(r.difference for r in records if r.kind == k)) for k in sorted({r.kind for r in records})
        },
        "hits_from_the_same_topic": _same_topic(records),
        "service_by_difference": {
            d: _mean(r.service_s for r in records if r.difference == d) for d in sorted({r.difference for r in records})
        },
        "config": policy.describe(),
        "per_request": [r.to_dict() for r in records],
    }


def seed_pair_prompts(trace: list[TraceRequest], n: int) -> list[str]:
    """The first n distinct prompts of the trace, for the seed-diversity check."""
    return list(dict.fromkeys(r.prompt for r in trace))[:n]


def visibly_different_pairs(serve, prompts: list[str]) -> list[bool]:
    """Each prompt under two new seeds, after the trace (the cache is warm): do the two videos differ visibly?
    The model draws a different layout for each seed; a cache that serves one seed's video for another loses that."""
    from ..world import analyzer

    out = []
    for j, prompt in enumerate(prompts):
        a = serve(TraceRequest(prompt, SEED_PAIR_BASE + 2 * j, "seed-pair", -1))[1]
        b = serve(TraceRequest(prompt, SEED_PAIR_BASE + 2 * j + 1, "seed-pair", -1))[1]
        out.append(analyzer.visibly_different(analyzer.analyze(a), analyzer.analyze(b)))
    return out


def replay_interleaved(
    policies: list[Policy],
    trace: list[TraceRequest],
    runner,
    reference: list | None,
    progress: bool = True,
    seed_pairs: int = 0,
) -> tuple[dict[str, list[RequestRecord]], list, dict[str, list[bool]]]:
    """Serve request i under every policy before request i + 1, so that a machine whose speed drifts (a shared CPU)
    slows all policies alike; the policy that goes first rotates from one request to the next, so that no policy
    always runs right after the benchmark's own scoring or another policy's model. Returns the records per policy,
    `none`'s frames when it is among them, and per policy the outcome of `seed_pairs` seed-diversity pairs served
    after the trace (not timed)."""
    records: dict[str, list[RequestRecord]] = {p.name: [] for p in policies}
    diversity: dict[str, list[bool]] = {}
    none_frames: list = []
    with ExitStack() as stack:
        sessions = [(p, stack.enter_context(runner.session(p))) for p in policies]
        for i, req in enumerate(tqdm(trace, desc="replay", disable=not progress, leave=False)):
            served = {}
            for k in range(len(sessions)):
                policy, serve = sessions[(i + k) % len(sessions)]
                t0 = time.perf_counter()
                report, frames = serve(req)
                served[policy.name] = (report, frames, time.perf_counter() - t0)
            if "none" in served:
                none_frames.append(served["none"][1])
            ref = reference[i] if reference is not None else none_frames[i] if none_frames else None
            for policy, _ in sessions:  # scored after the round, outside every timing
                report, frames, service = served[policy.name]
                records[policy.name].append(_record(i, req, report, service, frames, ref))
        if seed_pairs:
            prompts = seed_pair_prompts(trace, seed_pairs)
            diversity = {p.name: visibly_different_pairs(serve, prompts) for p, serve in sessions}
    return records, none_frames, diversity


def run(
    trace: list[TraceRequest],
    policy_names: list[str],
    runner,
    steps: int,
    *,
    policy_factory: Callable[[str], Policy] = make_policy,
    on_policy: Callable[[str, dict], None] | None = None,
    progress: bool = True,
    seed_pairs: int = 0,
) -> dict[str, dict]:
    """Replay `trace` under each policy, interleaved; returns `{name: summary}` with `speedup_vs_none` (and, with
    `seed_pairs`, the share of same-prompt pairs under two new seeds that come out visibly different).

    `chorus+best` needs the intra-request caches' results first: it is replayed in a second pass, interleaved with
    `none` again, and its speedup is against that pass's `none`."""
    names = order_policies(policy_names)
    first = [policy_factory(n) for n in names if n != "chorus+best"]
    for policy in first:
        runner.check(policy)
    load_before = os.getloadavg()
    records, reference, diversity = replay_interleaved(first, trace, runner, None, progress, seed_pairs)
    load_after = os.getloadavg()
    results: dict[str, dict] = {}
    for policy in first:
        results[policy.name] = summarize_policy(policy, trace, records[policy.name], steps)
        results[policy.name]["loadavg_before_after"] = [round(load_before[0], 2), round(load_after[0], 2)]
        if policy.name in diversity:
            pairs = diversity[policy.name]
            results[policy.name]["seed_pairs"] = len(pairs)
            results[policy.name]["seed_pairs_visibly_different"] = sum(pairs) / len(pairs) if pairs else None
    none_wall = results["none"]["wall_s"]
    for name, summary in results.items():
        summary["speedup_vs_none"] = none_wall / summary["wall_s"] if summary["wall_s"] else None
        summary["pass"] = 1
        summary["computed_overhead"] = computed_overhead(records[name], records["none"])
        summary["alignment_ci95"] = paired_ci95(_alignments(records[name]), _alignments(records["none"]))
    if "chorus+best" in names:
        best = choose_best_intra(results)
        if best is None:
            raise ValueError("chorus+best needs an intra-request cache policy (fbc, taylorseer, magcache) in the run")
        base = policy_factory("chorus+best")
        policy = Policy("chorus+best", True, base.planner, best)
        again = Policy("none")
        load_before = os.getloadavg()
        second, _, _ = replay_interleaved([again, policy], trace, runner, reference, progress)
        summary = summarize_policy(policy, trace, second["chorus+best"], steps)
        none_again = sum(r.service_s for r in second["none"])
        summary.update(
            intra_chosen=best,
            speedup_vs_none=none_again / summary["wall_s"] if summary["wall_s"] else None,
            none_wall_s_same_pass=none_again,
            alignment_ci95=paired_ci95(_alignments(second["chorus+best"]), _alignments(second["none"])),
            loadavg_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        )
        summary["pass"] = 2
        results["chorus+best"] = summary
    if on_policy is not None:
        for name, summary in results.items():
            on_policy(name, summary)
    return results
