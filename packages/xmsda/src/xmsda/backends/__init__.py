"""The op's backends and the one place that picks among them.

  cpu        fused numba kernels (`xmsda.kernels.cpu`), CPU tensors
  triton     Triton kernels (`xmsda.kernels.triton`), CUDA tensors; CPU tensors in Triton's interpreter
  reference  the grid_sample formulation (`xmsda.reference`), any device

`backend=None` picks by device: `cpu` for CPU tensors, `triton` for CUDA tensors where Triton is installed, else the
reference with a one-time warning. Each backend module has `unavailable(device)` (why it cannot take tensors there,
or None), `forward(value, levels, loc, ref, attn)` and `backward(grad_output, value, levels, loc, ref, attn,
deterministic)`, where `ref` None means `loc` holds locations, else pixel offsets from these reference points.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from . import cpu, reference, triton

__all__ = ["BACKENDS", "Levels", "default_backend", "select"]

BACKENDS = {module.NAME: module for module in (cpu, triton, reference)}


@dataclasses.dataclass(frozen=True)
class Levels:
    """The checked level tensors (`validation.levels`), on the host and as given."""

    shapes: np.ndarray  # [L, 2] int64 (H, W)
    starts: np.ndarray  # [L] int64
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def default_backend(device: torch.device) -> str:
    """The backend `backend=None` means for tensors on `device`."""
    if device.type == "cpu":
        return cpu.NAME
    if device.type == "cuda":
        reason = triton.unavailable(device)
        if reason is None:
            return triton.NAME
        _warn_once("cuda", f"xmsda: no kernel for cuda tensors ({reason}); using the grid_sample reference")
        return reference.NAME
    _warn_once(device.type, f"xmsda has no kernel for {device.type} tensors; using the grid_sample reference")
    return reference.NAME


def select(name: str | None, device: torch.device):
    """The backend module for `name` (None: by device) on tensors on `device`. Raises ValueError for an unknown name
    or a backend that cannot take tensors there. The CPU kernels cannot run in a process forked after their threads
    started: there the reference stands in, with a one-time warning."""
    if name is None:
        name = default_backend(device)
    if name not in BACKENDS:
        raise ValueError(f"backend must be None or one of {list(BACKENDS)}, got {name!r}")
    backend = BACKENDS[name]
    reason = backend.unavailable(device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot take {device.type} tensors: {reason}")
    if backend is cpu and cpu.forked_from_openmp():
        _warn_once("fork", cpu.FORKED_WARNING)
        return reference
    return backend
