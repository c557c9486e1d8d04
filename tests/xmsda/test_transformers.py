"""The one-line switch for Hugging Face transformers' deformable-attention models."""

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


def run(model, pixels, outputs=("last_hidden_state", "encoder_last_hidden_state"), **inputs):
    """The named outputs and every parameter's gradient of the sum of their squares."""
    model.zero_grad()
    out = model(pixel_values=pixels, **inputs)
    tensors = [out[name] for name in outputs]
    sum(t.square().sum() for t in tensors).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors], grads


def tiny_pixel_decoder_config():
    """Config arguments Mask2Former and OneFormer share: a small ResNet and a two-layer pixel decoder and decoder."""
    from transformers import ResNetConfig

    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return dict(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        hidden_dim=32,
        encoder_layers=2,
        decoder_layers=2,
        num_attention_heads=2,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_queries=5,
    )


def tiny_mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerModel

    torch.manual_seed(0)
    config = Mask2FormerConfig(feature_size=32, mask_feature_size=32, **tiny_pixel_decoder_config())
    return Mask2FormerModel(config).double().eval()


def tiny_oneformer():
    from transformers import OneFormerConfig, OneFormerModel

    torch.manual_seed(0)
    text_encoder = dict(
        text_encoder_width=32,
        text_encoder_num_layers=1,
        text_encoder_context_length=8,
        task_seq_len=8,
        max_seq_len=8,
        text_encoder_vocab_size=50,
        text_encoder_proj_layers=1,
        text_encoder_n_ctx=2,
    )
    config = OneFormerConfig(conv_dim=32, mask_dim=32, **text_encoder, **tiny_pixel_decoder_config())
    return OneFormerModel(config).double().eval()


def assert_switch_keeps_outputs_and_gradients(monkeypatch, model, site, calls_expected, **run_args):
    """`model` gives the same outputs and parameter gradients with the switch on, where the op runs
    `calls_expected` times, and its attention `site` (owner, attribute) is switched, then restored."""
    import xmsda.integrations.transformers as xt

    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outputs, grads = run(model, pixels, **run_args)
    owner, attribute = site
    original = getattr(owner, attribute)
    calls = []
    op = torch.ops.xmsda.ms_deform_attn.default
    try:
        assert owner in xt.enable()
        assert getattr(owner, attribute) is not original and xt.enabled()
        for module in ("transformers", "mmcv_style"):  # the layers' forward, the pixel decoders' function
            monkeypatch.setattr(f"xmsda.integrations.{module}.ms_deform_attn", lambda *a: calls.append(1) or op(*a))
        outputs_x, grads_x = run(model, pixels, **run_args)
    finally:
        xt.disable()
    assert len(calls) == calls_expected
    assert getattr(owner, attribute) is original and not xt.enabled()
    for got, expected in zip(outputs_x, outputs, strict=True):
        torch.testing.assert_close(got, expected)
    assert grads_x.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_x[name], g, msg=name)


def test_switch_gives_the_same_outputs_and_gradients(monkeypatch):
    from transformers.models.deformable_detr import modeling_deformable_detr as mdd

    # one encoder layer, two decoder layers
    site = (mdd.MultiScaleDeformableAttention, "forward")
    assert_switch_keeps_outputs_and_gradients(monkeypatch, tiny_model(), site, 3)


def test_switch_covers_mask2formers_pixel_decoder(monkeypatch):
    from transformers.models.mask2former import modeling_mask2former as m2f

    outputs = ("pixel_decoder_last_hidden_state", "transformer_decoder_last_hidden_state")
    site = (m2f, "multi_scale_deformable_attention")
    assert_switch_keeps_outputs_and_gradients(monkeypatch, tiny_mask2former(), site, 2, outputs=outputs)


def test_switch_covers_oneformers_pixel_decoder(monkeypatch):
    from transformers.models.oneformer import modeling_oneformer as of

    outputs = ("transformer_decoder_object_queries", "transformer_decoder_mask_predictions", "task_token")
    task = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    site = (of, "multi_scale_deformable_attention")
    assert_switch_keeps_outputs_and_gradients(monkeypatch, tiny_oneformer(), site, 2, outputs=outputs, task_inputs=task)


def test_switch_covers_every_model_that_shares_the_attention():
    import xmsda.integrations.transformers as xt

    sites = xt.attention_sites()
    assert len(sites) == len(xt.MODELS)  # this transformers has every model listed
    assert sum(attribute == "forward" for _, attribute in sites) == len(xt.LAYER_MODELS)


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
