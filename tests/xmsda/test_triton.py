"""The Triton backend: its kernels under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against the
grid_sample reference and the CPU kernels (values and the three gradients, both backward modes, float64, float32,
float16 and bfloat16), the kernels compiled ahead of time for an H100, and the backend selector. Shapes stay small:
the interpreter runs every program in NumPy. Where CUDA exists (tests/conftest.py then leaves the interpreter off)
the same tests run the compiled kernels on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xmsda
from xmsda import backends
from xmsda.reference import ms_deform_attn_core_pytorch

from .conftest import make_inputs, pixel_centre_locations

# where the Triton backend's tests put their tensors: the CPU in Triton's interpreter, else the GPU
DEVICE = "cpu" if backends.triton._interpreting() else "cuda"


def grads(value, ss, lsi, loc, attn, grad_out, **options):
    """Output and gradients of value, locations and weights of the op (or the reference, without `options`), on the
    CPU; the Triton backend computes them on DEVICE."""
    device = DEVICE if options.get("backend") == "triton" else "cpu"
    ss, lsi = ss.to(device), lsi.to(device)
    inputs = [t.detach().to(device).requires_grad_() for t in (value, loc, attn)]
    if options:
        out = xmsda.ms_deform_attn(inputs[0], ss, lsi, inputs[1], inputs[2], **options)
    else:
        out = ms_deform_attn_core_pytorch(inputs[0], ss, inputs[1], inputs[2])
    out.backward(grad_out.to(device, out.dtype))
    return [t.cpu() for t in (out.detach(), *(t.grad for t in inputs))]


def grad_output(value, loc, seed=1):
    N, _, M, D = value.shape
    return torch.randn(N, loc.shape[1], M * D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_all_close(results, expected, **tol):
    for a, b in zip(results, expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_values_and_gradients_match_the_reference_in_both_modes(dtype):
    # points inside, straddling the border and outside (locations in [-0.2, 1.2]), three levels (one a single pixel),
    # an odd channel count
    inputs = make_inputs(N=1, shapes=((6, 7), (3, 4), (1, 1)), Q=5, M=2, D=5, P=2, dtype=dtype)
    grad_out = grad_output(inputs[0], inputs[3])
    fast = grads(*inputs, grad_out, backend="triton", deterministic=False)
    deterministic = grads(*inputs, grad_out, backend="triton", deterministic=True)
    # half precision is computed in float32: compare with the reference on the same (rounded) inputs in float32
    exact_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exact = [t.to(exact_dtype) if t.is_floating_point() else t for t in inputs]
    expected = grads(*exact, grad_out)
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        for result in (fast, deterministic):
            assert all(t.dtype == dtype for t in result)
            for a, b in zip(result, expected, strict=True):
                torch.testing.assert_close(a.float(), b, atol=8 * eps * b.abs().max().item(), rtol=2 * eps)
    else:
        tol = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
        assert_all_close(fast, expected, **tol)
        assert_all_close(deterministic, expected, **tol)
    # the deterministic mode gives the same bits on every run
    again = grads(*inputs, grad_out, backend="triton", deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(deterministic, again, strict=True))


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck_on_the_border_and_outside(deterministic):
    value, ss, lsi, _, attn = make_inputs(N=1, shapes=((4, 5), (2, 3)), Q=4, M=2, D=3, P=2)
    # x and y on the map's outer edge, just inside, and well outside (no corner inside)
    edge = torch.tensor(
        [[0.0, 0.33], [1.0, 0.61], [0.42, 0.0], [0.77, 1.0], [0.0, 1.0], [1.0, 0.0], [-0.5, 0.5], [0.5, 1.5]]
    )
    loc = edge[torch.arange(4 * 2 * 2 * 2) % len(edge)].view(1, 4, 2, 2, 2, 2).to(torch.float64)
    ss, lsi = ss.to(DEVICE), lsi.to(DEVICE)

    def f(v, lo, a):
        return xmsda.ms_deform_attn(v, ss, lsi, lo, a, backend="triton", deterministic=deterministic)

    # fast mode: a random projection of the Jacobian (the interpreter is too slow for all of it)
    inputs = [t.detach().to(DEVICE).requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_points_on_pixel_centres_and_non_finite_locations():
    # power-of-two maps make (i + 0.5) / W exact: the pixel coordinate is exactly the integer i, where bilinear
    # interpolation has a kink, so the location gradient must take grid_sample's cell there; non-finite locations
    # sample nothing and get zero gradients (the reference, at such points, returns NaN: compared off the map)
    shapes = ((4, 8), (2, 4))
    value, ss, lsi, _, attn = make_inputs(N=1, shapes=shapes, Q=6, M=2, D=5, P=2)
    loc = pixel_centre_locations(shapes, Q=6, M=2, P=2)
    off_map = loc.clone()
    bad = {(0, 0, 0, 0): float("nan"), (1, 1, 1, 1): float("inf"), (2, 0, 1, 0): -float("inf")}
    for (q, m, lvl, p), x in bad.items():
        loc[0, q, m, lvl, p, 0] = x
        off_map[0, q, m, lvl, p] = 3.0
    grad_out = grad_output(value, loc)
    expected = grads(value, ss, lsi, off_map, attn, grad_out)
    for deterministic in (False, True):
        result = grads(value, ss, lsi, loc, attn, grad_out, backend="triton", deterministic=deterministic)
        for q, m, lvl, p in bad:
            assert not result[2][0, q, m, lvl, p].any() and result[3][0, q, m, lvl, p] == 0
            result[2][0, q, m, lvl, p] = expected[2][0, q, m, lvl, p]
        assert_all_close(result, expected)


@pytest.mark.parametrize("deterministic", [False, True])
def test_offsets_op_matches_the_cpu_kernels(deterministic):
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((5, 6), (3, 3)), Q=5, M=2, D=4, P=3, dtype=torch.float32)
    ref = torch.rand(2, 5, 2, 2, generator=torch.Generator().manual_seed(2))
    offsets = (loc - ref[:, :, None, :, None, :]) * 5.0

    def run(device, **options):
        inputs = [t.detach().to(device).requires_grad_() for t in (value, ref, offsets, attn)]
        out = xmsda.ms_deform_attn_offsets(inputs[0], ss.to(device), lsi.to(device), *inputs[1:], **options)
        out.backward(grad_output(value, loc).to(device, torch.float32))
        return [t.cpu() for t in (out.detach(), *(t.grad for t in inputs))]

    result = run(DEVICE, backend="triton", deterministic=deterministic)
    assert_all_close(result, run("cpu", backend="cpu"), atol=1e-5, rtol=1e-5)


def test_wide_heads_and_many_points_match_the_cpu_kernels():
    # 33 channels (a 64-wide tile, mostly masked) and 7 points on one level
    inputs = make_inputs(N=1, shapes=((5, 4),), Q=3, M=1, D=33, P=7, dtype=torch.float32)
    grad_out = grad_output(inputs[0], inputs[3])
    expected = grads(*inputs, grad_out, backend="cpu")
    for deterministic in (False, True):
        assert_all_close(grads(*inputs, grad_out, backend="triton", deterministic=deterministic), expected,
                         atol=1e-5, rtol=1e-5)  # fmt: skip


def _order_sensitive_inputs():
    """One query, one 1-channel head, three points on a 4x4 map whose contributions to the value gradient at pixel
    (1, 1) are +1 (point 0, through its bottom-right corner), 1e8 and -1e8 (points 1 and 2, top-left corners) with a
    unit output gradient. In float32, adding them point by point gives (1 + 1e8) - 1e8 = 0; corner by corner (the
    deterministic mode's order: top-left corners first) (1e8 - 1e8) + 1 = 1."""
    ss = torch.tensor([[4, 4]])
    lsi = torch.tensor([0])
    value = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(0))
    # pixel (0.5, 0.5) for point 0 (its bottom-right corner is (1, 1), weight 1/4), exactly (1, 1) for points 1, 2
    loc = torch.tensor([[0.25, 0.25], [0.375, 0.375], [0.375, 0.375]]).view(1, 1, 1, 1, 3, 2)
    attn = torch.tensor([4.0, 1e8, -1e8]).view(1, 1, 1, 1, 3)
    return value, ss, lsi, loc, attn


