"""Benchmark: the xmsda op against the grid_sample reference and a gather-based PyTorch formulation.

Three variants compute the same function by default (on CUDA a fourth), more on request (`--variants ...`):
  xmsda        the fused op (`xmsda.ms_deform_attn`; on CUDA the Triton backend, its backward with atomics)
  xmsda-deterministic  the op with `deterministic=True` (on CUDA a default: the Triton backward without atomics)
  grid_sample  Deformable DETR's / mmcv's reference (`reference.ms_deform_attn_core_pytorch`)
  gather       corner gathers in stock PyTorch (`reference.ms_deform_attn_gather`)
  inductor     the grid_sample reference under `torch.compile` (its default backend, inductor): what compiling the
               reference buys. Its warm-up run compiles it (tens of seconds per phase), so it is not a default.
  cuda-ext     Deformable DETR's CUDA extension (`MultiScaleDeformableAttention`, or mmcv's op), CUDA only, a default
               where one is installed.

`device` "cuda" runs every variant on the GPU (the report then gives CUDA peak memory, measured in process, and no
CPU profile or roofline).

Phases: `forward` (no autograd), `backward` (the backward pass alone, after an untimed forward with autograd),
`module_forward` (a whole `MSDeformAttn` module, no autograd: inference) and `train_step` (the module as inside a
network: forward, backward from a fixed output gradient to the parameters and the inputs, and an SGD step). In the
module, xmsda computes the sampling locations inside the op (`ms_deform_attn_offsets`); the other variants compute
them in torch, as Deformable DETR does. With the profile on, the module phases also time a `free-core` module whose
sampling core (with the location arithmetic) costs nothing: the part no op can remove, and `xmsda-unfused`, the
xmsda module with the locations computed in torch: what fusing them saves.
Times are medians over `repeat` runs after one warm-up, all variants in one process, interleaved (in a rotating order)
so that load from other processes hits them alike.
The report names the C allocator the process runs on (`memory_allocator`) and whether torch's tensors get huge pages
(`tensor_pages`): under glibc's default malloc on 4 KiB pages the reference pays a page fault per 4 KiB of its gigabytes
of intermediates on every call, with huge pages ~20x fewer, under a caching allocator (tcmalloc) none.

Peak memory: each (variant, phase) runs once more in a fresh subprocess that builds the inputs, warms up on a tiny
problem, reads its resident set size (VmRSS), resets the kernel's high-water mark (`/proc/self/clear_refs`), runs the
phase and reads the high-water mark (VmHWM). The figure is the growth in resident memory the phase needs beyond its
inputs: everything it allocates as the OS sees it (allocator caches included). For `backward` the probe runs the
forward with autograd and the backward, so what the forward saves for the backward counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable

import numba
import numpy as np
import torch

from .harness import (
    FREE_CORE,
    GLIBC_NOTE,
    FreeCore,
    faults_every_call,
    interleaved_times,
    memory_allocator,
    memory_setup,
    set_threads,
    tensor_pages,
    time_once,
)
from .nn import MSDeformAttn
from .ops import ms_deform_attn, ms_deform_attn_offsets
from .reference import locations_from_offsets, ms_deform_attn_core_pytorch, ms_deform_attn_gather

__all__ = [
    "FREE_CORE",
    "GLIBC_NOTE",
    "PRESETS",
    "Preset",
    "faults_every_call",
    "memory_allocator",
    "run_benchmark",
    "tensor_pages",
]


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    image: tuple[int, int]  # (H, W) of the input image
    strides: tuple[int, ...]  # one feature level per stride
    batch: int = 2
    queries: int | None = None  # None: one query per feature position (encoder self-attention)
    heads: int = 8
    head_dim: int = 32
    points: int = 4

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(math.ceil(self.image[0] / s), math.ceil(self.image[1] / s)) for s in self.strides]

    @property
    def positions(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def num_queries(self) -> int:
        return self.positions if self.queries is None else self.queries


PRESETS = {
    p.name: p
    for p in (
        Preset("detr-encoder", "Deformable DETR encoder, 800x1333, strides 8-64, Q=S", (800, 1333), (8, 16, 32, 64)),
        Preset("detr-decoder", "Deformable DETR decoder, 300 queries", (800, 1333), (8, 16, 32, 64), queries=300),
        Preset(
            "mask2former-pixel-decoder",
            "Mask2Former pixel decoder, 800x1333, strides 8/16/32, Q=S",
            (800, 1333),
            (8, 16, 32),
        ),
        Preset("tiny", "a small smoke-test problem", (64, 96), (8, 16), batch=1, heads=2, head_dim=16, points=2),
    )
}


@functools.cache
def _compiled_reference():
    # Made on first use: torch.compile imports dynamo, which would triple the bench's start-up time (2 -> 5 s).
    # Compiled again for each set of level shapes it meets (they are Python ints in the reference's loops).
    return torch.compile(ms_deform_attn_core_pytorch, dynamic=False)


def _inductor_reference(value, spatial_shapes, level_start_index, loc, attn):
    return _compiled_reference()(value, [tuple(hw) for hw in spatial_shapes.tolist()], loc, attn)


def _cuda_extension():
    """The original CUDA op as an autograd function of the op's arguments, where one is installed: Deformable DETR's
    compiled `MultiScaleDeformableAttention` (its models/ops), else mmcv's; None otherwise."""
    try:
        import MultiScaleDeformableAttention as msda  # Deformable DETR's models/ops/setup.py builds this module
    except ImportError:
        msda = None
    if msda is not None:

        class DeformableDetrFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value, shapes, starts, loc, attn):
                ctx.save_for_backward(value, shapes, starts, loc, attn)
                return msda.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)

            @staticmethod
            def backward(ctx, grad_output):
                value, shapes, starts, loc, attn = ctx.saved_tensors
                grads = msda.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_output.contiguous(), 64)
                return grads[0], None, None, grads[1], grads[2]

        return DeformableDetrFunction.apply
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except ImportError:
        return None
    return lambda v, ss, lsi, loc, a: MultiScaleDeformableAttnFunction.apply(v, ss, lsi, loc, a, 64)


