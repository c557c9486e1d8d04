"""`--device`, `--dtype` and `--threads`: the rules, the refusals, and the dtype in the cache signature."""

from __future__ import annotations

import json

import pytest
import torch

from chorus.cli import main
from chorus.engine import ChorusEngine
from chorus.models import load_adapter
from chorus.models.device import DeviceError, default_threads, resolve_device, resolve_dtype, set_threads

PROMPT = "a red circle moving left on a white background"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_device_rules(no_cuda, monkeypatch):
    assert resolve_device(None) == torch.device("cpu") == resolve_device("auto") == resolve_device("cpu")
    for bad in ("tpu", "gpu", "cuda:x", "mps"):
        with pytest.raises(DeviceError, match=f"--device {bad}: expected cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="--device cuda:1: CUDA is not available here"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        resolve_device("cuda:1")


def test_dtype_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32  # a diffusers pipeline on the CPU
    assert resolve_dtype(None, cuda) == torch.bfloat16  # ... on a GPU
    assert resolve_dtype(None, cuda, diffusers=False) == torch.float32  # the built-in model
    assert resolve_dtype(None, cuda, card="float16") == torch.float16  # the card's word first
    assert resolve_dtype("bf16", cpu, card="float16") == torch.bfloat16  # the user's before the card's
    with pytest.raises(DeviceError, match="--dtype int8: expected one of float32, bfloat16, float16"):
        resolve_dtype("int8", cpu)


def test_threads_default_to_one_for_the_builtin_model_on_a_cpu(keep_threads):
    assert default_threads("builtin", torch.device("cpu")) == 1
    assert default_threads("/models/wan", torch.device("cpu")) == 0  # torch's own choice
    assert set_threads(None, "builtin", torch.device("cpu")) == 1
    assert set_threads(2, "builtin", torch.device("cpu")) == 2
    with pytest.raises(DeviceError, match="--threads -1"):
        set_threads(-1, "builtin", torch.device("cpu"))


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_device_cuda_without_cuda_exits_2_before_loading(no_cuda, tmp_path, capsys, command):
    args = {
        "generate": ["generate", PROMPT, "--out", str(tmp_path / "x.npy"), "--cache-dir", str(tmp_path / "c")],
        "serve": ["serve", "--data-dir", str(tmp_path / "server"), "--port", "0"],
        "bench": ["bench", "--limit", "1", "--report", str(tmp_path / "r.json")],
    }[command]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"chorus {command}: error: --device cuda: CUDA is not available here" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "c").exists() and not (tmp_path / "r.json").exists()


def test_bad_dtype_and_threads_exit_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.npy"), "--no-cache"]
    assert main(["generate", PROMPT, *out, "--dtype", "double"]) == 2
    assert "--dtype double: expected one of float32, bfloat16, float16" in capsys.readouterr().err
    assert main(["generate", PROMPT, *out, "--threads", "-2"]) == 2
    assert "--threads -2: must be >= 0" in capsys.readouterr().err


def test_bfloat16_runs_on_the_cpu_and_a_float32_request_never_reuses_its_entry(tmp_path, capsys, keep_threads):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--json", "-q", "--seed", "3"]

    def generate(*extra) -> dict:
        assert main(["generate", PROMPT, "--out", str(tmp_path / "x.npy"), *cache, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    bf16 = generate("--dtype", "bfloat16")
    assert (bf16["outcome"], bf16["dtype"], bf16["device"], bf16["family"]) == ("miss", "bfloat16", "cpu", "builtin")
    assert torch.get_num_threads() == 1  # the built-in model's default
    assert generate("--dtype", "bfloat16")["outcome"] == "exact"  # same dtype: the entry serves
    fp32 = generate()  # the built-in model's default dtype: float32
    assert fp32["dtype"] == "float32" and fp32["outcome"] == "miss" and fp32["transformer_calls"] == 4
    assert fp32["signature_key"] != bf16["signature_key"]
    assert generate("--dtype", "float32")["outcome"] == "exact"


def test_signature_has_family_and_dtype_but_not_the_device(tiny_wan_dir):
    adapter = load_adapter(tiny_wan_dir, device="cpu")
    identity = adapter.identity()
    assert identity["family"] == "wan2.1" and identity["dtype"] == "float32" and "device" not in identity
    engine = ChorusEngine(adapter)
    req = engine.generate("a red circle", num_inference_steps=1, height=16, width=16, num_frames=1, guidance_scale=1)
    assert (req.report.family, req.report.dtype, req.report.device, req.report.model) == (
        "wan2.1",
        "float32",
        "cpu",
        str(tiny_wan_dir),
    )
    engine.close()
    bf16 = load_adapter(tiny_wan_dir, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.identity()["dtype"] == "bfloat16"
    assert {k: v for k, v in bf16.identity().items() if k != "dtype"} == {
        k: v for k, v in identity.items() if k != "dtype"
    }
