"""Writing frames to files: the output path's extension picks the format (.mp4 H.264, .gif, .npy)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

FORMATS = (".mp4", ".gif", ".npy")


def check_output_path(path: str | Path) -> Path:
    """Refuse an unknown extension or an unwritable place before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"output {path}: extension must be one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise ValueError(f"output {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output {path}: directory {parent} does not exist")
    check_writable_dir(parent, f"output {path}")
    return path


def check_writable_dir(directory: str | Path, what: str) -> None:
    """Create and remove a file in `directory`: permission bits do not bind root, a read-only mount does."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".chorus-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {directory}: {exc.strerror or exc}") from None


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """H.264 in MP4 (yuv420p, playable in browsers); frames [F, H, W, 3] in [0, 1]. Odd sizes are padded."""
    import av

    pixels = to_uint8(frames)
    _, h, w, _ = pixels.shape
    pad_h, pad_w = h % 2, w % 2  # yuv420p needs even dimensions
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        with av.open(tmp.name, mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = w + pad_w, h + pad_h
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "preset": "medium", "movflags": "+faststart"}
            for frame in pixels:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return Path(tmp.name).read_bytes()


def encode_gif(frames: np.ndarray, fps: int = 8) -> bytes:
    import io

    from PIL import Image

    images = [Image.fromarray(p) for p in to_uint8(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write atomically (temporary file, then rename), so a failed write never leaves a partial file."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(frames, dtype=np.float32))
        data = buf.getvalue()
    elif suffix == ".gif":
        data = encode_gif(frames, fps)
    else:
        data = encode_mp4(frames, fps)
    return atomic_write(path, data)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file, fsync, rename: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to uint8 frames [F, H, W, 3] (for tests and analysis)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
