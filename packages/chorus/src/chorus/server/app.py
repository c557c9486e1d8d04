"""The HTTP face of Chorus: the OpenAI Videos API, health, metrics and a web page, over one worker and one store.

POST   /v1/videos                 create a job (JSON or multipart form, as the openai client sends)
GET    /v1/videos/{id}            the video object: status, progress, error, and the Chorus report
GET    /v1/videos/{id}/content    the MP4 (?variant=thumbnail: a PNG of the middle frame)
GET    /v1/videos                 list, newest first, cursor-paginated (after, limit, order)
DELETE /v1/videos/{id}            delete a video, or cancel the job if it has not finished
GET    /v1/models, /v1/chorus/info, /healthz, /metrics, /  (the web page)
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .jobs import JobStore, QueueFullError, is_job_id
from .metrics import Metrics
from .schema import ApiError, CreateVideoBody, ServerLimits, bad, format_seconds, video_object
from .worker import Worker

log = logging.getLogger("chorus.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
POLL_AFTER_MS = 250
HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class DataDirBusyError(RuntimeError):
    pass


def create_app(
    engine,
    data_dir: str | Path,
    *,
    model_id: str = "builtin",
    max_queue: int = 64,
    fps: int = 8,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """An app serving `engine`; jobs in `data_dir/jobs.sqlite`, videos in `data_dir/videos/`.
    The worker starts with the app (lifespan) and stops with it."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(data_dir)
    store = JobStore(data_dir / "jobs.sqlite", max_queue=max_queue)
    requeued, failed = store.recover()
    for job_id in requeued:
        log.info("interrupted job queued again", extra={"job_id": job_id})
    for job_id in failed:
        log.warning("interrupted job failed: tried too often", extra={"job_id": job_id})
    metrics = Metrics(store, engine.cache)
    worker = Worker(engine, store, data_dir / "videos", fps, metrics)
    worker.sweep()
    limits = ServerLimits.from_engine(engine, model_id, fps)
    app = build_app(
        store,
        worker,
        metrics,
        limits,
        max_body_bytes=max_body_bytes,
        on_start=worker.start,
        on_stop=worker.stop,
        describe={"data_dir": str(data_dir)},
    )
    app.state.lock = lock  # held for the app's life: one server per data dir
    return app


