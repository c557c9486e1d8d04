"""What `chorus bench` and `chorus trace` do, callable from Python."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import plots, replay, report
from .policies import make_policy
from .trace import TraceConfig, generate_trace, read_trace, summarize, write_trace


def make_trace(out: str | Path, config: TraceConfig) -> dict:
    trace = generate_trace(config)
    write_trace(out, trace, config)
    return summarize(trace)


def run_benchmark(
    trace_path: str | Path,
    policies: list[str],
    *,
    model: str = "builtin",
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    adapter=None,
    embedder=None,
    steps: int | None = None,
    server: str | None = None,
    report_path: str | Path | None = None,
    plots_dir: str | Path | None = None,
    threads: int | None = 1,
    limit: int | None = None,
    settings: replay.BenchSettings | None = None,
    policy_factory=make_policy,
    log=sys.stderr,
    seed_pairs: int = 0,
    concurrency: int = 1,
) -> dict:
    """Replay the trace under each policy; returns the report (also written to `report_path`, plotted to
    `plots_dir`). `adapter` skips loading (tests pass the tiny pipeline's); `embedder` replaces the engine's default
    retrieval embedder."""
    for name in policies:
        policy_factory(name)  # unknown names fail before anything is loaded
    if threads:
        torch.set_num_threads(threads)
    trace = read_trace(trace_path)[:limit] if limit else read_trace(trace_path)
    settings = settings or replay.BenchSettings()
    if steps is not None:
        settings.steps = steps
    machine_info = report.machine()
    if server is not None:
        runner = replay.ServerRunner(server, settings)
        for name in replay.order_policies(policies):
            runner.check(policy_factory(name))
        num_steps, model_name = settings.steps, f"server {server}"
    else:
        from ..models import load_adapter

        adapter = adapter if adapter is not None else load_adapter(model, device=device, dtype=dtype)
        runner = replay.InProcessRunner(adapter, embedder, settings)
        num_steps, model_name = runner.steps, model if isinstance(model, str) else str(model)

    def progress(name, summary):
        if log is not None:
            print(
                f"[bench] {name}: {summary['throughput_rps']:.3f} req/s, hit rate {summary['hit_rate']:.0%}, "
                f"alignment {summary['alignment'] if summary['alignment'] is None else round(summary['alignment'], 1)}",
                file=log,
                flush=True,
            )

    if server is not None and concurrency > 1:  # several replicas behind the server: keep them all busy
        from . import concurrent

        results = concurrent.replay(trace, policies, runner, num_steps, concurrency, policy_factory)
        for name, summary in results.items():
            progress(name, summary)
    else:
        results = replay.run(
            trace,
            policies,
            runner,
            num_steps,
            policy_factory=policy_factory,
            on_policy=progress,
            progress=settings.progress,
            seed_pairs=seed_pairs,
        )
    run_settings = {
        "trace": str(trace_path),
        "trace_sha256": report.file_digest(trace_path),
        "requests": len(trace),
        "trace_mix": summarize(trace)["kinds"],
        "model": model_name,
        "steps": num_steps,
        "server": server,
        "policies": list(results),
        "generate_kwargs": settings.generate_kwargs,
        "cache_bytes": settings.cache_bytes,
        "eviction": settings.eviction,
        "cache_dtype": str(settings.cache_dtype),
        "warmup_requests": settings.warmup,
        "closed_loop": True,
        "concurrency": concurrency,
        "arrivals": all(r.arrival_s is not None for r in trace),
    }
    if server is None:
        run_settings["embedder"] = embedder.name if embedder is not None else "auto"
    if server is None and hasattr(runner.adapter, "identity"):
        run_settings["model_identity"] = runner.adapter.identity()
        run_settings["device"] = str(runner.adapter.device)
        run_settings["torch_threads"] = torch.get_num_threads()
    out = report.build_report(results, run_settings, machine_info)
    if report_path is not None:
        report.write_report(out, report_path)
    if plots_dir is not None:
        out["plots"] = [str(p) for p in plots.write_plots(out, plots_dir)]
        if report_path is not None:
            report.write_report(out, report_path)
    return out
