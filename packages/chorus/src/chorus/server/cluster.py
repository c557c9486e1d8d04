"""`chorus serve --replicas N`: the same API on Ray Serve, with one cache and one job queue in Redis.

Two deployments:

- `ChorusIngress` (one replica): the FastAPI app of `app.build_app` over a `RedisJobStore`. A job is committed to
  Redis before it is acknowledged; a dispatcher then sends every queued job to the model deployment through the
  similarity-aware router (`router.SimilarityAffinityRouter`), with the replicas that hold its best source as the
  hint. Once a second it also puts back in the queue every job whose replica stopped renewing its lease (a
  replica that died), so a lost replica, or a restarted ingress, loses no accepted job.
- `ChorusModel` (N replicas, one GPU each where there are GPUs, else a share of the cores): an engine over a
  `RedisStore` (the shared cache, with this replica's local tier) and a worker that claims the jobs routed to it,
  renews their leases, and writes their videos to Redis, where any ingress serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from ray import serve

from .jobs import MAX_ATTEMPTS
from .metrics import Metrics, ReplicaMetrics
from .worker import Worker

log = logging.getLogger("chorus.server.cluster")

APP_NAME = "chorus"


@dataclass
class ClusterSettings:
    model: str = "builtin"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "chorus"
    replicas: int = 2
    model_id: str = "builtin"
    max_queue: int = 64
    fps: int = 8
    cache_bytes: int = 4 << 30
    local_cache_bytes: int = 1 << 30  # each replica's in-memory tier
    embedder: str = "minilm"
    threads: int = 0  # torch threads per replica on a CPU; 0: its share of the cores
    device: str | None = None  # "cpu" or "cuda" (Ray picks the GPU); None: cuda where the replica has one
    dtype: str | None = None  # None: the model card's, else the rule in models/device.py
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    lease_s: float = 10.0  # a replica silent this long has lost its job
    # How many more requests than the least loaded replica a holder of the source may have and still be preferred:
    # 0, since fetching a source from Redis takes milliseconds and waiting behind a job takes a whole job.
    imbalanced_threshold: int = 0
    max_ongoing_requests: int = 4  # jobs routed to one replica at once (one runs, the rest wait there)


def _configure_process(threads: int) -> None:
    import diffusers
    import torch
    import transformers

    from ..logs import configure

    configure(logging.INFO)
    for library in (diffusers, transformers):  # every log line JSON: no progress bars, no handlers of their own
        library.utils.logging.disable_progress_bar()
        library.utils.logging.disable_default_handler()
        library.utils.logging.enable_propagation()
    if threads > 0:
        torch.set_num_threads(threads)


# ---- the model deployment -----------------------------------------------------------------------------------


class ReplicaWorker(Worker):
    """The one-process worker, run one routed job at a time: results to Redis, the replica named in the report."""

    def __init__(self, engine, store, fps: int, metrics, name: str):
        super().__init__(engine, store, None, fps, metrics)
        self.name = name
        self.cache_store = engine.cache.store
        self.current: str | None = None

    def run_job(self, job_id: str) -> str:
        job = self.store.claim(job_id)
        if job is None:  # done, deleted, or claimed by another replica: dispatched twice, run once
            return "skipped"
        self.cache_store.reads.clear()
        self.current = job.id
        try:
            self._run_one(job)
        finally:
            self.current = None
        return "ran"

    def _report(self, result) -> dict:
        report = result.report.to_dict()
        report["replica"] = self.name
        report["source_tier"] = self.cache_store.reads.get(report["source_id"]) if report["source_id"] else None
        if report["source_tier"] is not None and self.metrics is not None:
            self.metrics.source_reads.labels(report["source_tier"]).inc()
        return report

    def _write_results(self, job_id: str, frames) -> None:
        self.store.put_video(job_id, *self._encode(frames))

    def _remove_files(self, job_id: str) -> None:
        self.store.drop_video(job_id)


class ChorusModel:
    """One replica: the model, its engine over the shared cache, and a worker for the jobs routed here."""

    def __init__(self, settings: ClusterSettings):
        import torch
        from prometheus_client import Counter, Gauge

        from ..cache import RequestCache, make_policy
        from ..cache.redis_store import RedisStore, connect
        from ..embed import make_embedder
        from ..engine import ChorusEngine
        from ..models import load_adapter
        from ..planner import Planner
        from ..request import ModelLimits
        from .redis_jobs import RedisJobStore

        device = (settings.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
        threads = settings.threads or max(1, int(settings.cpus_per_replica))
        _configure_process(threads if device == "cpu" else 0)  # a replica on the CPU keeps to its share of cores
        self.settings = settings
        self.name = serve.get_replica_context().replica_id.unique_id
        adapter = load_adapter(settings.model, device=device, dtype=settings.dtype)
        self.redis = connect(settings.redis_url)
        store = RedisStore(
            self.redis,
            settings.cache_bytes,
            make_policy("benefit"),
            prefix=settings.prefix,
            local_bytes=settings.local_cache_bytes,
            name=self.name,
        )
        embedder = make_embedder(settings.embedder, adapter)
        self.engine = ChorusEngine(adapter, RequestCache(store, embedder.dim), embedder, Planner(None))
        self.jobs = RedisJobStore(self.redis, prefix=settings.prefix, owner=self.name, lease_s=settings.lease_s)
        self.metrics = Metrics(None, parts=("jobs",))
        r = self.metrics.registry
        self.metrics.source_reads = Counter(
            "chorus_source_reads",
            "Sources of hits, by where their tensors were: local tier or shared store",
            ["tier"],
            registry=r,
        )
        Gauge("chorus_local_tier_bytes", "Bytes in this replica's local tier", registry=r).set_function(
            lambda: store.tier.nbytes
        )
        Gauge("chorus_local_tier_entries", "Entries in this replica's local tier", registry=r).set_function(
            lambda: len(store.tier.entries())
        )
        self.worker = ReplicaWorker(self.engine, self.jobs, settings.fps, self.metrics, self.name)
        self.jobs.on_lost = self.worker.cancel  # a progress update that finds the job gone or moved stops it
        self.limits = ModelLimits.from_adapter(adapter)
        self.identity = adapter.identity()
        self.max_sequence_length = adapter.defaults.max_sequence_length
        self._run_lock: asyncio.Lock | None = None
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._beats, name="chorus-heartbeat", daemon=True).start()
        log.info("replica ready", extra={"replica": self.name, "pid": os.getpid(), "device": device})

    async def run(self, job_id: str, prefer=None) -> str:
        """Run a job (one at a time); `prefer` is the router's hint, not used here."""
        if self._run_lock is None:
            self._run_lock = asyncio.Lock()
        async with self._run_lock:
            outcome = await asyncio.to_thread(self.worker.run_job, job_id)
        await asyncio.to_thread(self._beat)  # its counters out at once: a replica may not live to the next beat
        return outcome

    async def describe(self) -> dict:
        return {
            "replica": self.name,
            "pid": os.getpid(),
            "limits": self.limits,
            "identity": self.identity,
            "max_sequence_length": self.max_sequence_length,
        }

    def _beat(self) -> None:
        """Renew the running job's lease (or learn it was deleted: cancel it), publish metrics and liveness."""
        current = self.worker.current
        if current is not None and not self.jobs.heartbeat(current):
            self.worker.cancel(current)
        p = self.settings.prefix
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{p}:metrics:replica:{self.name}", self.metrics.render(), ex=24 * 3600)
        pipe.hset(f"{p}:replicas", self.name, f'{{"pid": {os.getpid()}, "seen": {time.time()!r}}}')
        pipe.execute()

    def _beats(self) -> None:
        while not self._stop.wait(max(0.2, self.settings.lease_s / 10)):
            try:
                self._beat()
            except Exception:  # Redis away for a moment: the next beat tries again
                log.exception("heartbeat failed", extra={"replica": self.name})

    def __del__(self):
        self._stop.set()
        self.worker.stop(timeout=20)


