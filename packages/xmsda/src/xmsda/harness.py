"""What both benchmarks (`xmsda bench`, `xmsda bench-model`) share: interleaved timing on the CPU or a GPU, the
free core (an attention core that costs nothing), thread counts, and the memory setup the report names."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from . import buffers

__all__ = [
    "FREE_CORE",
    "GLIBC_NOTE",
    "FreeCore",
    "faults_every_call",
    "interleaved_times",
    "memory_allocator",
    "memory_setup",
    "set_threads",
    "tensor_pages",
    "time_once",
]


def time_once(runner: Callable[[], None]) -> float:
    """Seconds of one run of `runner` (after its `prepare`, if it has one). A runner with a CUDA `device` attribute
    is timed from an idle GPU to its last kernel's end."""
    prepare = getattr(runner, "prepare", None)
    if prepare is not None:
        prepare()
    cuda = getattr(runner, "device", "cpu") == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved_times(
    runners: dict[str, Callable[[], None]], repeat: int, log: Callable[[str], None] | None = None, label: str = ""
) -> dict[str, list[float]]:
    """Seconds of `repeat` runs of each runner after one warm-up each. Interleaved, so that outside load hits every
    runner alike, and in a rotating order: a run right after another's can pay for it (freed memory faulted back in,
    the other thread pool still spinning). `log` gets a progress line per round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        time_once(runner)
    names = list(runners)
    for i in range(repeat):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(time_once(runners[name]))
        if log is not None:
            log(f"{label} {i + 1}/{repeat}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


def set_threads(threads: int | None) -> int:
    """torch's thread count (which the op follows) and numba's (for the profile's direct kernel calls)."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def zeros_like_the_op(*shape, dtype, device="cpu"):
    """Zeros allocated as the op allocates its outputs: on the CPU from its buffer cache in its compute dtype."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return buffers.new_tensor(shape, np.float64 if compute == torch.float64 else np.float32, True).to(dtype)


FREE_CORE = "free-core"


class FreeCore(torch.autograd.Function):
    """Stands in for the sampling core (with the location arithmetic, which xmsda's is fused with) at no cost beyond
    allocating its output and zero gradients as the op does, so that the linear layers upstream still get gradients:
    a module step with it measures everything but the core."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights):
        ctx.shapes = value.shape, sampling_locations.shape, attention_weights.shape
        ctx.device = value.device
        N, _, M, D = value.shape
        return zeros_like_the_op(N, sampling_locations.shape[1], M * D, dtype=value.dtype, device=value.device)

    @staticmethod
    def backward(ctx, grad_output):
        return tuple(zeros_like_the_op(*s, dtype=grad_output.dtype, device=ctx.device) for s in ctx.shapes)


# Allocators a process may have preloaded (LD_PRELOAD), as PyTorch's CPU tuning guide and `torch.backends.xeon.run_cpu`
# suggest: they keep freed memory for reuse where glibc's malloc returns blocks over its mmap threshold to the OS.
_PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


GLIBC_NOTE = (
    "  (under glibc's malloc grid_sample and gather fault their large intermediates in again on every call. For a\n"
    "  tuned baseline preload a caching allocator (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)\n"
    "  or, second best, put torch's tensors on huge pages (THP_MEM_ALLOC_ENABLE=1))"
)


def memory_allocator(maps_path: str = "/proc/self/maps") -> str:
    """The C allocator this process runs on: a preloaded one, found among the mapped libraries, else glibc's malloc
    with any MALLOC_* settings from the environment. It decides much of grid_sample's time: glibc gives each freed
    buffer over its mmap threshold back to the OS, so a reference step that allocates gigabytes pays a page fault per
    4 KiB of them on every call, which a caching allocator does not."""
    try:
        with open(maps_path) as f:
            libraries = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        libraries = set()
    for name in _PRELOADED_ALLOCATORS:
        found = sorted(lib for lib in libraries if f"lib{name}" in os.path.basename(lib))
        if found:
            return f"{name} ({os.path.basename(found[0])})"
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    return "glibc malloc" + (f" ({', '.join(settings)})" if settings else " (default settings)")


def faults_every_call(machine: dict) -> bool:
    """Whether the reference's large intermediates are faulted in again, 4 KiB at a time, on every call: under glibc's
    malloc with its mmap threshold at the default, and torch's tensors on small pages."""
    allocator = machine["allocator"]
    threshold_set = "MALLOC_MMAP_THRESHOLD_" in allocator or "mmap_threshold" in allocator
    return allocator.startswith("glibc") and not threshold_set and not machine["tensors_on_huge_pages"]


def tensor_pages(thp_path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> tuple[bool, str]:
    """Whether torch's large CPU tensors get transparent huge pages, and the two settings that decide it: the
    kernel's THP mode and torch's THP_MEM_ALLOC_ENABLE (only "1" turns it on), with which torch advises the kernel to
    back each buffer of 2 MiB or more with huge pages. On huge pages a fresh buffer faults in 2 MiB at a time, so
    under glibc's malloc the reference's faults shrink about 20x."""
    try:
        with open(thp_path) as f:
            selected = [word[1:-1] for word in f.read().split() if word.startswith("[")]
        mode = selected[0] if selected else "unknown"
    except OSError:
        mode = "unavailable"
    flag = os.environ.get("THP_MEM_ALLOC_ENABLE")
    huge = mode == "always" or (mode == "madvise" and flag == "1")
    settings = f"kernel THP {mode}, THP_MEM_ALLOC_ENABLE={'unset' if flag is None else flag}"
    return huge, f"torch tensors on {'huge' if huge else '4 KiB'} pages ({settings})"


def memory_setup() -> dict:
    """The report's memory fields: the allocator, whether torch's tensors are on huge pages (see above) and how much
    unused memory the op's buffer cache may keep (`xmsda.buffers`)."""
    on_huge_pages, pages = tensor_pages()
    return {
        "allocator": memory_allocator(),
        "tensor_pages": pages,
        "tensors_on_huge_pages": on_huge_pages,
        "buffer_cache_limit_bytes": buffers.limit(),
    }