def build_app(
    store,
    worker,
    metrics: Metrics,
    limits: ServerLimits,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    on_start=None,
    on_stop=None,
    describe: dict | None = None,
) -> FastAPI:
    """The routes over a job store (`JobStore` or the cluster's `RedisJobStore`) and what runs its jobs: the
    one-process `Worker`, or the cluster's dispatcher. Both offer `wake`, `cancel`, `alive`, `typical_job_seconds`,
    `content` (a path or the bytes of a result) and `remove_content`."""
    model_id = limits.model_id

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_start is not None:
            on_start()
        log.info("server ready", extra={"model": model_id, **(describe or {}), "queue": store.counts()})
        yield
        if on_stop is not None:
            on_stop()
        log.info("server stopped")

    app = FastAPI(title="Chorus", version="0.1.0", lifespan=lifespan)
    app.state.store, app.state.worker, app.state.metrics, app.state.limits = store, worker, metrics, limits
    app.add_middleware(_ObserveMiddleware, metrics=metrics)

    # ---- errors, all in the OpenAI shape ----------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        err = ApiError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", "?"])[-1])
        err = bad(param, f"{param}: {first.get('msg', 'invalid value')}")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        err = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    # ---- the Videos API ---------------------------------------------------------------------------------

    @app.post("/v1/videos")
    async def create_video(request: Request):
        body, checked = CreateVideoBody.parse(await _read_fields(request, max_body_bytes), limits)
        seconds = body.seconds if body.seconds is not None else limits.max_seconds
        try:
            job = await run_in_threadpool(
                store.add,
                model=limits.model_id,
                prompt=checked.prompt,
                seconds=format_seconds(seconds),
                size=f"{checked.width}x{checked.height}",
                params=checked.model_dump(exclude={"prompt"}),
            )
        except QueueFullError as exc:
            metrics.refused.inc()
            retry = max(1, math.ceil(worker.typical_job_seconds()))
            log.info("job refused: queue full", extra={"queue_depth": exc.depth})
            raise ApiError(
                429,
                f"{exc}; retry after {retry} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            ) from None
        metrics.accepted.inc()
        worker.wake()
        request.state.job_id = job.id
        log.info(
            "job accepted",
            extra={"job_id": job.id, "size": job.size, "seconds": job.seconds, "cache_policy": checked.cache_policy},
        )
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    def _job_or_404(request: Request, video_id: str):
        job = store.get(video_id) if is_job_id(video_id) else None
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")
        request.state.job_id = job.id
        return job

    @app.get("/v1/videos/{video_id}")
    def retrieve_video(request: Request, video_id: str):
        job = _job_or_404(request, video_id)
        headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if job.status in ("queued", "in_progress") else {}
        return JSONResponse(video_object(job), headers=headers)

    @app.get("/v1/videos/{video_id}/content")
    def download_content(request: Request, video_id: str, variant: str = "video"):
        job = _job_or_404(request, video_id)
        if variant not in ("video", "thumbnail"):
            raise bad("variant", f"variant={variant!r}: this server has 'video' and 'thumbnail'")
        if job.status != "completed":
            raise ApiError(
                409, f"video {video_id} is {job.status}, not completed", param="video_id", code="video_not_ready"
            )
        content = worker.content(job.id, variant)
        if content is None:
            raise ApiError(
                410, f"the {variant} of video {video_id} is gone", code="content_missing", type="server_error"
            )
        media, suffix = ("video/mp4", ".mp4") if variant == "video" else ("image/png", ".png")
        if isinstance(content, bytes):
            disposition = {"Content-Disposition": f'inline; filename="{job.id}{suffix}"'}
            return Response(content, media_type=media, headers=disposition)
        return FileResponse(content, media_type=media, filename=f"{job.id}{suffix}", content_disposition_type="inline")

    @app.get("/v1/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise bad("limit", f"limit={limit}: must be between 1 and 100")
        if order not in ("asc", "desc"):
            raise bad("order", f"order={order!r}: expected 'asc' or 'desc'")
        try:
            jobs, more = store.list(after=after, limit=limit, order=order)
        except KeyError:
            raise bad("after", f"after={after!r}: no video with this id") from None
        data = [video_object(j) for j in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    @app.delete("/v1/videos/{video_id}")
    def delete_video(request: Request, video_id: str):
        job = store.delete(video_id) if is_job_id(video_id) else None
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")
        request.state.job_id = job.id
        if job.status == "in_progress":
            worker.cancel(job.id)
        elif job.status == "queued":
            metrics.cancelled_in_queue()
        worker.remove_content(job.id)
        log.info("job deleted", extra={"job_id": job.id, "was": job.status})
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    # ---- the rest ---------------------------------------------------------------------------------------

    @app.get("/v1/models")
    def list_models():
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "chorus", **limits.placement}
        return {"object": "list", "data": [model]}

    @app.get("/v1/chorus/info")
    def info():
        return {**limits.describe(), "queue": store.counts(), "max_queue": store.max_queue}

    @app.get("/healthz")
    def healthz():
        ok = worker.alive
        body = {"status": "ok" if ok else "worker not running", "model": model_id, "jobs": store.counts()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---- request bodies -----------------------------------------------------------------------------------------


async def _read_fields(request: Request, limit: int) -> dict:
    """The body's fields from JSON, multipart/form-data (what the openai client sends) or a urlencoded form, read
    only up to `limit` bytes."""
    raw = await _read_body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not raw.strip():
        raise bad(None, "the request body is empty; expected a JSON object with at least a prompt", "invalid_body")
    if kind in ("application/json", ""):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(None, f"the request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_body")
        return body
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(415, f"unsupported content type {kind!r}; send JSON or a form", code="unsupported_media_type")

    async def replay():  # the body was read under the size limit; python-multipart parses it from memory
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=limit)
    except (StarletteHTTPException, UnicodeDecodeError, ValueError) as exc:  # starlette's 400 for a bad form
        raise bad(None, f"the form body cannot be parsed: {getattr(exc, 'detail', exc)}", "invalid_body") from None
    fields = {}
    for name, value in form.multi_items():
        if name in fields:
            raise bad(name, f"{name} is given more than once", "duplicate_parameter")
        fields[name] = value if isinstance(value, str) else "<file>"  # an upload: refused by its field's check
    return fields


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes; at most {limit} accepted", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- observation: metrics and one structured log line per request ---------------------------------------------


class _ObserveMiddleware:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], path).observe(elapsed)
            job_id = scope.get("state", {}).get("job_id")
            if path not in ("/metrics", "/healthz", "/static") and not (
                path == "/v1/videos/{video_id}" and scope["method"] == "GET"
            ):
                log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status["code"],
                        "ms": round(elapsed * 1000, 2),
                        **({"job_id": job_id} if job_id else {}),
                    },
                )


def _lock_data_dir(data_dir: Path):
    """An exclusive lock on the data dir for this process's life (released by the OS even on SIGKILL)."""
    handle = open(data_dir / "server.lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirBusyError(f"{data_dir} is in use by another Chorus server") from None
    return handle


def serve(
    model: str = "builtin",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | Path = ".chorus/server",
    max_queue: int = 64,
    fps: int = 8,
    cache_bytes: int = 4 << 30,
    embedder: str = "minilm",
    threads: int = 0,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load the model, then serve until interrupted (the `chorus serve` command)."""
    import diffusers
    import torch
    import transformers
    import uvicorn

    from ..engine import ChorusEngine

    for library in (diffusers, transformers):  # every log line JSON: no progress bars, no handlers of their own
        library.utils.logging.disable_progress_bar()
        library.utils.logging.disable_default_handler()
        library.utils.logging.enable_propagation()
    logging.captureWarnings(True)
    if threads > 0:  # on a shared machine one thread is often faster than several competing ones
        torch.set_num_threads(threads)
    data_dir = Path(data_dir)
    engine = ChorusEngine.from_pretrained(
        model,
        cache_dir=data_dir / "cache",
        cache_bytes=cache_bytes,
        eviction="benefit",
        embedder=embedder,
        device=device,
        dtype=dtype,
    )
    model_id = "builtin" if str(model) == "builtin" else Path(model).name
    app = create_app(engine, data_dir, model_id=model_id, max_queue=max_queue, fps=fps)
    log.info("listening", extra={"url": f"http://{host}:{port}"})
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)