# ---- the ingress --------------------------------------------------------------------------------------------


class ClusterFront:
    """What `build_app` calls to run jobs, in a cluster: wake the dispatcher, read results from Redis."""

    def __init__(self, ingress: ChorusIngress):
        self.ingress = ingress

    def wake(self) -> None:
        self.ingress.wake()

    def cancel(self, job_id: str) -> None:
        pass  # the job's row is gone: its replica finds out at its next heartbeat

    @property
    def alive(self) -> bool:
        return self.ingress.dispatching and bool(self.ingress.replicas(within_s=self.ingress.settings.lease_s))

    def typical_job_seconds(self) -> float:
        return self.ingress.jobs.typical_job_seconds()

    def content(self, job_id: str, variant: str) -> bytes | None:
        return self.ingress.jobs.video(job_id, variant)

    def remove_content(self, job_id: str) -> None:
        self.ingress.jobs.drop_video(job_id)


class ChorusIngress:
    """The HTTP front: the API over Redis, and the dispatcher that hands queued jobs to the model replicas."""

    async def __init__(self, model, settings: ClusterSettings):
        from ..cache import RequestCache
        from ..cache.redis_store import RedisStore, connect
        from ..embed import make_embedder
        from ..planner import PlannerConfig
        from .redis_jobs import RedisJobStore
        from .schema import ServerLimits

        _configure_process(1)
        self.model, self.settings = model, settings
        self.redis = connect(settings.redis_url)
        self.jobs = RedisJobStore(self.redis, prefix=settings.prefix, max_queue=settings.max_queue)
        for problem in self.jobs.durability():
            log.warning("Redis may lose acknowledged jobs in a crash: %s (see docs/chorus/scaling.md)", problem)
        # The ingress reads the shared cache's index (no tensors) to find each job's best source for the router.
        store = RedisStore(self.redis, settings.cache_bytes, prefix=settings.prefix, local_bytes=0)
        self.embedder = make_embedder(settings.embedder) if settings.embedder != "text-encoder" else None
        self.cache = RequestCache(store, self.embedder.dim if self.embedder else 1)
        self.min_similarity = PlannerConfig().min_similarity
        facts = await self.model.describe.remote()
        self.facts = facts
        self.limits = ServerLimits(
            facts["limits"],
            settings.model_id,
            tuple(dict.fromkeys((settings.model_id, facts["limits"].name, "chorus"))),
            settings.fps,
        )
        self.metrics = Metrics(self.jobs, self.cache, parts=("front",))
        self.metrics.registry.register(ReplicaMetrics(self._exports, self.metrics))
        self.front = ClusterFront(self)
        self.dispatching = False
        self._inflight: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    def __serve_build_asgi_app__(self):
        from .app import build_app

        describe = {"replicas": self.settings.replicas, "store": self.settings.redis_url}
        app = build_app(self.jobs, self.front, self.metrics, self.limits, on_start=self._start, describe=describe)

        @app.get("/v1/chorus/replicas")
        def replicas():
            """The replicas that reported in the last lease period: id, process id, last seen."""
            return {"object": "list", "data": self.replicas(within_s=self.settings.lease_s)}

        return app

    def replicas(self, within_s: float) -> list[dict]:
        import json

        now = time.time()
        out = []
        for name, raw in self.redis.hgetall(f"{self.settings.prefix}:replicas").items():
            info = json.loads(raw)
            if now - info["seen"] <= within_s:
                out.append({"id": name.decode(), **info})
        return sorted(out, key=lambda r: r["id"])

    def _exports(self) -> dict[str, str]:
        p = f"{self.settings.prefix}:metrics:replica:"
        keys = list(self.redis.scan_iter(match=p + "*", count=1000))
        values = self.redis.mget(keys) if keys else []
        return {k.decode().removeprefix(p): v.decode() for k, v in zip(keys, values, strict=True) if v}

    # ---- dispatch -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._dispatch_loop())
        self.dispatching = True

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                for job_id, status in await asyncio.to_thread(self.jobs.release_expired, MAX_ATTEMPTS):
                    log.warning("a replica stopped during this job: %s", status, extra={"job_id": job_id})
                for job_id in await asyncio.to_thread(self.jobs.queued_ids):
                    if job_id not in self._inflight:
                        self._inflight.add(job_id)
                        self._loop.create_task(self._dispatch(job_id))
            except Exception:  # Redis away for a moment: try again at the next tick
                log.exception("dispatch loop")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    async def _dispatch(self, job_id: str) -> None:
        try:
            job = await asyncio.to_thread(self.jobs.get, job_id)
            if job is None or job.status != "queued":
                return
            prefer = await asyncio.to_thread(self.holders_of_source, job)
            await self.model.run.remote(job_id, prefer)
        except Exception as exc:  # the replica died: its lease runs out and the loop sends the job again
            log.warning("dispatch failed: %s", f"{type(exc).__name__}: {exc}", extra={"job_id": job_id})
        finally:
            self._inflight.discard(job_id)
            self.wake()

    def holders_of_source(self, job) -> list[str]:
        """The replicas whose local tier holds the job's best source, found as the engine will find it."""
        from ..engine import ChorusEngine
        from ..request import GenerationRequest

        params = job.params
        if params.get("cache_policy") != "reuse":
            return []
        req = GenerationRequest(prompt=job.prompt, **params)
        # The engine's own signature code, over the model facts a replica reported (the ingress has no model).
        adapter = SimpleNamespace(
            identity=lambda: self.facts["identity"],
            defaults=SimpleNamespace(max_sequence_length=self.facts["max_sequence_length"]),
        )
        key = ChorusEngine.signature(SimpleNamespace(adapter=adapter), req).key()
        source = self.cache.exact(key, req.prompt, req.seed)
        if source is None and self.embedder is not None and not self.cache.seeds(key, req.prompt):
            found = self.cache.nearest(key, self.embedder.embed([req.prompt])[0], k=1)
            if found and found[0].similarity >= self.min_similarity:
                source = found[0].entry_id
        return sorted(self.cache.store.holders(source)) if source is not None else []