def test_deterministic_mode_is_chosen_explicitly_or_by_torch():
    inputs = _order_sensitive_inputs()
    grad_out = torch.ones(1, 1, 1, dtype=torch.float64)

    def value_grad_at_pixel_1_1(**options):
        return grads(*inputs, grad_out, backend="triton", **options)[1][0, 5, 0, 0].item()

    assert value_grad_at_pixel_1_1(deterministic=False) == 0.0  # atomics, in point order
    assert value_grad_at_pixel_1_1(deterministic=True) == 1.0  # buckets, corner by corner
    assert value_grad_at_pixel_1_1() == 0.0  # None: torch's setting, off by default
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert value_grad_at_pixel_1_1() == 1.0
        assert value_grad_at_pixel_1_1(deterministic=False) == 0.0  # an explicit choice wins
    finally:
        torch.use_deterministic_algorithms(before)


def test_deterministic_gradients_do_not_depend_on_how_the_work_is_split(monkeypatch):
    # 32 points of 8 queries piled on a few pixels of one map, in float32: each value-gradient row sums many
    # contributions, so an order that followed the programs (their blocks of queries or rows) would change its bits,
    # as it does the atomic mode's
    inputs = make_inputs(N=1, shapes=((3, 4),), Q=8, M=1, D=4, P=4, dtype=torch.float32, spread=(0.3, 0.7))
    grad_out = grad_output(inputs[0], inputs[3])
    first = grads(*inputs, grad_out, backend="triton", deterministic=True)
    channels = backends.triton.blocks(4)[1]
    for block in (1, 2):
        monkeypatch.setattr(backends.triton, "blocks", lambda _, block=block: (block, channels))
        again = grads(*inputs, grad_out, backend="triton", deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    assert_all_close(first, grads(*inputs, grad_out), atol=1e-5, rtol=1e-5)


def test_backend_none_picks_by_device():
    assert backends.select(None, torch.device("cpu")) is backends.cpu
    assert backends.select(None, torch.device("cuda")) is backends.triton  # Triton is installed here
    with pytest.warns(RuntimeWarning, match="no kernel for meta tensors"):
        assert backends.default_backend(torch.device("meta")) == "reference"


def test_explicit_backends_compute_the_same():
    inputs = make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=4, P=2)
    grad_out = grad_output(inputs[0], inputs[3])
    expected = grads(*inputs, grad_out)
    assert_all_close(grads(*inputs, grad_out, backend="reference"), expected)
    assert_all_close(grads(*inputs, grad_out, backend="cpu"), expected)
    # callers of the registered op choose too
    direct = torch.ops.xmsda.ms_deform_attn(*inputs, backend="reference")
    torch.testing.assert_close(direct, expected[0])


