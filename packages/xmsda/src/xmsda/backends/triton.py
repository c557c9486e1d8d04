"""The `triton` backend: the Triton kernels of `xmsda.kernels.triton` on CUDA tensors, and on CPU tensors through
Triton's interpreter when the process imported triton with TRITON_INTERPRET=1 (slow: it runs every program in NumPy;
for testing the kernels).

Triton is an optional dependency (`pip install 'xmsda[triton]'`); it is imported on first use. The backward's value
gradient is made with atomics, or without them when `deterministic` (see kernels/triton.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import numpy as np
import torch

NAME = "triton"


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter in this process. Triton decides it when it is first imported:
    triton.language's own helpers (tl.zeros, tl.sum) are then made interpreted or compiled by TRITON_INTERPRET, and
    kernels of the other kind cannot call them. Importing triton here, if nothing has yet, decides it by the
    environment now."""
    import triton.language.standard
    from triton.runtime.jit import JITFunction

    return not isinstance(triton.language.standard.cdiv, JITFunction)


def unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'xmsda[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return (
                "it runs on CPU tensors only through Triton's interpreter, and TRITON_INTERPRET=1 was set after "
                "triton was imported (torch.compile and diffusers import it): set it before the process first imports "
                "triton, e.g. in the environment"
            )
        return (
            "it runs on CUDA tensors, and on CPU tensors only through Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (slow; for testing the kernels), or pick backend='cpu'"
        )
    return "it runs on CUDA tensors"


@functools.cache
def kernels():
    """The kernels module, made in the mode triton.language was imported in (`_interpreting`): `triton.jit` picks
    interpreted or compiled by TRITON_INTERPRET as it decorates each kernel, so the module is executed under the
    matching setting, as a copy of its own that an earlier plain import cannot have made in the other mode."""
    interpret = _interpreting()
    name = f"xmsda.kernels.triton_{'interpreted' if interpret else 'compiled'}"
    origin = importlib.util.find_spec("xmsda.kernels.triton").origin
    spec = importlib.util.spec_from_file_location(name, origin)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): all of a head's channels in one tile (D rounded up to a power of two), and as many queries
    (or value rows) as keep the tile at 2048 elements, at most 64."""
    block_d = 1 << max(0, channels - 1).bit_length()
    return max(1, min(64, 2048 // block_d)), block_d


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(value, levels, loc, ref, attn):
    """The kernels module for these tensors, their contiguous forms and the level tensors on their device."""
    module = kernels()
    index = {"dtype": torch.int64, "device": value.device}
    shapes = levels.spatial_shapes.to(**index).contiguous()
    starts = levels.level_start_index.to(**index).contiguous()
    loc = loc.contiguous()
    # without reference points the kernels never read `ref`: any tensor stands in
    ref = loc if ref is None else ref.contiguous()
    return module, value.contiguous(), shapes, starts, loc, ref, attn.contiguous()


def forward(value, levels, loc, ref, attn):
    N, S, M, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(N, Q, M, D, dtype=_compute_dtype(value.dtype), device=value.device)
    if out.numel():
        module, value_, shapes, starts, loc_, ref_, attn_ = _common(value, levels, loc, ref, attn)
        block_q, block_d = blocks(D)
        grid = (-(-Q // block_q), N * M)
        module.forward_kernel[grid](
            value_, shapes, starts, loc_, ref_, attn_, out, Q, S, M, D, L, P,
            HAS_REF=ref is not None, BLOCK_Q=block_q, BLOCK_D=block_d,
        )  # fmt: skip
    return out.view(N, Q, M * D).to(value.dtype)


def backward(grad_output, value, levels, loc, ref, attn, deterministic):
    N, S, M, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    ct = _compute_dtype(value.dtype)
    device = value.device
    grad_loc = torch.zeros(loc.shape, dtype=ct, device=device)
    grad_attn = torch.zeros(attn.shape, dtype=ct, device=device)
    if not grad_attn.numel():
        return torch.zeros_like(value), grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)
    module, value_, shapes, starts, loc_, ref_, attn_ = _common(value, levels, loc, ref, attn)
    grad_out = grad_output.reshape(N, Q, M, D).contiguous()
    block_q, block_d = blocks(D)
    grid = (-(-Q // block_q), N * M)
    sizes = (Q, S)
    options = {"HAS_REF": ref is not None, "BLOCK_Q": block_q, "BLOCK_D": block_d}
    if not deterministic:
        grad_value = torch.zeros(value.shape, dtype=ct, device=device)
        module.backward_kernel[grid](
            value_, shapes, starts, starts, loc_, ref_, attn_, grad_out, grad_value, grad_loc, grad_attn,
            grad_attn, grad_attn, *sizes, 0, 0, M, D, L, P, ATOMIC=True, **options,
        )  # fmt: skip
    else:
        # each level's grid of top-left corner cells, one wider than the map on each side (cells -1 .. H-1, W-1)
        cells = (levels.shapes[:, 0] + 1) * (levels.shapes[:, 1] + 1)
        cell_starts = torch.from_numpy(np.concatenate([[0], np.cumsum(cells)[:-1]])).to(device)
        buckets = N * int(cells.sum()) * M
        key_dtype = torch.int32 if buckets < 2**31 - 1 else torch.int64
        weights = torch.empty(attn.numel(), 4, dtype=ct, device=device)
        keys = torch.empty(attn.numel(), dtype=key_dtype, device=device)
        module.backward_kernel[grid](
            value_, shapes, starts, cell_starts, loc_, ref_, attn_, grad_out, grad_attn, grad_loc, grad_attn,
            weights, keys, *sizes, int(cells.sum()), buckets, M, D, L, P, ATOMIC=False, **options,
        )  # fmt: skip
        # a stable sort: its order, and so each row's order of additions, is a function of the keys alone
        sorted_keys, order = torch.sort(keys, stable=True)
        bounds = torch.searchsorted(sorted_keys, torch.arange(buckets + 1, dtype=key_dtype, device=device))
        grad_value = torch.empty(value.shape, dtype=ct, device=device)
        rows = N * S * M
        block_r, _ = blocks(D)
        module.value_grad_kernel[(-(-rows // block_r),)](
            shapes, starts, cell_starts, bounds, order, weights, grad_out, grad_value,
            S, int(cells.sum()), M, D, L, L * P, rows, BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
    return grad_value.to(value.dtype), grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)