# ---- building and running the application -------------------------------------------------------------------


def build_application(settings: ClusterSettings | dict):
    """The Serve application; also an application builder for a Serve config file (KubeRay's `RayService`), whose
    `args` are `ClusterSettings`' fields (e.g. `{"model": "/models/wan", "redis_url": ..., "replicas": 8,
    "gpus_per_replica": 1}`)."""
    from ray.serve.config import RequestRouterConfig

    if isinstance(settings, dict):
        settings = ClusterSettings(**settings)

    actor = {"num_cpus": settings.cpus_per_replica}
    if settings.gpus_per_replica:
        actor["num_gpus"] = settings.gpus_per_replica
    model = serve.deployment(ChorusModel).options(
        name="ChorusModel",
        num_replicas=settings.replicas,
        ray_actor_options=actor,
        max_ongoing_requests=settings.max_ongoing_requests,
        graceful_shutdown_timeout_s=30,
        health_check_period_s=2,
        request_router_config=RequestRouterConfig(
            request_router_class="chorus.server.router:SimilarityAffinityRouter",
            request_router_kwargs={"imbalanced_threshold": settings.imbalanced_threshold},
        ),
    )
    ingress = serve.deployment(serve.ingress()(ChorusIngress)).options(
        name="ChorusIngress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256
    )
    return ingress.bind(model.bind(settings), settings)


def resources(settings: ClusterSettings) -> ClusterSettings:
    """One GPU per replica where the cluster has GPUs, else an equal share of its cores."""
    import ray

    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        settings.gpus_per_replica = settings.gpus_per_replica or 1.0
        settings.cpus_per_replica = 1.0
    else:
        settings.cpus_per_replica = max(0.5, total.get("CPU", 1) / settings.replicas)
    return settings


def run(settings: ClusterSettings, *, host: str, port: int, ray_address: str | None = None) -> None:
    """Start (or join) Ray, deploy the application and serve until interrupted (`chorus serve --replicas`)."""
    import signal

    import ray

    ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    # After Ray's own (a plain exit); the CLI has turned Ray's C++ one off (it would turn SIGTERM into an abort).
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    settings = resources(settings)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("listening", extra={"url": f"http://{host}:{port}", "replicas": settings.replicas})
    while not done.wait(0.5):  # a timeout, so that the signal handler runs promptly
        pass
    log.info("shutting down")
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
