"""Prometheus metrics of one server: HTTP traffic, the queue, jobs, and what the cache saved.

Each app gets its own registry, so several servers (or tests) in one process never share counters. In a cluster the
ingress keeps the `front` part (HTTP, the queue, the shared cache) and each replica the `jobs` part, which it
publishes to Redis; the ingress serves both, the replicas' with a `replica` label (`ReplicaMetrics`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self, store, cache=None, *, parts: tuple[str, ...] = ("front", "jobs")):
        self.registry = CollectorRegistry()
        self.parts = parts
        self.finished = None
        self._cancelled_in_queue = 0
        if "front" in parts:
            self._front(store, cache)
        if "jobs" in parts:
            self._jobs()

    def _front(self, store, cache) -> None:
        r = self.registry
        self.requests = Counter(
            "chorus_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "chorus_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.accepted = Counter("chorus_jobs_accepted", "Video jobs accepted into the queue", registry=r)
        self.refused = Counter("chorus_jobs_refused", "Video jobs refused because the queue was full", registry=r)
        depth = Gauge("chorus_queue_depth", "Jobs waiting in the queue", registry=r)
        depth.set_function(lambda: store.counts()["queued"])
        running = Gauge("chorus_jobs_in_progress", "Jobs being generated", registry=r)
        running.set_function(lambda: store.counts()["in_progress"])
        if cache is not None:
            entries = Gauge("chorus_cache_entries", "Entries in the request cache", registry=r)
            entries.set_function(lambda: len(cache))
            size = Gauge("chorus_cache_bytes", "Bytes held by the request cache", registry=r)
            size.set_function(lambda: cache.store.nbytes)

    def _jobs(self) -> None:
        r = self.registry
        self.finished = Counter("chorus_jobs_finished", "Video jobs finished, by outcome", ["status"], registry=r)
        self.job_seconds = Histogram(
            "chorus_job_duration_seconds",
            "Time a job spent running (generation and encoding)",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "chorus_job_queue_wait_seconds", "Time a job waited in the queue", buckets=JOB_BUCKETS, registry=r
        )
        self.cache_lookups = Counter(
            "chorus_cache_lookups", "Cache outcomes of finished jobs (hit, exact, miss, off)", ["outcome"], registry=r
        )
        self.cache_hits = Counter(
            "chorus_cache_hits", "Jobs that reused a cached request (a stage-1 hit or an exact repeat)", registry=r
        )
        self.cache_misses = Counter("chorus_cache_misses", "Jobs that found nothing to reuse in the cache", registry=r)
        self.steps_saved = Counter(
            "chorus_steps_saved",
            "Denoising steps' work saved by reuse (reused steps and the region steps' untouched tokens)",
            registry=r,
        )
        self.steps_computed = Counter("chorus_steps_computed", "Denoising steps computed", registry=r)
        self.seconds_saved = Counter("chorus_seconds_saved", "Estimated generation seconds saved by reuse", registry=r)

    def cancelled_in_queue(self) -> None:
        """A job deleted before it started; counted with the finished jobs where this registry has them."""
        if self.finished is not None:
            self.finished.labels("cancelled").inc()
        else:
            self._cancelled_in_queue += 1

    def observe_report(self, report: dict) -> None:
        outcome = report["outcome"]
        self.cache_lookups.labels(outcome).inc()
        if outcome in ("hit", "exact"):
            self.cache_hits.inc()
        elif outcome == "miss":
            self.cache_misses.inc()
        self.steps_saved.inc(report["steps_saved"])
        self.steps_computed.inc(report["steps_computed"])
        self.seconds_saved.inc(max(0.0, report.get("seconds_saved_estimate") or 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaMetrics:
    """A collector for the ingress: every replica's published `jobs` metrics, each sample labelled with its replica,
    and the jobs the ingress itself cancelled before any replica took them (`replica="ingress"`)."""

    def __init__(self, read_exports, front: Metrics):
        self.read_exports, self.front = read_exports, front  # read_exports() -> {replica: Prometheus text}

    def collect(self):
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        for replica, text in sorted(self.read_exports().items()):
            for fam in text_string_to_metric_families(text):
                out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for sample in fam.samples:
                    out.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        finished = families.setdefault(
            "chorus_jobs_finished", Metric("chorus_jobs_finished", "Video jobs finished, by outcome", "counter")
        )
        finished.add_sample(
            "chorus_jobs_finished_total",
            {"status": "cancelled", "replica": "ingress"},
            self.front._cancelled_in_queue,
        )
        yield from families.values()
