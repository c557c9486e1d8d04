"""The `cpu` backend: the fused numba kernels of `xmsda.kernels.cpu` on CPU tensors.

float16 and bfloat16 inputs are handed to the kernels as their bits and computed in float32; outputs and gradients
come from the buffer cache (`xmsda.buffers`). The kernels use `torch.get_num_threads()` threads. Their backward is
deterministic in any case (a partition of the value gradient: see kernels/cpu.py), so `deterministic` changes nothing.
"""

from __future__ import annotations

import contextlib
import os

import numba
import numpy as np
import torch

from .. import buffers
from ..kernels import cpu as kernels

NAME = "cpu"


def unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "it runs on CPU tensors (move them with .cpu(), or pick backend='triton' for CUDA tensors)"
    return None


# Set in a process forked after numba's OpenMP threads started: GNU OpenMP cannot run in such a child (numba
# terminates a child that launches a kernel), so the selector hands such a process the reference instead.
_forked_from_openmp = False


def _note_fork() -> None:
    global _forked_from_openmp
    # threading_layer() raises ValueError while numba has run no parallel code: the child can start its own threads
    with contextlib.suppress(ValueError):
        _forked_from_openmp = _forked_from_openmp or numba.threading_layer() == "omp"


os.register_at_fork(after_in_child=_note_fork)

FORKED_WARNING = (
    "xmsda: this process was forked after numba's OpenMP threads had started, and GNU OpenMP cannot run "
    "in a forked child; using the grid_sample reference (slow). To keep the kernels, start worker "
    "processes with the 'spawn' or 'forkserver' method, or fork before the parent first runs the op, or "
    "give numba a fork-safe threading layer (NUMBA_THREADING_LAYER=tbb with the tbb package)."
)


def forked_from_openmp() -> bool:
    """Whether the kernels cannot run in this process (see FORKED_WARNING)."""
    return _forked_from_openmp


@contextlib.contextmanager
def _torch_threads():
    """Run the kernels on as many threads as torch's intra-op pool (`torch.set_num_threads`), as torch's own CPU ops
    do: a process that limits torch (data-loader workers, several ranks per machine) must not get a kernel on every
    core. numba's thread count is per calling thread and is restored afterwards."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_tensor(*shape, dtype, zeroed=False):
    """An output or gradient buffer in the compute dtype `dtype`, from the buffer cache."""
    return buffers.new_tensor(shape, np.float64 if dtype == torch.float64 else np.float32, zeroed)


def _kernel_view(tensor):
    """A contiguous NumPy view of an input with no conversion: bfloat16 and float16 as their bits (uint16, int16),
    which the kernels widen as they read them (`kernels.simd.real`): converting first cost the bfloat16 op ~1.8x
    (docs/xmsda/kernels.md, "Half precision")."""
    tensor = tensor.detach().contiguous()
    bits = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}.get(tensor.dtype)
    return (tensor if bits is None else tensor.view(bits)).numpy()


def _kernel_inputs(value, loc, ref, attn):
    """The compute dtype and the kernels' views of the inputs; `ref` None means `loc` holds locations, else offsets
    from these reference points."""
    v, loc_, attn_ = (_kernel_view(t) for t in (value, loc, attn))
    return compute_dtype(value.dtype), v, loc_, None if ref is None else _kernel_view(ref), attn_


def forward(value, levels, loc, ref, attn):
    N, _, M, D = value.shape
    Q = loc.shape[1]
    ct, v, loc_, ref_, attn_ = _kernel_inputs(value, loc, ref, attn)
    out = new_tensor(N, Q, M, D, dtype=ct)
    with _torch_threads():
        order = kernels.query_order(loc_, levels.shapes, ref_)
        kernels.forward(v, levels.shapes, levels.starts, loc_, ref_, attn_, order, out.numpy())
    return out.view(N, Q, M * D).to(value.dtype)


def backward(grad_output, value, levels, loc, ref, attn, deterministic):
    N, _, M, D = value.shape
    Q = loc.shape[1]
    ct, v, loc_, ref_, attn_ = _kernel_inputs(value, loc, ref, attn)
    grad_out = _kernel_view(grad_output.reshape(N, Q, M, D))
    grad_value = new_tensor(*v.shape, dtype=ct, zeroed=True)
    grad_loc = new_tensor(*loc_.shape, dtype=ct)
    grad_attn = new_tensor(*attn_.shape, dtype=ct)
    shapes, starts = levels.shapes, levels.starts
    with _torch_threads():
        order = kernels.query_order(loc_, shapes, ref_)
        partition = kernels.backward_partition(N, len(shapes), M, numba.get_num_threads())
        grads = (grad_value.numpy(), grad_loc.numpy(), grad_attn.numpy())
        kernels.backward_kernel(v, shapes, starts, loc_, ref_, attn_, order, grad_out, *grads, *partition)
    return grad_value.to(value.dtype), grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)