def _cuda_extension_variant(value, spatial_shapes, level_start_index, loc, attn):
    function = _cuda_extension()
    if function is None:
        raise RuntimeError("cuda-ext: neither Deformable DETR's MultiScaleDeformableAttention nor mmcv is installed")
    return function(value, spatial_shapes, level_start_index, loc, attn)


VARIANTS: dict[str, Callable] = {
    "xmsda": ms_deform_attn,
    "xmsda-deterministic": functools.partial(ms_deform_attn, deterministic=True),
    "grid_sample": lambda v, ss, lsi, loc, a: ms_deform_attn_core_pytorch(v, ss, loc, a),
    "gather": lambda v, ss, lsi, loc, a: ms_deform_attn_gather(v, ss, loc, a),
    "inductor": _inductor_reference,
    "cuda-ext": _cuda_extension_variant,
}
DEFAULT_VARIANTS = ("xmsda", "grid_sample", "gather")
# Variants that run on CUDA tensors only
CUDA_VARIANTS = ("cuda-ext",)


def default_variants(device: str = "cpu") -> tuple[str, ...]:
    """The variants `xmsda bench` times on `device` unless told otherwise."""
    if device == "cpu":
        return DEFAULT_VARIANTS
    extension = ("cuda-ext",) if _cuda_extension() is not None else ()
    return ("xmsda", "xmsda-deterministic", "grid_sample", "gather", *extension)


# Variants whose first run at a shape compiles: the memory probe runs them once at full size before it measures.
COMPILED_VARIANTS = ("inductor",)
PHASES = ("forward", "backward", "module_forward", "train_step")
MODULE_PHASES = ("module_forward", "train_step")


def _level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _reference_points(preset: Preset, g: torch.Generator) -> torch.Tensor:
    """`[Q, 2]` (x, y): every feature position's own centre for encoder presets, uniform for decoder queries."""
    if preset.queries is not None:
        return torch.rand(preset.queries, 2, generator=g)
    centres = []
    for h, w in preset.shapes:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x, y], -1).reshape(-1, 2))
    return torch.cat(centres)


