"""`xmsda bench-model` on the tiny model: both variants timed in both phases, their outputs compared."""

from __future__ import annotations

import json

import pytest

from xmsda.cli import main
from xmsda.integrations import transformers as xt
from xmsda.model_bench import MODEL_PHASES, MODEL_VARIANTS, MODELS, _Variant, build_model, run_model_benchmark


def test_bench_model_times_both_variants_and_compares_their_outputs(tmp_path, capsys):
    report = tmp_path / "model.json"
    argv = ["bench-model", "--model", "tiny", "--image", "64x80", "--batch", "2", "--repeat", "2", "--quiet"]
    assert main([*argv, "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["image"] == [64, 80] and result["batch"] == 2
    assert result["max_output_difference"] < 1e-4  # the switch computes the same model
    for phase in MODEL_PHASES:
        entry = result["phases"][phase]
        assert set(entry) == set(MODEL_VARIANTS)
        for e in entry.values():
            assert len(e["times_s"]) == 2 and e["median_s"] > 0
            assert e["speedup_vs_transformers"] == entry["transformers"]["median_s"] / e["median_s"]
    out = capsys.readouterr().out
    assert "largest difference between the variants' outputs" in out and "vs transformers" in out
    assert result["machine"]["allocator"] in out and not xt.enabled()  # the switch is off again


def test_each_variant_runs_its_own_attention_core_and_trains_the_same_parameters():
    import torch

    pixels = torch.randn(1, 3, 64, 96)
    for core in MODEL_VARIANTS:
        variant = _Variant(MODELS["tiny"], core, pixels)
        variant.grads = tuple(torch.ones_like(o) for o in variant.run("inference"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            variant.run("train_step")
        ops = {e.key for e in prof.key_averages()}
        assert ("xmsda::ms_deform_attn" in ops) == (core == "xmsda")
        assert ("aten::grid_sampler_2d" in ops) == (core == "transformers")
        # the step trains the transformer and the backbone's last three stages, as Deformable DETR does
        trained = {n for n, p in variant.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("encoder.") for n in trained) and any(n.startswith("decoder.") for n in trained)
        backbone = [n for n, _ in variant.model.backbone.named_parameters()]
        assert {n for n in backbone if f"backbone.{n}" in trained} == {
            n for n in backbone if any(f"stages.{s}." in n for s in (1, 2, 3))
        }


def test_the_default_model_is_deformable_detr_with_a_resnet50_backbone():
    model = build_model(MODELS["deformable-detr"])
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (256, 6, 6, 300)
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.layer_type == "bottleneck"
    assert 39e6 < sum(p.numel() for p in model.parameters()) < 41e6  # the paper's 40M parameters
    backbone = dict(model.backbone.named_parameters())
    assert any(p.requires_grad for p in backbone.values()) and not any(
        p.requires_grad for n, p in backbone.items() if "embedder" in n or "stages.0." in n
    )


def test_bench_model_rejects_bad_arguments(capsys):
    assert main(["bench-model", "--model", "tiny", "--phases", "inference,export"]) == 2
    assert "unknown ['export']" in capsys.readouterr().err
    for image in ("800", "800x13a", "16x16"):
        with pytest.raises(SystemExit):
            main(["bench-model", "--image", image])
        assert "--image" in capsys.readouterr().err


def test_bench_model_refuses_to_run_with_the_switch_already_on():
    xt.enable()
    try:
        with pytest.raises(RuntimeError, match="switch is on"):
            run_model_benchmark(MODELS["tiny"], repeat=1, log=None)
    finally:
        xt.disable()
