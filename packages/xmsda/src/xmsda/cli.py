"""`xmsda` command line: `xmsda bench [--preset NAME] [--device cpu|cuda] [--head-dim D] [--threads T] [--json FILE]`
(the op and its module) and `xmsda bench-model [--model NAME] [--device cpu|cuda] [--image HxW] [--batch B]
[--json FILE]` (a whole Deformable DETR, Mask2Former, RT-DETR or Grounding DINO)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _report(text: str, result: dict, json_path: str | None) -> int:
    """Print a benchmark's report and, with --json, write its full results."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _all_known(command: str, option: str, chosen, known) -> bool:
    """Whether every comma-separated choice of `option` is known; else say which are not, on stderr."""
    unknown = [c for c in chosen if c not in known]
    if unknown:
        print(f"xmsda {command}: error: {option}: unknown {unknown}; choose from {list(known)}", file=sys.stderr)
    return not unknown


def _device_ready(command: str, device: str) -> bool:
    """Whether `device` can run the benchmark here; else say why, on stderr."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"xmsda {command}: error: --device cuda: torch sees no CUDA device here", file=sys.stderr)
        return False
    return True


def _bench(args) -> int:
    import torch

    from .bench import CUDA_VARIANTS, PHASES, PRESETS, VARIANTS, default_variants, format_report, run_benchmark

    if not _device_ready("bench", args.device):
        return 2
    variants = tuple(args.variants.split(",")) if args.variants else default_variants(args.device)
    phases = tuple(args.phases.split(","))
    if not (_all_known("bench", "--variants", variants, VARIANTS) and _all_known("bench", "--phases", phases, PHASES)):
        return 2
    cuda_only = [v for v in variants if v in CUDA_VARIANTS]
    if cuda_only and args.device != "cuda":
        print(f"xmsda bench: error: --variants: {cuda_only} run on CUDA only (add --device cuda)", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    if args.head_dim is not None:
        channels = preset.heads * preset.head_dim
        if args.head_dim < 1 or channels % args.head_dim:
            print(
                f"xmsda bench: error: --head-dim {args.head_dim} must divide the preset's {channels} channels",
                file=sys.stderr,
            )
            return 2
        preset = dataclasses.replace(preset, heads=channels // args.head_dim, head_dim=args.head_dim)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    result = run_benchmark(
        preset,
        threads=args.threads,
        repeat=args.repeat,
        variants=variants,
        phases=phases,
        dtype=getattr(torch, args.dtype),
        memory=not args.no_memory,
        profile=not args.no_profile,
        log=log,
        device=args.device,
    )
    return _report(format_report(result), result, args.json)


def _bench_model(args) -> int:
    from .model_bench import MODEL_PHASES, MODELS, format_model_report, run_model_benchmark

    phases = tuple(args.phases.split(","))
    if not (_all_known("bench-model", "--phases", phases, MODEL_PHASES) and _device_ready("bench-model", args.device)):
        return 2
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else None
    try:
        result = run_model_benchmark(
            MODELS[args.model],
            image=args.image,
            batch=args.batch,
            threads=args.threads,
            repeat=args.repeat,
            phases=phases,
            log=log,
            device=args.device,
        )
    except ValueError as error:  # an image the model cannot take
        print(f"xmsda bench-model: error: --image: {error}", file=sys.stderr)
        return 2
    return _report(format_model_report(result), result, args.json)


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 800x1333, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"the image must be at least 32x32 (the backbone's stride), got {text!r}")
    return h, w


def main(argv=None) -> int:
    from .bench import PHASES, PRESETS, VARIANTS
    from .model_bench import MODELS

    parser = argparse.ArgumentParser(prog="xmsda", description="Fast multi-scale deformable attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="time the xmsda op against the grid_sample reference and a gather formulation",
        description="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    bench.add_argument("--preset", choices=sorted(PRESETS), default="detr-encoder")
    bench.add_argument(
        "--threads", type=int, default=None, help="torch threads, which the op follows (default: all cores)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    bench.add_argument("--repeat", type=int, default=5, help="timed runs per variant and phase (median reported)")
    bench.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    bench.add_argument(
        "--head-dim",
        type=int,
        default=None,
        help="channels per head D, with the preset's channel count (heads = channels / D; default: the preset's)",
    )
    bench.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: xmsda, grid_sample, gather; on CUDA also "
        "xmsda-deterministic and, where installed, cuda-ext)",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the op and baselines run")
    bench.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bench.add_argument("--no-profile", action="store_true", help="skip the profile and roofline estimate")
    bench.add_argument("--quiet", action="store_true", help="no per-run progress on stderr")
    model = sub.add_parser(
        "bench-model",
        help="time a whole Hugging Face model (Deformable DETR, Mask2Former, RT-DETR, Grounding DINO) with "
        "transformers' attention and with xmsda's switch",
        description="; ".join(f"{m.name}: {m.description}" for m in MODELS.values()),
    )
    model.add_argument("--model", choices=sorted(MODELS), default="deformable-detr")
    model.add_argument(
        "--image", type=_image_size, default=None, help="HxW (default: the model's: 800x1333, RT-DETR 640x640)"
    )
    model.add_argument("--batch", type=int, default=1)
    model.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    model.add_argument("--repeat", type=int, default=3, help="timed runs per variant and phase (median reported)")
    model.add_argument("--phases", default="inference,train_step", help="comma-separated subset")
    model.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    model.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    model.add_argument("--quiet", action="store_true", help="no per-run progress on stderr")
    args = parser.parse_args(argv)
    if args.command == "bench-model" and args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return _bench(args) if args.command == "bench" else _bench_model(args)


if __name__ == "__main__":
    sys.exit(main())
