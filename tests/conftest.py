"""Settings for the whole suite, made before any test module is collected."""

from __future__ import annotations

import os

import torch

# xMSDA's Triton backend is tested on CPU tensors in Triton's interpreter, which must be on when triton is first
# imported (torch._dynamo, which torch.compile and diffusers load, imports it during collection). Where CUDA exists
# the same tests run the compiled kernels on the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
