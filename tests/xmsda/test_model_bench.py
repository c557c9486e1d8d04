"""`xmsda bench-model` on the tiny models: every variant timed in both phases, their outputs compared."""

from __future__ import annotations

import json

import pytest

from xmsda.bench import FREE_CORE
from xmsda.cli import main
from xmsda.integrations import transformers as xt
from xmsda.model_bench import MODEL_PHASES, MODEL_VARIANTS, MODELS, _Variant, build_model, run_model_benchmark

from .conftest import assert_ratios_point_the_right_way


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
        assert_ratios_point_the_right_way(entry, "transformers", "speedup_vs_transformers")
    out = capsys.readouterr().out
    assert "largest difference between the variants' outputs" in out and "vs transformers" in out
    assert result["machine"]["allocator"] in out and not xt.enabled()  # the switch is off again


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("tiny-mask2former", "tiny-rt-detr", "tiny-grounding-dino")),
    ],
)
def test_each_variant_runs_its_own_attention_core_and_trains_the_same_parameters(name):
    import torch

    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    trained_sets = []
    for core in MODEL_VARIANTS:
        variant = _Variant(MODELS[name], core, pixels)
        variant.grads = tuple(torch.ones_like(o) for o in variant.run("inference"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            variant.run("train_step")
        ops = {e.key for e in prof.key_averages()}
        assert ("xmsda::ms_deform_attn" in ops) == (core == "xmsda")
        assert ("aten::grid_sampler_2d" in ops) == (core == "transformers")
        trained_sets.append(
            {n for n, p in variant.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        )
        trained = trained_sets[-1]
        # Which backbone parameters the step reaches (a gradient, even if zero): with random weights some of a tiny
        # backbone's ReLUs are off for a given image, and the parameters behind them get exact zeros.
        reached = {n for n, p in variant.model.named_parameters() if p.grad is not None}
        prefix = "pixel_level_module.encoder." if name == "tiny-mask2former" else "backbone."
        backbone = [n for n, _ in variant.model.named_parameters() if n.startswith(prefix)]
        reached_backbone = {n for n in backbone if n in reached}
        if name == "tiny":  # Deformable DETR trains the backbone's last three stages
            assert any(n.startswith("encoder.") for n in trained) and any(n.startswith("decoder.") for n in trained)
            assert reached_backbone == {n for n in backbone if any(f"stages.{s}." in n for s in (1, 2, 3))}
        else:  # Mask2Former, RT-DETR and Grounding DINO the whole backbone
            assert backbone and reached_backbone == set(backbone)
        if core != FREE_CORE:  # whose zero gradients stop at the attention's input layers
            assert any("attn.value_proj." in n for n in trained)
    assert trained_sets[0] == trained_sets[1]  # xmsda trains the same parameters as transformers


@pytest.mark.slow  # full-size model
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


@pytest.mark.slow  # full-size model
def test_the_mask2former_model_is_the_papers_resnet50_one():
    model = build_model(MODELS["mask2former"])
    config = model.config
    assert (config.feature_size, config.encoder_layers, config.num_queries) == (256, 6, 100)
    assert len(model.transformer_module.decoder.layers) == 9  # transformers counts 10
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.layer_type == "bottleneck"
    assert 43e6 < sum(p.numel() for p in model.parameters()) < 45e6  # the paper's 44M parameters
    attention = model.pixel_level_module.decoder.encoder.layers[0].self_attn
    assert (attention.n_levels, attention.n_heads, attention.n_points) == (3, 8, 4)


@pytest.mark.slow  # full-size model
def test_the_rt_detr_model_is_the_papers_resnet50_one():
    model = build_model(MODELS["rt-detr"])
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (256, 1, 6, 300)
    assert config.backbone_config.model_type == "rt_detr_resnet" and config.backbone_config.depths == [3, 4, 6, 3]
    assert 41e6 < sum(p.numel() for p in model.parameters()) < 43e6  # the paper's 42M parameters
    attention = model.decoder.layers[0].encoder_attn
    assert (attention.n_levels, attention.n_heads, attention.n_points) == (3, 8, 4)


@pytest.mark.slow  # full-size model
def test_the_grounding_dino_model_is_the_papers_swin_t_one():
    model = build_model(MODELS["grounding-dino"])
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (256, 6, 6, 900)
    assert config.backbone_config.model_type == "swin" and list(config.backbone_config.depths) == [2, 2, 6, 2]
    assert config.text_config.num_hidden_layers == 12 and config.text_config.hidden_size == 768  # BERT-base
    assert 171e6 < sum(p.numel() for p in model.parameters()) < 173e6  # 172M with BERT-base


def test_bench_model_rejects_bad_arguments(capsys):
    assert main(["bench-model", "--model", "tiny", "--phases", "inference,export"]) == 2
    assert "unknown ['export']" in capsys.readouterr().err
    # RT-DETR picks its 300 queries from the positions of three levels: 64x64 has 64 + 16 + 4 (refused before the
    # model is built)
    assert main(["bench-model", "--model", "rt-detr", "--image", "64x64"]) == 2
    assert "gives rt-detr 84 positions to pick its 300 queries from" in capsys.readouterr().err
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
