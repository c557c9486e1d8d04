"""`xmsda bench-model`: a whole Hugging Face model, with transformers' own attention and with the switch.

`xmsda bench` times the op and one `MSDeformAttn` module; users meet them inside a model, next to a backbone,
feed-forward layers and a decoder that the op does not touch. This benchmark runs a transformers model (randomly
initialised from its config: nothing is downloaded) on one image size, in one process and interleaved, with the
deformable attention as transformers computes it (its grid_sample formulation, the same as `xmsda.reference`), with
`xmsda.integrations.transformers.enable()`, and with an attention core that costs nothing (`free-core`, as in
`xmsda bench`: zeros forward, zero gradients back, so every layer around it still runs): the time no attention
kernel can remove, the highest ratio any kernel could reach. The models (`MODELS`):

  deformable-detr  `DeformableDetrModel` as in the paper (ResNet-50; attention in its encoder and decoder)
  mask2former      `Mask2FormerModel` as in the paper with ResNet-50 (attention in its pixel decoder)
  rt-detr          `RTDetrModel` as in the paper with ResNet-50-vd (attention in its decoder only)
  grounding-dino   `GroundingDinoModel`: Grounding DINO-T (Swin-T, BERT-base), with a 12-token prompt
  tiny-*           small ones of each, for smoke tests

Phases:

  inference   the model's forward under `torch.no_grad`, in eval mode
  train_step  forward with autograd, backward from fixed gradients of two of the model's outputs to the parameters
              (the backbone's trainable ones as each paper trains them), and an SGD step; in eval mode, so that
              dropout does not differ between the variants

Both variants start from the same weights and the same image, and the report gives the largest difference between
their outputs next to their times, so a run that times a broken switch says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
from collections.abc import Callable

import torch

from .harness import FREE_CORE, FreeCore, interleaved_times, memory_setup, set_threads

__all__ = ["MODELS", "MODEL_PHASES", "format_model_report", "run_model_benchmark"]

MODEL_PHASES = ("inference", "train_step")
MODEL_VARIANTS = ("xmsda", "transformers", FREE_CORE)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    image: tuple[int, int]  # default (H, W)
    family: str = "deformable-detr"  # a key of FAMILIES
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6  # in transformers' count (Mask2Former's runs one fewer)
    heads: int = 8
    encoder_ffn: int = 1024
    decoder_ffn: int = 1024
    queries: int = 300
    backbone: str = "resnet"  # a ResNet of the three fields below, or "swin-t" (transformers' Swin-T)
    backbone_widths: tuple[int, ...] = (256, 512, 1024, 2048)
    backbone_depths: tuple[int, ...] = (3, 4, 6, 3)
    backbone_stem: int = 64
    text_layers: int = 12  # Grounding DINO's BERT text encoder (BERT-base by default)
    text_width: int = 768


_TINY = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    heads=2,
    encoder_ffn=32,
    decoder_ffn=32,
    queries=12,
    backbone_widths=(8, 16, 16, 16),
    backbone_depths=(1, 1, 1, 1),
    backbone_stem=8,
    text_layers=1,
    text_width=32,
)

MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            "deformable-detr",
            "Deformable DETR as in the paper: ResNet-50 backbone, 4 levels, 6+6 layers of 256 channels, 300 queries",
            (800, 1333),
        ),
        ModelSpec(
            "mask2former",
            "Mask2Former as in the paper with ResNet-50: a pixel decoder of 6 deformable-attention layers over 3 "
            "levels (256 channels), 9 masked-attention decoder layers, 100 queries",
            (800, 1333),
            family="mask2former",
            decoder_layers=10,
            decoder_ffn=2048,
            queries=100,
        ),
        ModelSpec(
            "rt-detr",
            "RT-DETR as in the paper with ResNet-50-vd: 3 levels, a one-layer encoder on the coarsest, 6 decoder "
            "layers of 256 channels, 300 queries, at its 640x640 input",
            (640, 640),
            family="rt-detr",
            encoder_layers=1,
        ),
        ModelSpec(
            "grounding-dino",
            "Grounding DINO-T as in the paper: Swin-T backbone, BERT-base text encoder, 4 levels, 6+6 layers of 256 "
            "channels, 900 queries, a 12-token prompt",
            (800, 1333),
            family="grounding-dino",
            encoder_ffn=2048,
            decoder_ffn=2048,
            queries=900,
            backbone="swin-t",
        ),
        ModelSpec("tiny", "a small Deformable DETR for smoke tests", (64, 96), **_TINY),
        ModelSpec("tiny-mask2former", "a small Mask2Former for smoke tests", (64, 96), family="mask2former", **_TINY),
        ModelSpec("tiny-rt-detr", "a small RT-DETR for smoke tests", (64, 96), family="rt-detr", **_TINY),
        ModelSpec(
            "tiny-grounding-dino", "a small Grounding DINO for smoke tests", (64, 96), family="grounding-dino", **_TINY
        ),
    )
}


def _resnet(spec: ModelSpec, stages, config_class=None):
    """A bottleneck ResNet of spec's widths and depths, giving the features of `stages` (1-4); `config_class` a
    ResNetConfig variant (RT-DETR's ResNet-vd), by default ResNetConfig itself."""
    from transformers import ResNetConfig

    return (config_class or ResNetConfig)(
        num_channels=3,
        embedding_size=spec.backbone_stem,
        hidden_sizes=list(spec.backbone_widths),
        depths=list(spec.backbone_depths),
        layer_type="bottleneck",
        out_features=[f"stage{s}" for s in stages],
    )


def _detr_transformer(spec: ModelSpec) -> dict:
    """The transformer's config arguments, which Deformable DETR, RT-DETR and Grounding DINO name alike."""
    return dict(
        d_model=spec.d_model,
        encoder_layers=spec.encoder_layers,
        decoder_layers=spec.decoder_layers,
        encoder_attention_heads=spec.heads,
        decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.encoder_ffn,
        decoder_ffn_dim=spec.decoder_ffn,
        num_queries=spec.queries,
    )


def _build_deformable_detr(spec: ModelSpec):
    """`DeformableDetrModel`. The backbone trains as in Deformable DETR: its last three stages, not the stem and first
    stage (transformers freezes a ResNetConfig backbone entirely, because it looks for timm's parameter names)."""
    from transformers import DeformableDetrConfig, DeformableDetrModel

    config = DeformableDetrConfig(
        backbone_config=_resnet(spec, (2, 3, 4)),
        use_pretrained_backbone=False,
        **_detr_transformer(spec),
        num_feature_levels=4,
    )
    model = DeformableDetrModel(config)
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(any(f"stages.{stage}." in name for stage in (1, 2, 3)))
    return model


def _build_mask2former(spec: ModelSpec):
    """`Mask2FormerModel`; the whole backbone trains, as in Mask2Former (at a tenth of the learning rate there)."""
    from transformers import Mask2FormerConfig, Mask2FormerModel

    # transformers warns that it supports only Swin backbones here; the paper's ResNet-50 models load and run, and the
    # report's output difference shows that both variants compute the same
    config_log = logging.getLogger("transformers.models.mask2former.configuration_mask2former")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        config = Mask2FormerConfig(
            backbone_config=_resnet(spec, (1, 2, 3, 4)),
            use_pretrained_backbone=False,
            feature_size=spec.d_model,
            mask_feature_size=spec.d_model,
            hidden_dim=spec.d_model,
            encoder_layers=spec.encoder_layers,
            decoder_layers=spec.decoder_layers,
            num_attention_heads=spec.heads,
            encoder_feedforward_dim=spec.encoder_ffn,
            dim_feedforward=spec.decoder_ffn,
            num_queries=spec.queries,
        )
    finally:
        config_log.setLevel(level)
    return Mask2FormerModel(config)


def _build_rt_detr(spec: ModelSpec):
    """`RTDetrModel` with its ResNet-vd backbone (RTDetrResNetConfig); the whole backbone trains, as in RT-DETR (with
    its batch norms frozen, transformers' default)."""
    from transformers import RTDetrConfig, RTDetrModel, RTDetrResNetConfig

    config = RTDetrConfig(
        backbone_config=_resnet(spec, (2, 3, 4), RTDetrResNetConfig),
        use_pretrained_backbone=False,
        encoder_in_channels=list(spec.backbone_widths[1:]),
        encoder_hidden_dim=spec.d_model,
        decoder_in_channels=[spec.d_model] * 3,
        **_detr_transformer(spec),
    )
    return RTDetrModel(config)


def _build_grounding_dino(spec: ModelSpec):
    """`GroundingDinoModel`, with transformers' Swin-T or a ResNet backbone and a BERT text encoder. Everything trains,
    as in Grounding DINO (transformers freezes a ResNet backbone, looking for timm's parameter names: unfrozen here)."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoModel

    backbone = {} if spec.backbone == "swin-t" else {"backbone_config": _resnet(spec, (2, 3, 4))}
    text = BertConfig(
        hidden_size=spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=max(1, spec.text_width // 64),
        intermediate_size=4 * spec.text_width,
    )
    config = GroundingDinoConfig(
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        text_config=text,
        **_detr_transformer(spec),
        **backbone,
    )
    model = GroundingDinoModel(config)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


@dataclasses.dataclass(frozen=True)
class Family:
    build: Callable[[ModelSpec], torch.nn.Module]
    transformers_model: str  # the transformers.models module whose attention the variants swap
    outputs: tuple[str, str]  # the outputs compared, and given gradients in the training step
    # strides of the levels from whose positions the model picks its queries (top-k), if it does: the image must
    # have at least as many positions as there are queries
    picks_queries_at: tuple[int, ...] = ()
    prompt_tokens: int = 0  # the length of the text prompt (input_ids) the model takes with the image, if any


FAMILIES = {
    "deformable-detr": Family(
        _build_deformable_detr, "deformable_detr", ("last_hidden_state", "encoder_last_hidden_state")
    ),
    "mask2former": Family(
        _build_mask2former, "mask2former", ("transformer_decoder_last_hidden_state", "pixel_decoder_last_hidden_state")
    ),
    # the decoder's output, and the encoder's class scores that pick the decoder's queries
    "rt-detr": Family(_build_rt_detr, "rt_detr", ("last_hidden_state", "enc_outputs_class"), (8, 16, 32)),
    "grounding-dino": Family(
        _build_grounding_dino,
        "grounding_dino",
        ("last_hidden_state", "encoder_last_hidden_state_vision"),
        (8, 16, 32, 64),
        prompt_tokens=12,
    ),
}


def build_model(spec: ModelSpec, seed: int = 0):
    """The model of `spec` with random weights (its backbone from transformers' own configs), in eval mode."""
    torch.manual_seed(seed)
    return FAMILIES[spec.family].build(spec).eval()


def _free_core_forward(self, value, shapes, shapes_list, level_start_index, locations, weights, im2col_step):
    return FreeCore.apply(value, locations, weights)


def _free_core_function(value, shapes_list, locations, weights):
    return FreeCore.apply(value, locations, weights)


class _Variant:
    """One variant's model and phase runners. `core` is the variant: what the model's attention site (the layer's
    forward or the module's attention function) runs while this variant runs."""

    def __init__(self, spec: ModelSpec, core: str, pixels: torch.Tensor):
        self.family = FAMILIES[spec.family]
        self.model = build_model(spec).to(pixels.device)
        self.core = core
        self.inputs = {"pixel_values": pixels}
        if self.family.prompt_tokens:
            # token ids from BERT's vocabulary; the text encoder's cost does not depend on which
            ids = torch.Generator().manual_seed(2)
            shape = (pixels.shape[0], self.family.prompt_tokens)
            self.inputs["input_ids"] = torch.randint(1000, 2000, shape, generator=ids).to(pixels.device)
        self.grads: tuple[torch.Tensor, ...] = ()  # of the two outputs, for the training step
        # a tiny step: the weights barely move over the runs, so every variant keeps timing the same model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-9)

    def _outputs(self):
        out = self.model(**self.inputs)
        return tuple(out[name] for name in self.family.outputs)

    def run(self, phase: str):
        import xmsda.integrations.transformers as xt

        ((owner, attribute),) = xt.attention_sites([self.family.transformers_model])
        own = getattr(owner, attribute)
        if self.core == "xmsda":
            xt.enable()
        elif self.core == FREE_CORE:
            setattr(owner, attribute, _free_core_forward if attribute == "forward" else _free_core_function)
        try:
            if phase == "inference":
                with torch.no_grad():
                    return self._outputs()
            self.optimizer.zero_grad(set_to_none=True)
            outputs = self._outputs()
            torch.autograd.backward(outputs, self.grads)
            self.optimizer.step()
            return outputs
        finally:
            if self.core == "xmsda":
                xt.disable()
            setattr(owner, attribute, own)


def run_model_benchmark(
    spec: ModelSpec,
    image: tuple[int, int] | None = None,
    batch: int = 1,
    threads: int | None = None,
    repeat: int = 3,
    phases=MODEL_PHASES,
    log: Callable[[str], None] | None = print,
    device: str = "cpu",
) -> dict:
    """Time the model of `spec` with each variant on `device` ("cpu" or "cuda"; the image is drawn on the CPU)."""
    import xmsda.integrations.transformers as xt

    if xt.enabled():
        raise RuntimeError(
            "xmsda's transformers switch is on, so the 'transformers' variant would run xmsda too: call "
            "xmsda.integrations.transformers.disable() before benchmarking"
        )
    image = image or spec.image
    strides = FAMILIES[spec.family].picks_queries_at
    positions = sum(math.ceil(image[0] / s) * math.ceil(image[1] / s) for s in strides)
    if strides and positions < spec.queries:
        raise ValueError(
            f"a {image[0]}x{image[1]} image gives {spec.name} {positions} positions to pick its {spec.queries} "
            f"queries from; it needs at least {spec.queries} (its own size is {spec.image[0]}x{spec.image[1]})"
        )
    threads = set_threads(threads)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, *image, generator=g).to(device)
    variants = {v: _Variant(spec, v, pixels) for v in MODEL_VARIANTS}
    # outputs of the first (untimed) run: the shapes of the fixed output gradients, and the variants' agreement
    first = {v: variants[v].run("inference") for v in ("xmsda", "transformers")}
    grads = tuple(torch.randn(o.shape, generator=g).to(device) for o in first["xmsda"])
    for variant in variants.values():
        variant.grads = grads
    difference = max((a - b).abs().max().item() for a, b in zip(first["xmsda"], first["transformers"], strict=True))
    result = {
        "model": dataclasses.asdict(spec),
        "image": list(image),
        "batch": batch,
        "threads": threads,
        "repeat": repeat,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "machine": memory_setup(),
        "max_output_difference": difference,
        "phases": {},
    }
    for phase in phases:
        runners = {v: functools.partial(variant.run, phase) for v, variant in variants.items()}
        for runner in runners.values():
            runner.device = device  # timed to the GPU's last kernel on CUDA
        times = interleaved_times(runners, repeat, log, phase)
        entry = {v: {"median_s": statistics.median(t), "times_s": t} for v, t in times.items()}
        for v in entry:
            entry[v]["speedup_vs_transformers"] = entry["transformers"]["median_s"] / entry[v]["median_s"]
        result["phases"][phase] = entry
    return result


def format_model_report(result: dict) -> str:
    m = result["model"]
    h, w = result["image"]
    lines = [
        f"model {m['name']}: {m['description']}",
        f"image {h}x{w}, batch {result['batch']}, {result['threads']} threads, median of {result['repeat']} runs"
        + (f", on {result['device']}" if result.get("device", "cpu") != "cpu" else ""),
        f"memory allocator {result['machine']['allocator']}; {result['machine']['tensor_pages']}",
        f"largest difference between the variants' outputs: {result['max_output_difference']:.2e}",
        "",
        f"{'phase':<11} {'variant':<13} {'median':>10} {'vs transformers':>16}",
    ]
    for phase, entry in result["phases"].items():
        for v, e in entry.items():
            lines.append(f"{phase:<11} {v:<13} {e['median_s'] * 1e3:>8.1f}ms {e['speedup_vs_transformers']:>15.2f}x")
    lines += [
        "",
        f"{FREE_CORE}: the model with an attention core that costs nothing (zeros forward, zero gradients back):",
        "the time no attention kernel can remove, the highest ratio any kernel reaches.",
    ]
    return "\n".join(lines)