def test_a_backend_that_cannot_take_the_tensors_says_why():
    inputs = make_inputs(N=1, shapes=((4, 4),), Q=2, M=1, D=4, P=1)
    with pytest.raises(ValueError, match="backend 'cpu' cannot take cuda tensors: it runs on CPU tensors"):
        backends.select("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="backend must be None or one of \\['cpu', 'triton', 'reference'\\]"):
        xmsda.ms_deform_attn(*inputs, backend="cuda")


# Arguments of each kernel that are not pointers or compile-time constants: 32-bit integers.
_SIZES = ("Q", "S", "CELLS", "NOT_SAMPLED", "M", "D", "L", "P", "LP", "ROWS")


def _compile_for_h100(kernel, pointers, constants):
    """Compile `kernel` to an sm_90 cubin (no GPU needed): what the JIT would do on an H100."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _SIZES:
            signature[name] = "i32"
        else:
            signature[name] = pointers.get(name, "*i64")  # the level tensors, bounds and order are int64
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def compile_all_for_h100(dtype):
    kernels = backends.triton.kernels()
    assert not backends.triton._interpreting()
    inputs = {name: f"*{dtype}" for name in ("value_ptr", "loc_ptr", "ref_ptr", "attn_ptr", "grad_out_ptr")}
    outputs = {name: "*fp32" for name in ("out_ptr", "grad_value_ptr", "grad_loc_ptr", "grad_attn_ptr", "weights_ptr")}
    pointers = inputs | outputs | {"keys_ptr": "*i32"}
    blocks = {"BLOCK_Q": 64, "BLOCK_D": 32}
    _compile_for_h100(kernels.forward_kernel, pointers, {"HAS_REF": dtype == "bf16", **blocks})
    for atomic in (True, False):
        _compile_for_h100(kernels.backward_kernel, pointers, {"HAS_REF": atomic, "ATOMIC": atomic, **blocks})
    _compile_for_h100(kernels.value_grad_kernel, pointers, {"BLOCK_R": 64, "BLOCK_D": 32})


def refuse_cpu_tensors_without_the_interpreter():
    """In a process that imported triton without the interpreter: the Triton backend refuses CPU tensors, saying how
    to get the interpreter, also when TRITON_INTERPRET=1 comes too late."""
    inputs = make_inputs(N=1, shapes=((4, 4),), Q=2, M=1, D=4, P=1)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot take cpu tensors.*set TRITON_INTERPRET=1 before"):
        xmsda.ms_deform_attn(*inputs, backend="triton")
    os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 was set after triton was imported"):
        xmsda.ms_deform_attn(*inputs, backend="triton")


def in_a_process_without_the_interpreter(code):
    """Run `code` in a fresh Python that imports triton without the interpreter (triton.language is interpreted or
    compiled for a whole process, from its first import on), with this module imported as `t`."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    code = f"import tests.xmsda.test_triton as t; {code}"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_without_the_interpreter_cpu_tensors_are_refused():
    in_a_process_without_the_interpreter("t.refuse_cpu_tensors_without_the_interpreter()")


@pytest.mark.slow
def test_kernels_compile_for_an_h100():
    # the interpreter runs the kernels as Python; the compiler checks what it does not (types, layouts, loops)
    in_a_process_without_the_interpreter("t.compile_all_for_h100('fp32'); t.compile_all_for_h100('bf16')")