def make_op_inputs(preset: Preset, dtype=torch.float32, seed=0, device="cpu"):
    """Op inputs as a trained model produces them: points a few pixels around each query's reference point (drawn on
    the CPU, then moved to `device`)."""
    g = torch.Generator().manual_seed(seed)
    N, Q, M, D, P = preset.batch, preset.num_queries, preset.heads, preset.head_dim, preset.points
    spatial_shapes, level_start_index = _level_tensors(preset.shapes)
    L = len(preset.shapes)
    value = torch.randn(N, preset.positions, M, D, generator=g)
    pixel = torch.tensor([[1.0 / w, 1.0 / h] for h, w in preset.shapes]).view(1, 1, 1, L, 1, 2)
    offsets = torch.randn(N, Q, M, L, P, 2, generator=g) * 2.0 * pixel
    loc = _reference_points(preset, g).view(1, Q, 1, 1, 1, 2) + offsets
    attn = torch.randn(N, Q, M, L * P, generator=g).softmax(-1).view(N, Q, M, L, P)
    tensors = (value, spatial_shapes, level_start_index, loc, attn)
    return [(t.to(dtype) if t.is_floating_point() else t).to(device) for t in tensors]


class _Module(MSDeformAttn):
    """`MSDeformAttn` on a variant's core. xmsda is the module as shipped (locations computed inside the op, unless
    `fuse_locations` is turned off); the others get the locations computed in torch, as in Deformable DETR."""

    def __init__(self, preset: Preset, variant: str):
        L = len(preset.shapes)
        super().__init__(preset.heads * preset.head_dim, L, preset.heads, preset.points)
        self.variant = variant
        self.fuse_locations = variant.startswith("xmsda")

    def attend(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        core = VARIANTS[self.variant]
        return core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def attend_offsets(
        self, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
    ):
        if self.fuse_locations:
            deterministic = True if self.variant == "xmsda-deterministic" else None
            tensors = (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights)
            return ms_deform_attn_offsets(*tensors, deterministic=deterministic)
        loc = locations_from_offsets(reference_points, sampling_offsets, spatial_shapes)
        return self.attend(value, spatial_shapes, level_start_index, loc, attention_weights)


def make_module_inputs(preset: Preset, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    C = preset.heads * preset.head_dim
    spatial_shapes, level_start_index = _level_tensors(preset.shapes)
    L = len(preset.shapes)
    flat = torch.randn(preset.batch, preset.positions, C, generator=g, dtype=dtype)
    query = flat if preset.queries is None else torch.randn(preset.batch, preset.queries, C, generator=g, dtype=dtype)
    ref = _reference_points(preset, g).to(dtype).view(1, -1, 1, 2).expand(preset.batch, -1, L, 2).contiguous()
    return tuple(t.to(device) for t in (query, ref, flat, spatial_shapes, level_start_index))


def _make_module(preset: Preset, variant: str, dtype, seed=0, device="cpu") -> _Module:
    torch.manual_seed(seed)
    module = _Module(preset, variant).to(dtype=dtype, device=device)
    # Mid-training weights: with Deformable DETR's initialisation every point sits exactly on a pixel centre.
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0.0, 0.02)
        module.attention_weights.weight.normal_(0.0, 0.02)
    return module


def _phase_runner(preset: Preset, variant: str, phase: str, dtype, device="cpu") -> Callable[[], None]:
    """A closure that runs one phase once (inputs built up front on `device`, which it carries for timing)."""
    runner = _make_phase_runner(preset, variant, phase, dtype, device)
    runner.device = device
    return runner


def _make_phase_runner(preset: Preset, variant: str, phase: str, dtype, device) -> Callable[[], None]:
    fn = VARIANTS[variant]
    if phase == "module_forward":
        module = _make_module(preset, variant, dtype, device=device)
        inputs = make_module_inputs(preset, dtype, device=device)

        def module_forward():
            with torch.no_grad():
                module(*inputs)

        module_forward.module = module
        return module_forward
    if phase == "train_step":
        module = _make_module(preset, variant, dtype, device=device)
        inputs = make_module_inputs(preset, dtype, device=device)
        # Inside a network the query and the flattened maps come from trainable layers below (in Deformable DETR the
        # backbone's input projection, then each encoder layer), so a step also computes their gradients.
        query, _, flat, _, _ = inputs
        leaves = [flat.requires_grad_()] + ([] if query is flat else [query.requires_grad_()])
        opt = torch.optim.SGD(module.parameters(), lr=1e-4)
        # The gradient the layers above would send back. A loss computed here (a mean square, say) would be work of
        # the harness, not of the module: ~50 ms of elementwise passes over the output in every variant.
        grad_output = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)

        def train_step():
            opt.zero_grad(set_to_none=True)
            for leaf in leaves:
                leaf.grad = None
            module(*inputs).backward(grad_output)
            opt.step()

        train_step.module = module
        train_step.inputs = leaves
        return train_step
    value, ss, lsi, loc, attn = make_op_inputs(preset, dtype, device=device)
    if phase == "forward":

        def forward():
            with torch.no_grad():
                fn(value, ss, lsi, loc, attn)

        return forward
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    grad = torch.randn(preset.batch, preset.num_queries, preset.heads * preset.head_dim, dtype=dtype).to(device)
    state = {}

    def prepare():
        for t in leaves:
            t.grad = None
        state["out"] = fn(value, ss, lsi, loc, attn)

    def backward():
        state.pop("out").backward(grad)

    backward.prepare = prepare
    return backward


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_child(preset_name: str, heads: int, head_dim: int, variant: str, phase: str, dtype_name: str, threads: int):
    """Subprocess entry: print the resident-memory growth (bytes) of one phase run once."""
    set_threads(threads)
    dtype = getattr(torch, dtype_name)
    time_once(_phase_runner(PRESETS["tiny"], variant, phase, dtype))  # load kernels, initialise lazy state
    preset = dataclasses.replace(PRESETS[preset_name], heads=heads, head_dim=head_dim)
    runner = _phase_runner(preset, variant, phase, dtype)
    if variant in COMPILED_VARIANTS:
        time_once(runner)  # compile for these shapes; the compiler's own memory is not the phase's
    baseline = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    time_once(runner)  # for `backward`, this includes the forward with autograd: what it saves is the backward's cost
    print(json.dumps({"peak_bytes": _read_status("VmHWM") - baseline}))


