"""Memory for the ops' large outputs and gradients, kept and reused across calls.

A fresh buffer costs its first touch: the kernel faults its pages in and zeroes them, and on a VM whose host takes
freed memory back (virtio-balloon free page reporting) the host backs them again. glibc's malloc, the default,
returns every freed block over its mmap threshold (at most 32 MiB) to the OS, so without this cache a detr-encoder
training step pays that for its 45 MB outputs and gradients in most steps (docs/xmsda/kernels.md, "Buffer cache").
A caching allocator (tcmalloc) avoids it too; with one, the cache gains nothing.

Buffers of `MIN_BYTES` or more come from here (smaller ones stay with malloc, whose heap reuses them anyway). A
buffer goes back to the cache when the last tensor using its memory is freed, never earlier, and the cache keeps at
most `limit` bytes of unused buffers (least recently freed ones are released first): `set_limit`, `empty`.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

__all__ = ["MIN_BYTES", "empty", "idle_bytes", "limit", "new_tensor", "set_limit"]

MIN_BYTES = 4 << 20  # NumPy's threshold for advising huge pages: below it malloc's heap serves and reuses buffers
_GRANULE = 2 << 20  # sizes are rounded up to whole huge pages


def _limit_from_environment(default_mib: int = 1024) -> int:
    text = os.environ.get("XMSDA_BUFFER_CACHE_MB", str(default_mib))
    if not text.strip().isdigit():
        raise ValueError(
            f"XMSDA_BUFFER_CACHE_MB must be a whole number of MiB >= 0 (0 turns the cache off), got {text!r}"
        )
    return int(text) << 20


_lock = threading.RLock()  # re-entrant: a buffer freed by the garbage collector inside `new_tensor` comes back here
_idle: dict[int, np.ndarray] = {}  # id -> unused block, least recently freed first
_limit = _limit_from_environment()


def limit() -> int:
    """The most bytes of unused buffers the cache keeps."""
    return _limit


def set_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of unused buffers (0: keep none, every buffer is freed with its last tensor); releases
    the excess now."""
    global _limit
    if nbytes < 0:
        raise ValueError(f"the buffer cache limit must be >= 0 bytes, got {nbytes}")
    with _lock:
        _limit = int(nbytes)
        _trim()


def empty() -> None:
    """Release every unused buffer to the allocator (buffers in use are released when their tensors are freed)."""
    with _lock:
        _idle.clear()


def idle_bytes() -> int:
    """Bytes of unused buffers the cache holds."""
    with _lock:
        return sum(block.nbytes for block in tuple(_idle.values()))


def new_tensor(shape, dtype: np.dtype, zeroed: bool = False) -> torch.Tensor:
    """An uninitialised (or, `zeroed`, zero-filled by torch's threads) CPU tensor of NumPy `dtype`. Its memory is
    NumPy's, which advises the kernel to back large arrays with transparent huge pages: a fresh 45 MB buffer takes
    ~20 page faults instead of ~11,000. Zeroing up front is faster than calloc's pages faulting in one by one inside
    a kernel (figures: docs/xmsda/kernels.md, "Buffer cache")."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        array = np.empty(shape, dtype)
    else:
        block = _take(-(-nbytes // _GRANULE) * _GRANULE)
        array = block[:nbytes].view(dtype).reshape(shape)
        # torch.from_numpy keeps `array` alive as long as any tensor shares its memory, so its death frees the block
        weakref.finalize(array, _give_back, block).atexit = False
    tensor = torch.from_numpy(array)
    return tensor.zero_() if zeroed else tensor


def _take(nbytes: int) -> np.ndarray:
    """The smallest unused block of `nbytes` to 1.25x that (for inputs whose size varies a little from call to
    call), else a new one."""
    with _lock:
        # A snapshot: a buffer freed by the garbage collector meanwhile may add to `_idle` (or trim it).
        fits = [block for block in tuple(_idle.values()) if nbytes <= block.nbytes <= nbytes + nbytes // 4]
        for block in sorted(fits, key=lambda block: block.nbytes):
            if _idle.pop(id(block), None) is not None:
                return block
    return np.empty(nbytes, np.uint8)


def _give_back(block: np.ndarray) -> None:
    with _lock:
        _idle[id(block)] = block
        _trim()


def _trim() -> None:
    total = idle_bytes()
    while _idle and total > _limit:
        total -= _idle.pop(next(iter(_idle))).nbytes


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork; the child's copy would never be released.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)
