"""Settings for the whole suite, made before any test module is collected (and before torch loads OpenMP)."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: the suite runs two workers whose kernels each use torch's threads, on
# a machine it may share, and spinning threads then take the cores from the working ones (a gradcheck of the CPU
# kernels, two at once on 2 busy cores: ~100 s spinning, ~8 s passive; docs/xmsda/op.md, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# xMSDA's Triton backend is tested on CPU tensors in Triton's interpreter, which must be on when triton is first
# imported (torch._dynamo, which torch.compile and diffusers load, imports it during collection). Where CUDA exists
# the same tests run the compiled kernels on the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