def measure_memory(preset: Preset, variant: str, phase: str, dtype, threads: int) -> int | None:
    cmd = [sys.executable, "-m", "xmsda.bench", preset.name, str(preset.heads), str(preset.head_dim)]
    cmd += [variant, phase, str(dtype).split(".")[-1], str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"memory probe {variant}/{phase} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure_cuda_memory(preset: Preset, variant: str, phase: str, dtype) -> int:
    """Peak CUDA memory (bytes) one run of a phase allocates beyond its inputs (torch's allocator statistics)."""
    runner = _phase_runner(preset, variant, phase, dtype, "cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    time_once(runner)
    return torch.cuda.max_memory_allocated() - baseline


def profile_op(preset: Preset, dtype=torch.float32, repeat: int = 5) -> dict[str, float]:
    """Median seconds of one xmsda forward and backward: the whole op calls and the kernels inside them."""
    from .kernels import cpu

    value, ss, lsi, loc, attn = make_op_inputs(preset, dtype)
    N, _, M, D = value.shape
    Q = loc.shape[1]
    args = (value.numpy(), ss.numpy(), lsi.numpy(), loc.numpy(), None, attn.numpy())
    out = torch.empty(N, Q, M, D, dtype=dtype)
    grad_out = torch.randn(N, Q, M, D, dtype=dtype)
    gv, gl, ga = torch.zeros_like(value), torch.empty_like(loc), torch.empty_like(attn)
    order = cpu.query_order(loc.numpy(), ss.numpy(), None)
    # Ablations: queries in the order they come (row-major for the encoder presets) instead of the Z-order; every
    # point at one location, so that every gather hits L1 and the kernels' instructions alone are timed; and the
    # forward kernel that is not compiled for the head size (the same kernel unless D is in SPECIALISED_CHANNELS).
    given_order = np.tile(np.arange(Q), (N, 1))
    args_l1 = (*args[:3], torch.full_like(loc, 0.5).numpy(), *args[4:])
    backward_op = torch.ops.xmsda.ms_deform_attn_backward

    partition = cpu.backward_partition(N, len(preset.shapes), M, numba.get_num_threads())

    def backward_kernel(kernel_args, kernel_order):
        return lambda: cpu.backward_kernel(
            *kernel_args, kernel_order, grad_out.numpy(), gv.numpy(), gl.numpy(), ga.numpy(), *partition
        )

    pieces = {
        "forward op (torch.ops.xmsda.ms_deform_attn)": lambda: torch.ops.xmsda.ms_deform_attn(
            value, ss, lsi, loc, attn
        ),
        "  query order (the backward op computes it too)": lambda: cpu.query_order(loc.numpy(), ss.numpy(), None),
        "  forward kernel": lambda: cpu.forward(*args, order, out.numpy()),
        "  forward kernel, queries in given order": lambda: cpu.forward(*args, given_order, out.numpy()),
        "  forward kernel, all gathers in L1": lambda: cpu.forward(*args_l1, order, out.numpy()),
        "  forward kernel, generic head size": lambda: cpu.forward(*args, order, out.numpy(), generic=True),
        "backward op (xmsda.ms_deform_attn_backward)": lambda: backward_op(
            grad_out.view(N, Q, -1), value, ss, lsi, loc, attn
        ),
        "  backward kernel": backward_kernel(args, order),
        "  backward kernel, queries in given order": backward_kernel(args, given_order),
        "  backward kernel, all gathers in L1": backward_kernel(args_l1, order),
    }
    # interleaved like the variants: timed one after another, the op and its kernels met different load
    return {name: statistics.median(t) for name, t in interleaved_times(pieces, repeat).items()}


def profile_train_step(preset: Preset, dtype=torch.float32, top: int = 8) -> list[dict]:
    """torch.profiler self CPU time of the top ops in one xmsda module training step."""
    from torch.profiler import ProfilerActivity, profile

    runner = _phase_runner(preset, "xmsda", "train_step", dtype)
    runner()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in events[:top]
    ]


UNFUSED = "xmsda-unfused"


def _free_core_runner(preset: Preset, phase: str, dtype, device="cpu") -> Callable[[], None]:
    """A module phase whose sampling core is `FreeCore`: the time no core, however fast, can remove."""
    runner = _phase_runner(preset, "xmsda", phase, dtype, device)
    runner.module.attend_offsets = lambda v, ss, lsi, ref, offsets, attn: FreeCore.apply(v, offsets, attn)
    return runner


def _unfused_runner(preset: Preset, phase: str, dtype, device="cpu") -> Callable[[], None]:
    """A module phase of the xmsda module with the sampling locations computed in torch and passed to
    `ms_deform_attn`, as before `ms_deform_attn_offsets`: what fusing the location arithmetic saves."""
    runner = _phase_runner(preset, "xmsda", phase, dtype, device)
    runner.module.fuse_locations = False
    return runner


def roofline(preset: Preset, seconds: dict[str, float], dtype=torch.float32) -> dict[str, dict[str, float]]:
    """Lower bounds from compulsory memory traffic and arithmetic, against the measured medians.

    Memory: every tensor the phase must read or write, once (gathered value rows are assumed to hit in cache);
    the backward zero-fills the value gradient and then reads and writes it. Arithmetic: 2 flops per corner per
    channel for the weighted sum (forward); the backward adds a dot product and an update per corner and channel.
    """
    N, Q, M, D, P = preset.batch, preset.num_queries, preset.heads, preset.head_dim, preset.points
    L, S = len(preset.shapes), preset.positions
    b = torch.finfo(dtype).bits // 8
    value = N * S * M * D * b
    points = N * Q * M * L * P
    out = N * Q * M * D * b
    fwd_bytes = value + 3 * points * b + out  # value; locations (x, y) and weights; output
    bwd_bytes = value + 3 * value + out + 3 * points * b + 3 * points * b  # + grad_value, grad_out, their grads
    fwd_flops = points * 4 * D * 2
    bwd_flops = points * 4 * D * 4
    return {
        "forward": {"bytes": fwd_bytes, "flops": fwd_flops, "seconds": seconds.get("forward", float("nan"))},
        "backward": {"bytes": bwd_bytes, "flops": bwd_flops, "seconds": seconds.get("backward", float("nan"))},
    }


def machine_limits(threads: int) -> dict[str, float]:
    """Measured streaming bandwidth (bytes/s) and float32 matmul throughput (flop/s) with `threads` threads."""
    x = torch.empty(64 * 2**20 // 4).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    copy = min(time_once(lambda: y.copy_(x)) for _ in range(5))
    a = torch.randn(1024, 1024)
    a @ a
    mm = min(time_once(lambda: a @ a) for _ in range(5))
    return {"copy_bytes_per_s": 2 * x.numel() * 4 / copy, "matmul_flop_per_s": 2 * 1024**3 / mm, "threads": threads}


def run_benchmark(
    preset: Preset,
    threads: int | None = None,
    repeat: int = 5,
    variants=None,
    phases=PHASES,
    dtype=torch.float32,
    memory: bool = True,
    profile: bool = True,
    log=print,
    device: str = "cpu",
) -> dict:
    """Time `variants` (None: `default_variants(device)`) in `phases` on `device` ("cpu" or "cuda"). On CUDA the
    profile covers the free-core and unfused module rows only (the op's pieces and the roofline are the CPU's)."""
    variants = default_variants(device) if variants is None else tuple(variants)
    cuda = device == "cuda"
    if not cuda and any(v in CUDA_VARIANTS for v in variants):
        raise ValueError(f"variants {[v for v in variants if v in CUDA_VARIANTS]} run on CUDA only (device 'cuda')")
    threads = set_threads(threads)
    result = {
        "preset": dataclasses.asdict(preset)
        | {"shapes": preset.shapes, "S": preset.positions, "Q": preset.num_queries},
        "dtype": str(dtype).split(".")[-1],
        "threads": threads,
        "repeat": repeat,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "numba_threading_layer": None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }
        | memory_setup(),
        "phases": {},
    }
    for phase in phases:
        runners = {v: _phase_runner(preset, v, phase, dtype, device) for v in variants}
        if phase in MODULE_PHASES and profile:
            runners[FREE_CORE] = _free_core_runner(preset, phase, dtype, device)
            if "xmsda" in variants:
                runners[UNFUSED] = _unfused_runner(preset, phase, dtype, device)
        times = interleaved_times(runners, repeat, log, phase)
        del runners
        entry = {v: {"median_s": statistics.median(t), "times_s": t} for v, t in times.items()}
        if memory:
            for v in variants:
                if cuda:
                    entry[v]["peak_bytes"] = measure_cuda_memory(preset, v, phase, dtype)
                else:
                    entry[v]["peak_bytes"] = measure_memory(preset, v, phase, dtype, threads)
        if "grid_sample" in entry:
            for v in entry:
                entry[v]["speedup_vs_grid_sample"] = entry["grid_sample"]["median_s"] / entry[v]["median_s"]
        result["phases"][phase] = entry
    if not cuda:  # numba names its threading layer once it has run parallel code
        result["machine"]["numba_threading_layer"] = numba.threading_layer()
    if profile and "xmsda" in variants and not cuda:
        result["profile"] = {
            "op_pieces_s": profile_op(preset, dtype),
            "train_step_top_ops": profile_train_step(preset, dtype),
        }

        medians = {p: result["phases"][p]["xmsda"]["median_s"] for p in ("forward", "backward") if p in phases}
        result["roofline"] = roofline(preset, medians, dtype)
        result["machine"]["limits"] = machine_limits(threads)
    return result


def format_report(result: dict) -> str:
    p = result["preset"]
    lines = [
        f"preset {p['name']}: N={p['batch']} S={p['S']} Q={p['Q']} M={p['heads']} D={p['head_dim']} "
        f"L={len(p['shapes'])} P={p['points']} levels={p['shapes']}",
        f"dtype {result['dtype']}, {result['threads']} threads, median of {result['repeat']} runs "
        f"(numba threading layer {result['machine']['numba_threading_layer']})",
        f"memory allocator {result['machine']['allocator']}; {result['machine']['tensor_pages']}; "
        f"xmsda buffer cache up to {result['machine']['buffer_cache_limit_bytes'] / 2**20:.0f} MiB",
    ]
    device = result["machine"].get("device", "cpu")
    if device != "cpu":
        lines.append(f"device {device} (CUDA; peak memory from torch.cuda.max_memory_allocated)")
    elif faults_every_call(result["machine"]):
        lines.append(GLIBC_NOTE)
    lines += [
        "",
        f"{'phase':<14} {'variant':<19} {'median':>10} {'vs grid_sample':>15} {'peak memory':>12}",
    ]
    for phase, entry in result["phases"].items():
        for v, e in entry.items():
            peak = e.get("peak_bytes")
            peak_s = "n/a" if peak is None else f"{peak / 2**20:.0f} MiB"
            ratio = e.get("speedup_vs_grid_sample")
            ratio_s = "" if ratio is None else f"{ratio:.1f}x"
            lines.append(f"{phase:<14} {v:<19} {e['median_s'] * 1e3:>8.2f}ms {ratio_s:>15} {peak_s:>12}")
    prof = result.get("profile")
    if prof:
        lines += ["", "xmsda op, where the time goes (median):"]
        lines += [f"  {name:<36} {s * 1e3:8.1f} ms" for name, s in prof["op_pieces_s"].items()]
        lines += ["", "xmsda module training step, top ops by self CPU time (torch.profiler):"]
        lines += [
            f"  {e['op']:<36} {e['self_s'] * 1e3:8.1f} ms {e['share'] * 100:5.1f}%  x{e['calls']}"
            for e in prof["train_step_top_ops"]
        ]
    if any(FREE_CORE in result["phases"].get(phase, {}) for phase in MODULE_PHASES):
        lines += [
            "",
            f"{FREE_CORE}: the module with a sampling core that costs nothing (linear layers, softmax, and in the",
            "training step the optimizer): time no op can remove, the highest ratio any op reaches.",
            f"{UNFUSED}: the xmsda module with the sampling locations computed in torch (ms_deform_attn instead of",
            "ms_deform_attn_offsets).",
        ]
    if any("inductor" in entry for entry in result["phases"].values()):
        lines += ["", "inductor: the grid_sample reference compiled with torch.compile (default backend, inductor)."]
    roof = result.get("roofline")
    if roof:
        lim = result["machine"]["limits"]
        bw, fl = lim["copy_bytes_per_s"], lim["matmul_flop_per_s"]
        lines += [
            "",
            f"machine (measured, {lim['threads']} threads): copy {bw / 1e9:.1f} GB/s, matmul {fl / 1e9:.0f} GFLOP/s",
        ]
        for phase, r in roof.items():
            bound = max(r["bytes"] / bw, r["flops"] / fl)
            lines.append(
                f"  {phase:<9} {r['bytes'] / 1e6:7.0f} MB compulsory, {r['flops'] / 1e9:5.2f} GFLOP: bound "
                f"{bound * 1e3:6.1f} ms, measured {r['seconds'] * 1e3:7.1f} ms ({r['seconds'] / bound:4.1f}x the bound)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    name, heads, head_dim, variant, phase, dtype_name, threads = sys.argv[1:8]
    _memory_child(name, int(heads), int(head_dim), variant, phase, dtype_name, int(threads))
