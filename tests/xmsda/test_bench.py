"""`xmsda bench` on the tiny preset: every variant and phase timed, ratios, the free-core row, memory probes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from xmsda import bench, buffers
from xmsda.cli import main

from .conftest import assert_ratios_point_the_right_way


def test_bench_cli_reports_every_variant_phase_and_the_free_core(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeat", "2", "--no-memory", "--quiet", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["preset"]["name"] == "tiny" and result["threads"] >= 1
    for phase in bench.PHASES:
        entry = result["phases"][phase]
        extra = {bench.FREE_CORE, bench.UNFUSED} if phase in bench.MODULE_PHASES else set()
        expected = set(bench.DEFAULT_VARIANTS) | extra
        assert set(entry) == expected
        for e in entry.values():
            assert len(e["times_s"]) == 2 and e["median_s"] > 0
        assert_ratios_point_the_right_way(entry, "grid_sample", "speedup_vs_grid_sample")
    assert set(result["profile"]["op_pieces_s"]) >= {"  forward kernel", "  backward kernel"}
    assert result["profile"]["train_step_top_ops"]
    out = capsys.readouterr().out
    assert "free-core" in out and "xmsda-unfused" in out and "vs grid_sample" in out and "GFLOP/s" in out
    assert result["machine"]["allocator"] in out and result["machine"]["tensor_pages"] in out
    assert result["machine"]["buffer_cache_limit_bytes"] == buffers.limit()
    assert f"xmsda buffer cache up to {buffers.limit() >> 20} MiB" in out
    assert (bench.GLIBC_NOTE in out) == bench.faults_every_call(result["machine"])


@pytest.mark.slow  # compiles the generic kernel
def test_bench_head_dim_keeps_the_channels_and_times_the_generic_forward_kernel(tmp_path, capsys):
    # tiny has 2 heads of 16 channels; 32-channel heads: one of SPECIALISED_CHANNELS, so the generic kernel differs
    report = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--head-dim", "32", "--phases", "forward", "--variants", "xmsda,grid_sample"]
    assert main([*argv, "--repeat", "1", "--quiet", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert (result["preset"]["heads"], result["preset"]["head_dim"]) == (1, 32)
    assert result["phases"]["forward"]["xmsda"]["peak_bytes"] is not None  # the memory child takes the head size too
    assert result["profile"]["op_pieces_s"]["  forward kernel, generic head size"] > 0
    assert main(["bench", "--preset", "tiny", "--head-dim", "5"]) == 2
    assert "--head-dim 5 must divide the preset's 32 channels" in capsys.readouterr().err


def test_bench_times_the_reference_under_torch_compile_on_request(capsys):
    # The inductor variant compiles the reference and computes its function. Forward only, and inductor told to emit
    # scalar C++: its compiler then takes ~12 s here instead of ~27 s (the vectorised training graph would add more),
    # and the variant hands every phase and every setting to torch.compile the same way.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    inputs = bench.make_op_inputs(bench.PRESETS["tiny"])
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        with torch.no_grad():
            compiled, eager = (bench.VARIANTS[name](*inputs) for name in ("inductor", "grid_sample"))
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        # it is timed only when asked for, and the report says what it is (forward: the graph compiled above)
        assert "inductor" not in bench.DEFAULT_VARIANTS
        argv = ["bench", "--preset", "tiny", "--variants", "grid_sample,inductor", "--phases", "forward"]
        assert main([*argv, "--repeat", "1", "--no-memory", "--no-profile", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "forward        inductor" in out and "grid_sample reference compiled with torch.compile" in out


def test_bench_cli_rejects_unknown_variants(capsys):
    assert main(["bench", "--preset", "tiny", "--variants", "xmsda,cuda"]) == 2
    assert "unknown ['cuda']" in capsys.readouterr().err


def test_free_core_passes_zero_gradients_to_the_linear_layers():
    step = bench._free_core_runner(bench.PRESETS["tiny"], "train_step", torch.float32)
    step()
    module = step.module
    # The core's zero gradients still reach every projection, so their weight-gradient matmuls run.
    for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj"):
        assert getattr(module, name).weight.grad is not None


def test_train_step_computes_the_gradients_of_the_inputs_too():
    for preset in ("tiny", "detr-decoder"):  # encoder-like (query is the flattened maps) and decoder-like
        step = bench._phase_runner(bench.PRESETS[preset], "xmsda", "train_step", torch.float32)
        step()
        assert len(step.inputs) == (1 if preset == "tiny" else 2)  # the decoder's query is an input of its own
        assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in step.inputs)


@pytest.mark.slow  # subprocesses
def test_memory_probe_measures_a_phase_in_a_subprocess():
    # 16 heads of 256 channels on tiny's 120 queries: a 1.9 MiB output. The reference holds each level's sampled
    # values, [N*M, D, Q, P] (twice the output), for both levels at once before it sums them; the op holds its output.
    preset = dataclasses.replace(bench.PRESETS["tiny"], heads=16, head_dim=256)
    output_bytes = preset.num_queries * 16 * 256 * 4
    reference = bench.measure_memory(preset, "grid_sample", "forward", torch.float32, threads=1)
    op = bench.measure_memory(preset, "xmsda", "forward", torch.float32, threads=1)
    assert reference >= 4 * output_bytes
    assert op < reference / 4


@pytest.mark.slow  # subprocesses
def test_bench_names_the_memory_allocator(tmp_path):
    # glibc's malloc, with the settings that change it: a real process with a real environment
    probe = [sys.executable, "-c", "from xmsda.bench import memory_allocator; print(memory_allocator())"]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == (
        "glibc malloc (default settings)"
    )
    tuned = subprocess.run(probe, env=env | {"MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True, check=True)
    assert tuned.stdout.strip() == "glibc malloc (MALLOC_ARENA_MAX=2)"
    # a preloaded allocator is found among the mapped libraries (lines as /proc/<pid>/maps writes them)
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00a0000000-7f00a0021000 r-xp 00000000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
        "7f00b0000000-7f00b0200000 r-xp 00000000 fd:01 5678 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
    )
    assert bench.memory_allocator(str(maps)) == "tcmalloc (libtcmalloc_minimal.so.4.5.10)"


def test_bench_says_whether_torch_tensors_get_huge_pages(tmp_path, monkeypatch):
    thp = tmp_path / "enabled"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for mode, flag, huge in [
        ("madvise", None, False),
        ("madvise", "1", True),
        ("madvise", "true", False),  # torch reads only "0" and "1"
        ("always", None, True),
        ("never", "1", False),
    ]:
        thp.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")) + "\n")
        if flag is None:
            monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
        else:
            monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", flag)
        on, text = bench.tensor_pages(str(thp))
        assert on == huge, (mode, flag)
        assert text == (
            f"torch tensors on {'huge' if huge else '4 KiB'} pages "
            f"(kernel THP {mode}, THP_MEM_ALLOC_ENABLE={'unset' if flag is None else flag})"
        )
    missing = bench.tensor_pages(str(tmp_path / "missing"))[1]
    assert missing.startswith("torch tensors on 4 KiB pages (kernel THP unavailable")


def test_the_page_fault_hint_names_only_setups_that_fault_every_call():
    def faults(allocator, huge=False):
        return bench.faults_every_call({"allocator": allocator, "tensors_on_huge_pages": huge})

    assert faults("glibc malloc (default settings)")
    assert faults("glibc malloc (MALLOC_ARENA_MAX=2)")  # a setting that leaves the mmap threshold alone
    assert not faults("glibc malloc (default settings)", huge=True)
    assert not faults("glibc malloc (MALLOC_MMAP_THRESHOLD_=1000000000)")
    assert not faults("glibc malloc (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1000000000)")
    assert not faults("tcmalloc (libtcmalloc_minimal.so.4.5.10)")
