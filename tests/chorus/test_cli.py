"""`chorus generate`: output formats, the JSON report, and refusal of bad input without touching the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from chorus.cache import DiskStore
from chorus.cli import main
from chorus.video import read_mp4

TINY_ARGS = ["--height", "16", "--width", "16", "--frames", "5", "--steps", "3", "--guidance", "1.0"]


@pytest.mark.slow  # two `chorus generate` processes
def test_generate_writes_each_format_and_reuses_the_disk_cache(tmp_path, tiny_wan_dir):
    cache = tmp_path / "cache"
    base = [sys.executable, "-m", "chorus.cli", "generate", "a red circle moving left", "--model", str(tiny_wan_dir)]
    base += [*TINY_ARGS, "--cache-dir", str(cache), "--json"]
    first = subprocess.run([*base, "--out", str(tmp_path / "a.npy")], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["outcome"] == "miss" and report["transformer_calls"] == 3
    assert "denoising" in first.stderr  # the progress bar
    frames = np.load(tmp_path / "a.npy")
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == np.float32 and 0 <= frames.min() <= frames.max() <= 1

    second = subprocess.run([*base, "--out", str(tmp_path / "a.mp4")], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["outcome"] == "exact"
    video = read_mp4(tmp_path / "a.mp4")
    assert video.shape == (5, 16, 16, 3)
    assert np.abs(video / 255.0 - frames).mean() < 0.08  # lossy H.264 of the same frames

    gif = tmp_path / "a.gif"
    assert (
        main(["generate", "a red circle", "--model", str(tiny_wan_dir), *TINY_ARGS, "--no-cache", "--out", str(gif)])
        == 0
    )
    assert (tmp_path / "a.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")


@pytest.fixture(scope="module")
def seeded_cache(tmp_path_factory, tiny_wan_dir):
    """A disk cache with one entry, shared by the refusal cases: none of them may change it."""
    path = tmp_path_factory.mktemp("cli-cache")
    seed_args = ["generate", "a blue square", "--model", str(tiny_wan_dir), *TINY_ARGS, "-q"]
    assert main([*seed_args, "--cache-dir", str(path / "cache"), "--out", str(path / "seed.npy")]) == 0
    return path / "cache"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--out", "{tmp}/x.npy"], "non-empty"),
        (["a red circle", "--steps", "0", "--out", "{tmp}/x.npy"], "--steps: num_inference_steps=0"),
        (["a red circle", "--steps", "10000", "--out", "{tmp}/x.npy"], "less than or equal to 200"),
        (["a red circle", "--seed", "-1", "--out", "{tmp}/x.npy"], "--seed"),
        (["a red circle", "--guidance", "nan", "--out", "{tmp}/x.npy"], "--guidance"),
        (["a red circle", "--height", "15", "--out", "{tmp}/x.npy"], "--height: height=15"),
        (["a red circle", "--height", "960", "--width", "960", "--out", "{tmp}/x.npy"], "pixels"),
        (["a red circle", "--frames", "2001", "--out", "{tmp}/x.npy"], "--frames: num_frames=2001: at most 81"),
        (["a red circle", "--frames", "4", "--out", "{tmp}/x.npy"], "1 + a multiple of 4"),
        (["a red circle", "--out", "{tmp}/x.avi"], "extension"),
        (["a red circle", "--out", "{tmp}/missing/x.npy"], "does not exist"),
        (["a red circle", "--out", "{tmp}/cache"], "extension"),
        (["a red circle", "--out", "{tmp}/dir.npy"], "is a directory"),
        (["a red circle", "--out", "/proc/x.npy"], "cannot write in /proc"),
        (["a red circle", "--out", "{tmp}/x.npy", "--cache-dir", "{tmp}/file"], "not a directory"),
        (["a red circle", "--out", "{tmp}/x.npy", "--cache-dir", "/proc/chorus-cache"], "cannot create"),
        (["a red circle", "--model", "{tmp}/no-such-model", "--out", "{tmp}/x.npy"], "no-such-model"),
    ],
)
def test_bad_input_exits_2_and_leaves_the_cache_as_it_was(seeded_cache, tmp_path, tiny_wan_dir, capsys, args, message):
    cache = seeded_cache
    before = sorted(p.name for p in (cache / "entries").iterdir())
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "file").write_text("not a directory")
    capsys.readouterr()

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["generate", args[0], "--model", str(tiny_wan_dir), *TINY_ARGS, "-q", "--cache-dir", str(cache), *args[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the model loading's progress bars
    assert last.startswith("chorus generate: error: ") and message in last, err
    assert sorted(p.name for p in (cache / "entries").iterdir()) == before
    assert len(DiskStore(cache)) == 1
    assert not (tmp_path / "x.npy").exists()
    assert not list(tmp_path.glob(".chorus-probe-*")) and not list(cache.glob(".chorus-probe-*"))


def test_a_damaged_cache_index_exits_2_naming_the_cache(tmp_path, tiny_wan_dir, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.sqlite").write_bytes(b"this is not a database" * 100)
    argv = ["generate", "a red circle", "--model", str(tiny_wan_dir), *TINY_ARGS, "-q", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "x.npy")]) == 2
    assert "cannot open the cache" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
