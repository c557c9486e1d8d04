"""Checks that need an NVIDIA GPU: Chorus on the built-in model and on a tiny random pipeline of every family it
serves, on CUDA, and xMSDA's CUDA fallback. Collected everywhere, run only where `torch.cuda.is_available()` (CI has
no GPU; `scripts/gpu_check.sh` runs them with a benchmark)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = {"height": 16, "width": 16, "num_frames": 5}


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from tests.chorus.conftest import build_tiny_wan_pipeline

    path = tmp_path_factory.mktemp("tiny-wan-cuda")
    build_tiny_wan_pipeline().save_pretrained(path)
    return path


def test_caching_off_reproduces_wan_pipeline_on_cuda(tiny_wan_dir):
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter
    from tests.chorus.conftest import CFG_REQUEST, wan_pipeline_frames

    expected = wan_pipeline_frames(tiny_wan_dir, device="cuda")
    result = ChorusEngine(load_adapter(tiny_wan_dir, device="cuda")).generate(**CFG_REQUEST)
    assert np.abs(result.frames - expected).max() <= 1e-4


def test_reuse_and_region_stage2_run_on_cuda(tiny_wan_dir, monkeypatch):
    """Source on CUDA, then a request that reuses it: its first step compared with the source's, then region steps
    (the left half of the token grid, chosen here: a random model's predictions carry no meaning) with the source's
    cached features, on the GPU."""
    from chorus.cache import MemoryStore, RequestCache
    from chorus.embed import SentenceTransformerEmbedder
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter
    from chorus.planner import Planner, PlannerConfig

    mask = torch.zeros(2, 2, 2, dtype=torch.bool)  # 32x32, 5 frames: a 2x2x2 token grid
    mask[:, :, 0] = True
    monkeypatch.setattr(Planner, "_region", lambda self, difference: mask.clone())
    adapter = load_adapter(tiny_wan_dir, device="cuda")
    embedder = SentenceTransformerEmbedder(device="cuda")
    region = PlannerConfig(min_similarity=-1.0)
    engine = ChorusEngine(adapter, RequestCache(MemoryStore(1 << 30), embedder.dim), embedder, Planner(region))
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=1.0)
    source = engine.generate("a red circle moving left", seed=1, **kwargs)
    edit = engine.generate("a blue circle moving left", seed=2, **kwargs)
    r = edit.report
    assert source.report.outcome == "miss" and r.outcome == "hit"
    assert r.plan == "c" + "r" * 7 and r.mask_fraction == 0.5 and engine.hooks.stagings == 7
    assert r.flops < 8 * r.flops_full_step and np.isfinite(edit.frames).all()
    repeat = engine.generate("a red circle moving left", seed=1, **kwargs)
    assert repeat.report.transformer_calls == 0
    np.testing.assert_allclose(repeat.frames, source.frames, atol=1e-6)
    engine.close()


def test_builtin_model_serves_and_reuses_on_cuda():
    from chorus.engine import ChorusEngine

    prompt = "a red circle moving left on a white background"
    cpu = ChorusEngine.from_pretrained("builtin", use_cache=False, device="cpu").generate(prompt, seed=3)
    engine = ChorusEngine.from_pretrained("builtin")  # cuda when available, the card's float32
    assert str(engine.adapter.device) == "cuda" and engine.adapter.dtype == torch.float32
    gpu = engine.generate(prompt, seed=3)
    assert gpu.frames.shape == cpu.frames.shape and gpu.report.device == "cuda"
    assert np.abs(gpu.frames - cpu.frames).mean() < 0.02  # same noise (drawn on the CPU), float rounding apart
    edit = engine.generate("a blue circle moving left on a white background", seed=3)
    assert edit.report.outcome == "hit" and edit.report.difference == "local" and edit.report.plan == "crrr"
    assert engine.hooks.stagings == 3  # the source's features fetched once per region step, not per layer
    engine.close()


# ---- Chorus: every family on a tiny random pipeline (tests/chorus/families.py) ------------------------------------

FAMILY_PROMPT, FAMILY_EDIT = "a red circle moving left", "a blue circle moving left"


def _families():
    from tests.chorus.families import BUILDERS

    return list(BUILDERS)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from tests.chorus.families import BUILDERS

    dirs = {}

    def get(family: str):
        if family not in dirs:
            dirs[family] = tmp_path_factory.mktemp(f"{family}-cuda")
            BUILDERS[family]().save_pretrained(dirs[family])
        return dirs[family]

    return get


@pytest.mark.parametrize("family", _families())
def test_family_with_caching_off_reproduces_its_pipeline_on_cuda(family, family_dir):
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter
    from tests.chorus.families import SETTINGS, pipeline_frames

    path = family_dir(family)
    expected = pipeline_frames(path, family, FAMILY_PROMPT, 7, device="cuda", negative_prompt="blurry")
    engine = ChorusEngine(load_adapter(path, device="cuda", dtype="float32"))
    result = engine.generate(FAMILY_PROMPT, seed=7, negative_prompt="blurry", **SETTINGS[family])
    assert (result.report.family, result.report.device, result.report.dtype) == (family, "cuda", "float32")
    assert np.abs(result.frames - expected).max() <= 1e-4
    engine.close()


@pytest.mark.parametrize("family", _families())
def test_family_reuses_on_cuda_in_bfloat16(family, family_dir, monkeypatch):
    """The GPU default for a diffusers pipeline (bfloat16): a near-duplicate is a hit; an edit runs region steps
    with the source's features (page-locked, fetched once per step and branch), or reports their fallback."""
    from chorus.cache import MemoryStore, RequestCache
    from chorus.embed import SentenceTransformerEmbedder
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter
    from chorus.planner import Planner, PlannerConfig
    from tests.chorus.families import GRIDS, SETTINGS

    adapter = load_adapter(family_dir(family), device="cuda")
    assert adapter.dtype == torch.bfloat16
    embedder = SentenceTransformerEmbedder(device="cuda")

    def engine(config):
        return ChorusEngine(adapter, RequestCache(MemoryStore(1 << 30), embedder.dim), embedder, Planner(config))

    near = engine(PlannerConfig())
    source = near.generate(FAMILY_PROMPT, seed=3, **SETTINGS[family])
    hit = near.generate(FAMILY_PROMPT + ".", seed=3, **SETTINGS[family])
    assert (hit.report.outcome, hit.report.plan, hit.report.dtype) == ("hit", "c---", "bfloat16")
    np.testing.assert_array_equal(hit.frames, source.frames)
    near.close()

    monkeypatch.setattr(Planner, "_region", lambda self, difference: torch.ones(GRIDS[family], dtype=torch.bool))
    region = engine(PlannerConfig(min_similarity=-1.0, max_region=1.0, alpha=1.0))
    region.generate(FAMILY_PROMPT, seed=1, **SETTINGS[family])
    edit = region.generate(FAMILY_EDIT, seed=2, **SETTINGS[family])
    full = region.generate(FAMILY_EDIT, seed=2, cache_policy="off", **SETTINGS[family])
    r = edit.report
    if region.hooks is None:  # joint attention: region steps computed in full, and said so
        assert r.plan == "cccc" and "computed in full" in r.stage2_fallback
        np.testing.assert_array_equal(edit.frames, full.frames)
    else:
        assert r.plan == "crrr" and region.hooks.stagings == 3 * 2
        assert np.abs(edit.frames - full.frames).mean() < 0.02  # the same computation, bfloat16 rounding apart
    region.close()


def test_generate_on_cuda_from_the_command_line(family_dir, tmp_path, capsys):
    import json

    from chorus.cli import main

    path = family_dir("wan2.2-a14b")
    args = ["generate", FAMILY_PROMPT, "--model", str(path), "--device", "cuda", "--steps", "4", "--frames", "5"]
    args += ["--height", "64", "--width", "64", "--cache-dir", str(tmp_path / "cache"), "--json", "-q"]
    assert main([*args, "--out", str(tmp_path / "a.npy")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["device"], report["dtype"], report["experts"]) == ("cuda", "bfloat16", [0, 1, 1, 1])
    assert main([*args, "--out", str(tmp_path / "b.npy"), "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "miss"  # a bfloat16 entry never serves float32


def test_xmsda_cuda_tensors_use_the_reference_with_a_warning():
    import xmsda
    from xmsda import ops
    from xmsda.reference import ms_deform_attn_core_pytorch

    torch.manual_seed(0)
    shapes = torch.tensor([[6, 7], [3, 4]], device="cuda")
    start = torch.tensor([0, 42], device="cuda")
    value = torch.randn(2, 54, 2, 8, device="cuda", requires_grad=True)
    loc = torch.rand(2, 5, 2, 2, 3, 2, device="cuda", requires_grad=True)
    weights = torch.rand(2, 5, 2, 2, 3, device="cuda").softmax(-1).requires_grad_()
    ops._warned_device = False
    with pytest.warns(RuntimeWarning, match="no kernel for cuda"):
        out = xmsda.ms_deform_attn(value, shapes, start, loc, weights)
    expected = ms_deform_attn_core_pytorch(value, shapes, loc, weights)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (value, loc, weights))
    expected_grads = torch.autograd.grad(expected.sum(), (value, loc, weights))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    # callers of the registered op itself (torch.compile graphs, torch.ops users) get the same
    direct = torch.ops.xmsda.ms_deform_attn(value, shapes, start, loc, weights)
    torch.testing.assert_close(direct, expected)
    direct_grads = torch.autograd.grad(direct.sum(), (value, loc, weights))
    for g, e in zip(direct_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_xmsda_offsets_op_on_cuda_uses_the_reference():
    from xmsda.ops import locations_from_offsets, ms_deform_attn_offsets
    from xmsda.reference import ms_deform_attn_core_pytorch

    torch.manual_seed(0)
    shapes = torch.tensor([[6, 7], [3, 4]], device="cuda")
    start = torch.tensor([0, 42], device="cuda")
    value = torch.randn(2, 54, 2, 8, device="cuda", requires_grad=True)
    ref = torch.rand(2, 5, 2, 2, device="cuda", requires_grad=True)
    offsets = torch.randn(2, 5, 2, 2, 3, 2, device="cuda", requires_grad=True)
    weights = torch.rand(2, 5, 2, 2, 3, device="cuda").softmax(-1).requires_grad_()
    leaves = (value, ref, offsets, weights)
    expected = ms_deform_attn_core_pytorch(value, shapes, locations_from_offsets(ref, offsets, shapes), weights)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for out in (
        ms_deform_attn_offsets(value, shapes, start, ref, offsets, weights),
        torch.ops.xmsda.ms_deform_attn_offsets(value, shapes, start, ref, offsets, weights),
    ):
        torch.testing.assert_close(out, expected)
        for g, e in zip(torch.autograd.grad(out.sum(), leaves), expected_grads, strict=True):
            torch.testing.assert_close(g, e)
