"""The one-line switch for Hugging Face transformers' Deformable DETR."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_model():
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=12,
        num_feature_levels=4,
        encoder_n_points=3,
        decoder_n_points=2,
    )
    return DeformableDetrModel(config).double().eval()


def run(model, pixels):
    model.zero_grad()
    out = model(pixel_values=pixels)
    loss = out.last_hidden_state.square().sum() + out.encoder_last_hidden_state.square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.last_hidden_state.detach(), out.encoder_last_hidden_state.detach(), grads


def test_switch_gives_the_same_outputs_and_gradients(monkeypatch):
    from transformers.models.deformable_detr import modeling_deformable_detr as mdd

    import xmsda.integrations.transformers as xt

    model = tiny_model()
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dec, enc, grads = run(model, pixels)

    calls = []
    op = torch.ops.xmsda.ms_deform_attn.default
    try:
        switched = xt.enable()
        assert mdd.MultiScaleDeformableAttention in switched
        monkeypatch.setattr("xmsda.integrations.transformers.ms_deform_attn", lambda *a: calls.append(1) or op(*a))
        dec_x, enc_x, grads_x = run(model, pixels)
    finally:
        xt.disable()
    assert len(calls) == 3  # one encoder layer, two decoder layers
    assert mdd.MultiScaleDeformableAttention.forward is not xt._xmsda_forward
    torch.testing.assert_close(dec_x, dec)
    torch.testing.assert_close(enc_x, enc)
    assert grads_x.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_x[name], g, msg=name)


def test_switch_works_under_cpu_autocast():
    import xmsda.integrations.transformers as xt

    model = tiny_model().float()
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixels)
        out.last_hidden_state.float().square().sum().backward()
        return out.last_hidden_state.float().detach(), model.encoder.layers[0].self_attn.sampling_offsets.weight.grad

    expected, _ = run()
    xt.enable()
    try:
        out, grad = run()
    finally:
        xt.disable()
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)  # bfloat16 projections either way
    assert grad is not None and torch.isfinite(grad).all()
