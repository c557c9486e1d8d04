"""Where and in what precision a model runs: `--device`, `--dtype` and `--threads`, resolved in one place.

- device: `cpu`, `cuda` or `cuda:N`; by default `cuda` when torch sees a GPU, else `cpu`.
- dtype: `float32`, `bfloat16` or `float16`; by default what the model's card says (`chorus.json`'s `dtype`), else
  `bfloat16` for a diffusers pipeline on a GPU (what their cards recommend) and `float32` everywhere else.
- threads: torch's CPU threads; by default one for the built-in model (a small model on a shared machine runs several
  times faster on one thread than on two competing ones: docs/chorus/models.md) and torch's own choice otherwise.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


class DeviceError(ValueError):
    """A device or dtype this machine or this project cannot use."""


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """`spec` as a torch device, checked against this machine; None or "auto" picks cuda when available."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(spec)
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build})")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def parse_device(spec: str | torch.device) -> torch.device:
    """`spec` as a cpu or cuda device, without asking whether this machine has it (a Ray replica may)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {spec}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {spec}: expected cpu, cuda or cuda:N")
    return device


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 0:
        raise DeviceError(f"--threads {threads}: must be >= 0 (0: torch's default)")


def parse_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"--dtype {spec}: expected one of {', '.join(DTYPES)}")
        return spec
    name = _ALIASES.get(str(spec).lower(), str(spec).lower())
    if name not in DTYPES:
        raise DeviceError(f"--dtype {spec}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    spec: str | torch.dtype | None, device: torch.device, *, card: str | None = None, diffusers: bool = True
) -> torch.dtype:
    """The dtype asked for, else the card's, else bfloat16 for a diffusers pipeline on a GPU, else float32."""
    if spec is not None and str(spec) != "auto":
        return parse_dtype(spec)
    if card is not None:
        return parse_dtype(card)
    return torch.bfloat16 if diffusers and device.type == "cuda" else torch.float32


def default_threads(model: str, device: torch.device) -> int:
    """Torch CPU threads for this model when the user gives none; 0 leaves torch's default."""
    return 1 if str(model) == "builtin" and device.type == "cpu" else 0


def set_threads(threads: int | None, model: str, device: torch.device) -> int:
    """Apply `--threads` (None: the model's default; 0: torch's default); returns the count in effect."""
    check_threads(threads)
    chosen = default_threads(model, device) if threads is None else threads
    if chosen > 0:
        torch.set_num_threads(chosen)
    return torch.get_num_threads()
