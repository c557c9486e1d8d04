"""Checks that need an NVIDIA GPU: Chorus on a diffusers Wan pipeline and the built-in model on CUDA, and xMSDA's
CUDA fallback. Collected everywhere, run only where `torch.cuda.is_available()` (CI has no GPU; see README
"Testing on a GPU" for the command and the last recorded run)."""

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


def test_reuse_and_region_stage2_run_on_cuda(tiny_wan_dir):
    """Source on CUDA, then a request that reuses it: its first step compared with the source's, then region steps
    with the source's cached features (here every token differs less than the threshold: all reused), on the GPU."""
    from chorus.cache import MemoryStore, RequestCache
    from chorus.embed import SentenceTransformerEmbedder
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter
    from chorus.planner import Planner, PlannerConfig

    adapter = load_adapter(tiny_wan_dir, device="cuda")
    embedder = SentenceTransformerEmbedder(device="cuda")
    region = PlannerConfig(min_similarity=-1.0, threshold=0.5, max_region=1.0)
    engine = ChorusEngine(adapter, RequestCache(MemoryStore(1 << 30), embedder.dim), embedder, Planner(region))
    kwargs = dict(TINY, num_inference_steps=8, guidance_scale=1.0)
    source = engine.generate("a red circle moving left", seed=1, **kwargs)
    edit = engine.generate("a blue circle moving left", seed=2, **kwargs)
    r = edit.report
    assert source.report.outcome == "miss" and r.outcome == "hit"
    assert r.plan[0] == "c" and set(r.plan[1:]) <= {"r", "-"} and r.mask_fraction is not None
    assert r.flops < 8 * r.flops_full_step and np.isfinite(edit.frames).all()
    repeat = engine.generate("a red circle moving left", seed=1, **kwargs)
    assert repeat.report.transformer_calls == 0
    np.testing.assert_allclose(repeat.frames, source.frames, atol=1e-6)
    engine.close()


def test_builtin_model_serves_and_reuses_on_cuda():
    from chorus.engine import ChorusEngine

    prompt = "a red circle moving left on a white background"
    cpu = ChorusEngine.from_pretrained("builtin", use_cache=False).generate(prompt, seed=3)
    engine = ChorusEngine.from_pretrained("builtin", device="cuda")
    gpu = engine.generate(prompt, seed=3)
    assert gpu.frames.shape == cpu.frames.shape
    assert np.abs(gpu.frames - cpu.frames).mean() < 0.02  # same noise (drawn on the CPU), float rounding apart
    edit = engine.generate("a blue circle moving left on a white background", seed=3)
    assert edit.report.outcome == "hit" and edit.report.difference == "local" and edit.report.plan == "crrr"
    engine.close()


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
