"""The job store: every accepted video job and its state in one SQLite file under the data dir.

SQLite is the queue. A job row is committed before the request that made it is answered, so an accepted job
survives any crash; the worker claims the oldest queued row, and a job found `in_progress` when the store opens
was interrupted by a crash and goes back to the queue (unless it has already been tried too often: a job that
takes the server down every time must not take it down forever).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "in_progress", "completed", "failed")
ID_PREFIX = "video_"
MAX_ATTEMPTS = 3


class QueueFullError(Exception):
    def __init__(self, depth: int):
        super().__init__(f"the queue is full ({depth} jobs waiting)")
        self.depth = depth


def new_job_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    hexpart = value[len(ID_PREFIX) :]
    return value.startswith(ID_PREFIX) and len(hexpart) == 32 and all(c in "0123456789abcdef" for c in hexpart)


@dataclass
class Job:
    seq: int
    id: str
    status: str
    progress: int
    attempts: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    model: str
    prompt: str
    seconds: str
    size: str
    params: dict  # everything the engine is called with
    error: dict | None
    report: dict | None
    replica: str | None = None  # the replica that ran it last (`chorus serve --replicas`)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["error"] = json.loads(d["error"]) if d["error"] else None
        d["report"] = json.loads(d["report"]) if d["report"] else None
        return cls(**d)


class JobStore:
    def __init__(self, path: str | Path, max_queue: int = 64):
        self.path = Path(path)
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode loses nothing on a process crash (committed pages are in the OS cache); FULL
        # also survives a power cut, at one fsync per commit. Jobs are precious and commits few: FULL.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
                progress INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL, started_at REAL, completed_at REAL,
                model TEXT NOT NULL, prompt TEXT NOT NULL, seconds TEXT NOT NULL, size TEXT NOT NULL,
                params TEXT NOT NULL, error TEXT, report TEXT)"""
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writes -----------------------------------------------------------------------------------------

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> tuple[list[str], list[str]]:
        """At startup: jobs left in progress by a crash go back to the queue, or fail after `max_attempts`."""
        with self._lock, self._tx():
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = 'in_progress'").fetchall()
            requeued = [r["id"] for r in rows if r["attempts"] < max_attempts]
            failed = [r["id"] for r in rows if r["attempts"] >= max_attempts]
            self._db.executemany(
                "UPDATE jobs SET status = 'queued', progress = 0, started_at = NULL WHERE id = ?",
                [(i,) for i in requeued],
            )
            error = json.dumps(
                {"code": "interrupted", "message": f"the server stopped during this job {max_attempts} times"}
            )
            self._db.executemany(
                "UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ?",
                [(error, time.time(), i) for i in failed],
            )
        return requeued, failed

    def add(self, *, model: str, prompt: str, seconds: str, size: str, params: dict) -> Job:
        """Queue a job, or raise QueueFullError when `max_queue` jobs are already waiting."""
        job_id = new_job_id()
        with self._lock, self._tx():
            depth = self._db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if depth >= self.max_queue:
                raise QueueFullError(depth)
            self._db.execute(
                """INSERT INTO jobs (id, status, created_at, model, prompt, seconds, size, params)
                   VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)""",
                (job_id, time.time(), model, prompt, seconds, size, json.dumps(params)),
            )
        return self.get(job_id)

    def claim_next(self) -> Job | None:
        """Mark the oldest queued job in progress and return it."""
        with self._lock:
            row = self._db.execute(
                """UPDATE jobs SET status = 'in_progress', progress = 0, attempts = attempts + 1, started_at = ?
                   WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)
                   RETURNING *""",
                (time.time(),),
            ).fetchone()
        return Job.from_row(row) if row else None

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", (int(progress), job_id)
            )

    def complete(self, job_id: str, report: dict) -> bool:
        """False if the job is no longer in progress (deleted meanwhile)."""
        with self._lock:
            cur = self._db.execute(
                """UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, report = ?
                   WHERE id = ? AND status = 'in_progress'""",
                (time.time(), json.dumps(report, default=_json_default), job_id),
            )
        return cur.rowcount == 1

    def fail(self, job_id: str, code: str, message: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                """UPDATE jobs SET status = 'failed', completed_at = ?, error = ?
                   WHERE id = ? AND status = 'in_progress'""",
                (time.time(), json.dumps({"code": code, "message": message}), job_id),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """Put a job the worker gave up on at shutdown back in the queue, as if it had not been tried."""
        with self._lock:
            self._db.execute(
                """UPDATE jobs SET status = 'queued', progress = 0, started_at = NULL, attempts = attempts - 1
                   WHERE id = ? AND status = 'in_progress'""",
                (job_id,),
            )

    def delete(self, job_id: str) -> Job | None:
        """Remove a job whatever its state; returns it as it was, or None if there was none."""
        with self._lock:
            row = self._db.execute("DELETE FROM jobs WHERE id = ? RETURNING *", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    # ---- reads ------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """A page of jobs by creation order, starting after the job `after`; and whether more follow.
        Raises KeyError if `after` names no job."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._lock:
            if after is None:
                rows = self._db.execute(f"SELECT * FROM jobs ORDER BY seq {direction} LIMIT ?", (limit + 1,)).fetchall()
            else:
                anchor = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if anchor is None:
                    raise KeyError(after)
                rows = self._db.execute(
                    f"SELECT * FROM jobs WHERE seq {op} ? ORDER BY seq {direction} LIMIT ?",
                    (anchor["seq"], limit + 1),
                ).fetchall()
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r["status"]: r["n"] for r in rows}

    # ---- plumbing ---------------------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db)


def _json_default(value):
    """numpy scalars and arrays (and anything else) in a report still serialise."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
