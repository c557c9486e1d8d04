"""The op in the processes and threads that training and serving code runs it in."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import xmsda

from .conftest import make_inputs

# Run in a fresh interpreter: the parent must have started numba's threads itself, as a server that warms up before
# forking its workers would.
FORKED_CHILD = textwrap.dedent(
    """
    import json, multiprocessing as mp, warnings, numba, torch, xmsda
    from xmsda.bench import make_op_inputs, PRESETS

    args = make_op_inputs(PRESETS["tiny"], dtype=torch.float64)
    args[3][0, 0, 0, 0, 0, 0] = float("nan")  # non-finite locations sample nothing, in the kernels and in the reference
    args[3][0, 1, 0, 0, 0, 1] = float("inf")

    def run():
        inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in args]
        out = xmsda.ms_deform_attn(*inputs)
        out.sum().backward()
        return [out.detach()] + [t.grad for t in inputs if t.is_floating_point()]

    expected = run()

    def child(queue):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = run()
        messages = [str(w.message) for w in caught]
        same = all(torch.allclose(a, b) for a, b in zip(results, expected))
        queue.put({"same": same, "warnings": messages})

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=child, args=(queue,))
    process.start()
    process.join(120)
    result = queue.get(timeout=10) if process.exitcode == 0 else {}
    print(json.dumps({"layer": numba.threading_layer(), "exitcode": process.exitcode, **result}))
    """
)


@pytest.mark.slow  # forks a child that compiles
def test_a_process_forked_after_the_kernels_ran_falls_back_to_the_reference():
    # GNU OpenMP cannot run in a forked child (numba would terminate it); the op computes the same result and
    # gradients there through the grid_sample reference, with a warning that says why and how to keep the kernels.
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout)
    assert child["exitcode"] == 0 and child["same"], child
    if child["layer"] == "omp":  # numba's default where GNU OpenMP is installed (TBB and its work queue fork fine)
        assert any("forked" in m and "spawn" in m for m in child["warnings"]), child


def test_concurrent_calls_from_threads_agree():
    inputs = make_inputs(N=2, shapes=((20, 30), (10, 15)), Q=300, M=2, D=32, P=4, dtype=torch.float32)
    expected = xmsda.ms_deform_attn(*inputs)
    results = []
    threads = [threading.Thread(target=lambda: results.append(xmsda.ms_deform_attn(*inputs))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)
