"""`chorus` command line: generate a video (with cache reuse), and the other subcommands as they land."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from pathlib import Path

from .logs import configure as configure_logging

# `chorus generate`'s flags by the request field they set, so that an error names what the user typed.
GENERATE_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "num_frames": "--frames",
    "negative_prompt": "--negative-prompt",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
}


def _generate(args) -> int:
    from .engine import ChorusEngine
    from .request import GenerationRequest, RequestError, validate
    from .video import check_output_path, write_video

    try:
        request = validate(GenerationRequest, _request_fields(args))
        device = _placement(args)
        out = check_output_path(args.out)
        cache_dir = None if args.no_cache else _check_cache_dir(args.cache_dir)
        try:
            engine = ChorusEngine.from_pretrained(
                args.model,
                cache_dir=cache_dir,
                use_cache=not args.no_cache,
                embedder=args.embedder,
                device=device,
                dtype=args.dtype,
            )
        except sqlite3.Error as exc:  # a damaged cache index
            raise ValueError(f"--cache-dir {cache_dir}: cannot open the cache: {exc}") from None
        result = engine.generate(**request.model_dump(), progress=not args.quiet)
        write_video(result.frames, out, fps=args.fps)
    except RequestError as exc:
        flag = GENERATE_FLAGS.get(exc.param, exc.param)
        print(f"chorus generate: error: {flag}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ModelNotFoundError, an unwritable output or cache directory
        print(f"chorus generate: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        source = f" from {report.source_id} (similarity {report.similarity:.3f})" if report.hit else ""
        print(
            f"{out}: {report.outcome}{source}, {report.steps_computed}/{report.num_steps} steps computed, "
            f"{report.transformer_calls} transformer calls, {report.total_seconds:.2f}s"
        )
    return 0


def _placement(args):
    """`--device`, `--dtype` and `--threads` checked (DeviceError, a ValueError, names the flag) and the threads
    set, before anything is loaded; returns the device."""
    from .models.device import parse_dtype, resolve_device, set_threads

    device = resolve_device(args.device)
    if args.dtype is not None:
        parse_dtype(args.dtype)
    set_threads(args.threads, args.model, device)
    return device


def _add_placement(parser, threads: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: the model card's; bfloat16 for a diffusers pipeline on a GPU, "
        "else float32)",
    )
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch CPU threads (default: 1 for the built-in model, torch's own otherwise; 0: torch's default)",
        )


def _request_fields(args) -> dict:
    return {
        "prompt": args.prompt,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative_prompt,
    }


def _check_cache_dir(path: Path) -> Path:
    from .video import check_writable_dir

    if path.exists() and not path.is_dir():
        raise ValueError(f"--cache-dir {path}: not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--cache-dir {path}: cannot create it: {exc.strerror or exc}") from None
    check_writable_dir(path, f"--cache-dir {path}")
    return path


def _demo(args) -> int:
    import torch

    from . import demo
    from .engine import ChorusEngine

    if args.threads > 0:  # a small model on a shared machine: one thread is several times faster than two
        torch.set_num_threads(args.threads)
    try:
        out = demo.check_sheet_path(args.out)
        engine = ChorusEngine.from_pretrained(args.model)  # no cache_dir: an in-memory cache, empty at the start
        rows = demo.run(engine, steps=args.steps)
    except ValueError as exc:
        print(f"chorus demo: error: {exc}", file=sys.stderr)
        return 2
    print(demo.table(rows))
    print(f"\n{demo.summary(rows)}")
    print(f"contact sheet (a row per request, its frames left to right): {demo.contact_sheet(rows, out)}")
    return 0


def _serve(args) -> int:
    from .server.app import DataDirBusyError, serve

    configure_logging(logging.INFO)  # the server logs every job and request as JSON lines
    if args.max_queue < 1 or args.fps < 1 or not 0 <= args.port <= 65535:
        print("chorus serve: error: --max-queue, --fps >= 1; --port in 0..65535", file=sys.stderr)
        return 2
    if args.replicas is not None or args.store is not None or args.ray_address is not None:
        return _serve_cluster(args)
    try:
        device = _placement(args)
        serve(
            args.model,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            max_queue=args.max_queue,
            fps=args.fps,
            cache_bytes=int(args.cache_gb * (1 << 30)),
            embedder=args.embedder,
            device=device,
            dtype=args.dtype,
        )
    except (ValueError, DataDirBusyError) as exc:  # ModelNotFoundError, DeviceError
        print(f"chorus serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve_cluster(args) -> int:
    """`chorus serve --replicas N`: Ray Serve replicas over a shared cache and job queue in Redis."""
    from .models import ModelNotFoundError
    from .models.loading import resolve_model_path

    if args.replicas is None or args.replicas < 1:
        print("chorus serve: error: --store and --ray-address go with --replicas N (N >= 1)", file=sys.stderr)
        return 2
    from .models.device import DeviceError, check_threads, parse_device, parse_dtype

    try:  # the replicas resolve them on their own machines; here only their form is checked
        check_threads(args.threads)
        if args.dtype is not None:
            parse_dtype(args.dtype)
        if args.device is not None:
            parse_device(args.device)
    except DeviceError as exc:
        print(f"chorus serve: error: {exc}", file=sys.stderr)
        return 2
    store = args.store or "redis://127.0.0.1:6379/0"
    if not store.startswith(("redis://", "rediss://", "unix://")):
        print(f"chorus serve: error: --store {store}: expected redis://HOST:PORT/DB", file=sys.stderr)
        return 2
    # Read when Ray is imported: Ray's C++ failure handler would turn SIGTERM into an abort, leaving Ray behind.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # Ray Serve gives its HTTP proxy 3 x 5 s to start; on a busy machine it takes longer, and Serve then gives up.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    try:
        import redis

        from .server import cluster
    except ImportError as exc:
        print(f"chorus serve: error: --replicas needs `pip install 'chorus[cluster]'` ({exc.name})", file=sys.stderr)
        return 2
    try:
        client = redis.Redis.from_url(store)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as exc:
        print(f"chorus serve: error: --store {store}: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    try:
        model_id = "builtin" if str(args.model) == "builtin" else Path(resolve_model_path(args.model)).name
    except ModelNotFoundError as exc:
        print(f"chorus serve: error: {exc}", file=sys.stderr)
        return 2
    settings = cluster.ClusterSettings(
        model=str(args.model),
        redis_url=store,
        prefix=args.store_prefix,
        replicas=args.replicas,
        model_id=model_id,
        max_queue=args.max_queue,
        fps=args.fps,
        cache_bytes=int(args.cache_gb * (1 << 30)),
        local_cache_bytes=int(args.local_cache_gb * (1 << 30)),
        embedder="minilm" if args.embedder == "auto" else args.embedder,
        threads=args.threads or 0,
        device=args.device,
        dtype=args.dtype,
    )
    cluster.run(settings, host=args.host, port=args.port, ray_address=args.ray_address)
    return 0


def _trace(args) -> int:
    from .bench.main import make_trace
    from .bench.trace import KINDS, TraceConfig

    try:
        mix = dict(zip(KINDS, args.mix, strict=True)) if args.mix else None
        cfg = TraceConfig(
            requests=args.requests,
            seed=args.seed,
            zipf_s=args.zipf,
            heldout=args.heldout,
            p_word=args.p_word,
            p_two=args.p_two,
            p_size=args.p_size,
            rate_rps=args.rate,
            **({"mix": mix} if mix else {}),
        )
    except ValueError as exc:
        print(f"chorus trace: error: {exc}", file=sys.stderr)
        return 2
    summary = make_trace(args.out, cfg)
    print(json.dumps({"trace": str(args.out), **summary}, indent=2))
    return 0


def _bench(args) -> int:
    from .bench.main import run_benchmark
    from .bench.policies import known_policies
    from .bench.report import markdown
    from .bench.trace import STANDARD_TRACE
    from .models import ModelNotFoundError

    args.trace = args.trace or STANDARD_TRACE
    if not args.trace.is_file():
        print(f"chorus bench: error: trace {args.trace} not found", file=sys.stderr)
        return 2
    policies = args.policy or ["none", "nirvana", "chorus"]
    unknown = [p for p in policies if p not in known_policies()]
    if unknown:
        print(
            f"chorus bench: error: unknown policy {unknown[0]!r}; known: {', '.join(known_policies())}", file=sys.stderr
        )
        return 2
    bad_counts = (args.steps is not None and args.steps < 1) or (args.limit is not None and args.limit < 1)
    if bad_counts or args.seed_pairs < 0 or args.concurrency < 1:
        print(
            "chorus bench: error: --steps, --limit and --concurrency must be >= 1, --seed-pairs >= 0", file=sys.stderr
        )
        return 2
    from .bench.replay import BenchSettings

    sizes = {"height": args.height, "width": args.width, "num_frames": args.frames, "guidance_scale": args.guidance}
    settings = BenchSettings(generate_kwargs={k: v for k, v in sizes.items() if v is not None})
    try:
        device = _placement(args)
        out = run_benchmark(
            args.trace,
            policies,
            model=args.model,
            device=device,
            dtype=args.dtype,
            steps=args.steps,
            server=args.server,
            report_path=args.report,
            plots_dir=args.plots,
            threads=None,  # set by _placement
            limit=args.limit,
            settings=settings,
            seed_pairs=args.seed_pairs,
            concurrency=args.concurrency,
        )
    except (ValueError, ModelNotFoundError, OSError) as exc:
        print(f"chorus bench: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each generation's report")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video from a prompt, reusing cached similar requests")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="builtin", help="'builtin' or a local diffusers pipeline directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--cache-dir", type=Path, default=Path(".chorus/cache"), help="persistent cache directory")
    gen.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    gen.add_argument("--embedder", default="auto", help="auto, minilm, text-encoder, clip:PATH or st:PATH")
    gen.add_argument("--out", type=Path, default=Path("out.mp4"), help=".mp4, .gif or .npy")
    gen.add_argument("--fps", type=int, default=8)
    gen.add_argument("--json", action="store_true", help="print the generation report as JSON")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_placement(gen)
    gen.set_defaults(func=_generate)

    dem = sub.add_parser("demo", help="related prompts through one engine: what each reused; a contact sheet")
    dem.add_argument("--model", default="builtin", help="'builtin' or a local diffusers WanPipeline directory")
    dem.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    dem.add_argument("--out", type=Path, default=Path("out/demo.png"), help="the contact sheet (.png)")
    dem.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    dem.set_defaults(func=_demo)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible Videos API, metrics and a web page")
    srv.add_argument("--model", default="builtin", help="'builtin' or a local diffusers pipeline directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--data-dir", type=Path, default=Path(".chorus/server"), help="jobs, videos and the cache")
    srv.add_argument("--max-queue", type=int, default=64, help="queued jobs at most; more are refused with 429")
    srv.add_argument("--fps", type=int, default=8, help="frame rate of the videos; maps `seconds` to frames")
    srv.add_argument("--cache-gb", type=float, default=4.0, help="disk budget of the request cache")
    srv.add_argument("--embedder", default="auto", help="auto, minilm, text-encoder, clip:PATH or st:PATH")
    _add_placement(srv)
    srv.add_argument("--replicas", type=int, default=None, help="serve N model replicas on Ray Serve (needs Redis)")
    srv.add_argument("--store", default=None, help="with --replicas: the shared Redis, redis://HOST:PORT/DB")
    srv.add_argument("--store-prefix", default="chorus", help="with --replicas: the prefix of this service's keys")
    srv.add_argument("--ray-address", default=None, help="with --replicas: join this Ray cluster (default: start one)")
    srv.add_argument("--local-cache-gb", type=float, default=1.0, help="with --replicas: each replica's memory tier")
    srv.set_defaults(func=_serve)

    trc = sub.add_parser("trace", help="write a seeded prompt trace (JSONL) with the structure of real prompt logs")
    trc.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    trc.add_argument("--requests", type=int, default=300)
    trc.add_argument("--seed", type=int, default=0)
    trc.add_argument(
        "--mix", type=float, nargs=4, metavar=("FRESH", "PARAPHRASE", "EDIT", "REPEAT"), help="request-kind weights"
    )
    trc.add_argument("--zipf", type=float, default=1.1, help="topic popularity exponent (0: uniform)")
    trc.add_argument("--heldout", type=float, default=1.0, help="share of topics from the world's held-out split")
    trc.add_argument("--p-word", type=float, default=0.5, help="share of held-out wordings in held-out topics")
    trc.add_argument("--p-two", type=float, default=0.5, help="share of two-object scenes")
    trc.add_argument("--p-size", type=float, default=0.3, help="share of objects with a size word")
    trc.add_argument("--rate", type=float, default=None, help="Poisson arrival rate (requests/s); none if omitted")
    trc.set_defaults(func=_trace)

    bch = sub.add_parser("bench", help="replay a trace once per reuse policy; speed, reuse and quality")
    bch.add_argument("--trace", type=Path, default=None, help="JSONL trace (default: the packaged standard trace)")
    bch.add_argument(
        "--policy",
        action="append",
        help="none, exact, nirvana, chorus, fbc, taylorseer, magcache, chorus+fbc|taylorseer|magcache|best, "
        "chorus-stage1, chorus-notgaa (repeatable; default none, nirvana, chorus)",
    )
    bch.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    bch.add_argument("--model", default="builtin", help="'builtin' or a local model directory")
    bch.add_argument("--server", default=None, help="replay against a running `chorus serve` at this URL")
    bch.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    bch.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    bch.add_argument("--height", type=int, default=None, help="model default if omitted")
    bch.add_argument("--width", type=int, default=None, help="model default if omitted")
    bch.add_argument("--frames", type=int, default=None, help="model default if omitted")
    bch.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    bch.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    bch.add_argument(
        "--seed-pairs",
        type=int,
        default=20,
        help="after the trace, this many of its prompts under two new seeds: how often the videos differ visibly",
    )
    _add_placement(bch)
    bch.add_argument(
        "--concurrency", type=int, default=1, help="with --server: this many requests in flight (several replicas)"
    )
    bch.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
