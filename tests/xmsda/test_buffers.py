"""The ops' buffer cache (`xmsda.buffers`): freed outputs and gradients are reused, live ones never, stale contents
never reach a result, and the cache keeps no more unused memory than its limit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import xmsda
from xmsda import buffers

from .conftest import make_inputs

# Every output and gradient of these inputs is at least buffers.MIN_BYTES (4 MiB): the forward's [1, 16384, 2*32],
# the value gradient's [1, 20480, 2, 32], the location gradient's [1, 16384, 2, 2, 16, 2] and the attention's.
LARGE = dict(N=1, shapes=((128, 128), (64, 64)), Q=16384, M=2, D=32, P=16, dtype=torch.float32)


@pytest.fixture
def cache():
    """The cache, empty, with its limit restored afterwards."""
    before = buffers.limit()
    buffers.empty()
    yield buffers
    buffers.set_limit(before)
    buffers.empty()


def forward_backward(inputs):
    value, ss, lsi, loc, attn = (t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs)
    out = xmsda.ms_deform_attn(value, ss, lsi, loc, attn)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), value.grad, loc.grad, attn.grad


def test_a_freed_output_is_reused_and_a_live_one_never(cache):
    inputs = make_inputs(**LARGE)
    first = xmsda.ms_deform_attn(*inputs)
    kept = first.clone()
    second = xmsda.ms_deform_attn(*inputs)
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    address = first.data_ptr()
    row = first[0, :1]  # a view keeps the memory in use
    del first
    third = xmsda.ms_deform_attn(*inputs)
    assert third.data_ptr() not in (address, second.data_ptr())
    del row
    assert cache.idle_bytes() >= kept.numel() * kept.element_size()
    fourth = xmsda.ms_deform_attn(*inputs)
    assert fourth.data_ptr() == address and torch.equal(fourth, kept)


def test_stale_contents_of_reused_buffers_never_reach_a_result(cache):
    # The kernels must write every element of their outputs (and the backward must zero the value gradient) since a
    # reused buffer holds whatever it held before: here NaN everywhere.
    inputs = make_inputs(**LARGE, spread=(-0.2, 1.2))  # some points outside the maps: zero gradients written
    cache.set_limit(0)
    expected = forward_backward(inputs)
    cache.set_limit(1 << 30)
    poisoned = forward_backward(inputs)
    addresses = {t.data_ptr() for t in poisoned}
    for t in poisoned:
        t.fill_(float("nan"))
    del poisoned, t
    assert cache.idle_bytes() > 0
    results = forward_backward(inputs)
    assert addresses & {t.data_ptr() for t in results}, "the test must run on reused buffers"
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_the_cache_keeps_at_most_its_limit_of_unused_memory(cache):
    inputs = make_inputs(**LARGE)
    outputs = [xmsda.ms_deform_attn(*inputs) for _ in range(3)]
    one = outputs[0].numel() * outputs[0].element_size()
    cache.set_limit(2 * one)
    del outputs
    assert one <= cache.idle_bytes() <= 2 * one
    cache.set_limit(0)
    assert cache.idle_bytes() == 0
    cache.set_limit(1 << 30)
    xmsda.ms_deform_attn(*inputs)  # its output is freed at once
    assert cache.idle_bytes() > 0
    cache.empty()
    assert cache.idle_bytes() == 0
    with pytest.raises(ValueError, match="limit must be >= 0"):
        cache.set_limit(-1)


def test_small_outputs_stay_with_malloc(cache):
    out = xmsda.ms_deform_attn(*make_inputs(N=2, shapes=((20, 30),), Q=300, M=2, D=32, P=4, dtype=torch.float32))
    del out
    assert cache.idle_bytes() == 0


def test_threads_get_distinct_buffers_and_agree(cache):
    inputs = make_inputs(**LARGE)
    expected = forward_backward(inputs)
    results = []

    def run():
        for _ in range(3):
            results.append(forward_backward(inputs))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    live = [t.data_ptr() for result in results for t in result]
    assert len(set(live)) == len(live)
    for result in results:
        for got, want in zip(result, expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.slow  # subprocesses
def test_the_limit_comes_from_the_environment_and_a_bad_one_is_refused():
    def limit_in_child(setting):
        env = {**os.environ, "XMSDA_BUFFER_CACHE_MB": setting}
        code = "import xmsda; print(xmsda.buffers.limit())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    assert limit_in_child("16").stdout.strip() == str(16 << 20)
    refused = limit_in_child("1.5G")
    assert refused.returncode != 0 and "XMSDA_BUFFER_CACHE_MB must be a whole number of MiB" in refused.stderr
