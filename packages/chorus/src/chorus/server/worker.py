"""The worker: the one thread that owns the model, taking jobs from the store oldest first.

A job's video is written (temporary file, fsync, rename) before the job is marked completed, so a completed job
always has its file; a crash in between leaves the job in progress, and it runs again after the restart.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

from ..video import atomic_write, encode_mp4, to_uint8

log = logging.getLogger("chorus.server.worker")


class JobCancelled(Exception):
    """Raised inside the denoising loop to abandon the running job."""


class Worker:
    def __init__(self, engine, store, videos_dir: Path, fps: int, metrics=None):
        self.engine, self.store, self.fps, self.metrics = engine, store, fps, metrics
        self.videos_dir = Path(videos_dir) if videos_dir is not None else None  # None: results go elsewhere
        if self.videos_dir is not None:
            self.videos_dir.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancelled: set[str] = set()
        self._current: str | None = None
        self._thread: threading.Thread | None = None
        self._durations: list[float] = []  # recent job durations, for Retry-After
        self.paused = threading.Event()  # set: take no new job (tests and maintenance)

    # ---- control ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chorus-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Abandon `job_id` at its next denoising step if it is running (its row is already gone)."""
        self._cancelled.add(job_id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def typical_job_seconds(self) -> float:
        recent = self._durations[-20:]
        return sum(recent) / len(recent) if recent else 1.0

    def content(self, job_id: str, variant: str) -> Path | None:
        """The file of a finished job's `video` or `thumbnail`, or None if it is gone."""
        path = self.video_path(job_id) if variant == "video" else self.thumbnail_path(job_id)
        return path if path.is_file() else None

    def remove_content(self, job_id: str) -> None:
        self._remove_files(job_id)

    def video_path(self, job_id: str) -> Path:
        return self.videos_dir / f"{job_id}.mp4"

    def thumbnail_path(self, job_id: str) -> Path:
        return self.videos_dir / f"{job_id}.png"

    def sweep(self) -> int:
        """Remove result files of jobs that no longer exist and temporary files left by a crash."""
        removed = 0
        for path in self.videos_dir.iterdir():
            job_id = path.name.split(".")[0] if not path.name.startswith(".") else None
            if job_id is None or self.store.get(job_id) is None:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            job = None if self.paused.is_set() else self.store.claim_next()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._run_one(job)

    def _run_one(self, job) -> None:
        self._current = job.id
        try:
            self._execute(job)
        except Exception as exc:  # never let one job kill the worker, nor stay in progress for ever
            log.exception("worker error", extra={"job_id": job.id})
            try:
                self.store.fail(job.id, "internal_error", f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("could not mark the job failed", extra={"job_id": job.id})
        finally:
            self._current = None
            self._cancelled.discard(job.id)

    def _execute(self, job) -> None:
        started = time.perf_counter()
        extra = {"job_id": job.id, "attempt": job.attempts}
        if self.metrics is not None:
            self.metrics.queue_wait.observe(max(0.0, time.time() - job.created_at))
        log.info("job started", extra=extra)
        last = {"progress": -1}

        def on_step(done: int, total: int) -> None:
            if job.id in self._cancelled:
                raise JobCancelled
            if self._stop.is_set():
                raise JobCancelled
            progress = min(99, int(100 * done / max(total, 1)))
            if progress != last["progress"]:
                last["progress"] = progress
                self.store.set_progress(job.id, progress)

        # A retried job gets a fresh cache entry id: its first attempt may have stored one already.
        request_id = job.id if job.attempts <= 1 else f"{job.id}-attempt{job.attempts}"
        try:
            result = self.engine.generate(job.prompt, **job.params, on_step=on_step, request_id=request_id)
            self._write_results(job.id, result.frames)
        except JobCancelled:
            if self._stop.is_set() and job.id not in self._cancelled:
                self.store.requeue(job.id)
                log.info("job interrupted by shutdown, queued again", extra=extra)
            else:
                self._remove_files(job.id)
                log.info("job cancelled", extra=extra)
                if self.metrics is not None:
                    self.metrics.finished.labels("cancelled").inc()
            return
        except Exception as exc:
            self._remove_files(job.id)
            code = "invalid_request" if isinstance(exc, ValueError) else "generation_failed"
            self.store.fail(job.id, code, f"{type(exc).__name__}: {exc}")
            log.exception("job failed", extra=extra)
            if self.metrics is not None:
                self.metrics.finished.labels("failed").inc()
            return
        report = self._report(result)
        if not self.store.complete(job.id, report):  # deleted while running
            self._remove_files(job.id)
            log.info("job deleted while running; result discarded", extra=extra)
            return
        seconds = time.perf_counter() - started
        self._durations = [*self._durations[-19:], seconds]
        log.info(
            "job completed",
            extra={
                **extra,
                "seconds": round(seconds, 4),
                "outcome": report["outcome"],
                "source_id": report["source_id"],
                "similarity": report["similarity"],
                "steps_reused": report["steps_reused"],
            },
        )
        if self.metrics is not None:
            self.metrics.finished.labels("completed").inc()
            self.metrics.job_seconds.observe(seconds)
            self.metrics.observe_report(report)

    def _report(self, result) -> dict:
        return result.report.to_dict()

    def _encode(self, frames) -> tuple[bytes, bytes]:
        """The MP4 and the thumbnail (a PNG of the middle frame)."""
        from PIL import Image

        thumb = io.BytesIO()
        Image.fromarray(to_uint8(frames[len(frames) // 2])).save(thumb, format="PNG")
        return encode_mp4(frames, self.fps), thumb.getvalue()

    def _write_results(self, job_id: str, frames) -> None:
        mp4, png = self._encode(frames)
        atomic_write(self.thumbnail_path(job_id), png)
        atomic_write(self.video_path(job_id), mp4)

    def _remove_files(self, job_id: str) -> None:
        self.video_path(job_id).unlink(missing_ok=True)
        self.thumbnail_path(job_id).unlink(missing_ok=True)
