"""Checks that need an NVIDIA GPU: Chorus on the built-in model and on a tiny random pipeline of every family it
serves, on CUDA, and xMSDA's Triton backend. Collected everywhere, run only where `torch.cuda.is_available()` (CI
has no GPU; `scripts/gpu_check.sh` runs them with the benchmarks)."""

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
    monkeypatch.setattr(Planner, "_region", lambda self, difference, unsettled=None: mask.clone())
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

    near = engine(PlannerConfig(late_threshold=None))  # the comparison alone (a random model settles nothing early)
    source = near.generate(FAMILY_PROMPT, seed=3, **SETTINGS[family])
    hit = near.generate(FAMILY_PROMPT + ".", seed=3, **SETTINGS[family])
    assert (hit.report.outcome, hit.report.plan, hit.report.dtype) == ("hit", "c---", "bfloat16")
    np.testing.assert_array_equal(hit.frames, source.frames)
    near.close()

    monkeypatch.setattr(
        Planner, "_region", lambda self, difference, unsettled=None: torch.ones(GRIDS[family], dtype=torch.bool)
    )
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


def _xmsda_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=8, P=3, dtype=torch.float32, spread=(-0.2, 1.2)):
    """Random op inputs on the GPU, points inside, on the border and outside the maps (tests/xmsda's builder)."""
    from tests.xmsda.conftest import make_inputs

    inputs = make_inputs(N=N, shapes=shapes, Q=Q, M=M, D=D, P=P, dtype=dtype, spread=spread)
    return [t.cuda() for t in inputs]


def _xmsda_grads(inputs, grad_out, **options):
    """Output and gradients of value, locations and weights: the op with `options`, or without them the reference."""
    from xmsda import ms_deform_attn
    from xmsda.reference import ms_deform_attn_core_pytorch

    value, ss, lsi, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    if options:
        out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], **options)
    else:
        out = ms_deform_attn_core_pytorch(leaves[0], ss, leaves[1], leaves[2])
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def test_xmsda_cuda_tensors_run_the_triton_kernels_in_both_modes():
    from xmsda import backends

    assert backends.select(None, torch.device("cuda")) is backends.triton
    for dtype, tol in ((torch.float64, {}), (torch.float32, {"atol": 1e-4, "rtol": 1e-4})):
        inputs = _xmsda_inputs(N=2, shapes=((24, 31), (12, 16), (6, 8), (3, 4)), Q=300, M=4, D=32, P=4, dtype=dtype)
        grad_out = torch.randn(2, 300, 128, device="cuda", dtype=dtype)
        expected = _xmsda_grads(inputs, grad_out)
        for deterministic in (False, True):
            result = _xmsda_grads(inputs, grad_out, deterministic=deterministic)
            for a, b in zip(result, expected, strict=True):
                torch.testing.assert_close(a, b, **tol)
    # odd head sizes, many points, one level of one pixel
    inputs = _xmsda_inputs(N=1, shapes=((5, 9), (1, 1)), Q=40, M=3, D=71, P=9, dtype=torch.float64)
    grad_out = torch.randn(1, 40, 213, device="cuda", dtype=torch.float64)
    for a, b in zip(_xmsda_grads(inputs, grad_out, deterministic=True), _xmsda_grads(inputs, grad_out), strict=True):
        torch.testing.assert_close(a, b)


def test_xmsda_deterministic_backward_is_bit_identical_where_atomics_collide():
    # every point of 2000 queries in a 3x3-pixel window: thousands of additions per value-gradient row
    inputs = _xmsda_inputs(N=1, shapes=((32, 32),), Q=2000, M=8, D=32, P=4, spread=(0.45, 0.55))
    grad_out = torch.randn(1, 2000, 256, device="cuda")
    first = _xmsda_grads(inputs, grad_out, deterministic=True)
    for _ in range(10):
        again = _xmsda_grads(inputs, grad_out, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        chosen_by_torch = _xmsda_grads(inputs, grad_out, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(chosen_by_torch, first, strict=True))
    finally:
        torch.use_deterministic_algorithms(before)
    fast = _xmsda_grads(inputs, grad_out, deterministic=False)
    for a, b in zip(fast, first, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_xmsda_half_precision_on_cuda_computes_in_float32():
    for dtype in (torch.float16, torch.bfloat16):
        inputs = _xmsda_inputs(N=2, shapes=((12, 16), (6, 8)), Q=50, M=2, D=16, P=4)
        low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        exact = [t.float() if t.is_floating_point() else t for t in low]
        grad_out = torch.randn(2, 50, 32, device="cuda").to(dtype)
        expected = _xmsda_grads(exact, grad_out.float())
        eps = torch.finfo(dtype).eps
        for deterministic in (False, True):
            result = _xmsda_grads(low, grad_out, deterministic=deterministic)
            assert all(t.dtype == dtype for t in result)
            for a, b in zip(result, expected, strict=True):
                torch.testing.assert_close(a.float(), b, atol=8 * eps * b.abs().max().item(), rtol=2 * eps)


def test_xmsda_offsets_op_and_reference_backend_on_cuda():
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
        ms_deform_attn_offsets(value, shapes, start, ref, offsets, weights, deterministic=True),
        ms_deform_attn_offsets(value, shapes, start, ref, offsets, weights, backend="reference"),
        torch.ops.xmsda.ms_deform_attn_offsets(value, shapes, start, ref, offsets, weights),
    ):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for g, e in zip(torch.autograd.grad(out.sum(), leaves), expected_grads, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_xmsda_reference_backend_refuses_a_deterministic_backward_on_cuda():
    inputs = _xmsda_inputs(N=1, Q=4)
    grad_out = torch.randn(1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="backend 'reference' has no deterministic backward for cuda tensors"):
        _xmsda_grads(inputs, grad_out, backend="reference", deterministic=True)
    _xmsda_grads(inputs, grad_out, backend="reference", deterministic=False)


def test_xmsda_module_compiles_and_trains_on_cuda_under_autocast():
    from xmsda.nn import MSDeformAttn

    torch.manual_seed(0)
    module = MSDeformAttn(d_model=64, n_levels=2, n_heads=2, n_points=4).cuda()
    ss = torch.tensor([[16, 20], [8, 10]], device="cuda")
    lsi = torch.tensor([0, 320], device="cuda")
    query, flat = torch.randn(2, 400, 64, device="cuda"), torch.randn(2, 400, 64, device="cuda")
    ref_points = torch.rand(2, 400, 2, 2, device="cuda")
    eager = module(query, ref_points, flat, ss, lsi)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(query, ref_points, flat, ss, lsi), eager, atol=1e-5, rtol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(query, ref_points, flat, ss, lsi)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
