"""`xmsda bench-model`: a whole Hugging Face Deformable DETR, with transformers' own attention and with the switch.

`xmsda bench` times the op and one `MSDeformAttn` module; users meet them inside a model, next to a backbone,
feed-forward layers and a decoder that the op does not touch. This benchmark runs `DeformableDetrModel` (randomly
initialised from its config: nothing is downloaded) on one image size, in one process and interleaved, with
`MultiScaleDeformableAttention` as transformers computes it (its grid_sample formulation, the same as
`xmsda.reference`), with `xmsda.integrations.transformers.enable()`, and with an attention core that costs nothing
(`free-core`, as in `xmsda bench`: zeros forward, zero gradients back, so every layer around it still runs): the
time no attention kernel can remove, the highest ratio any kernel could reach. Phases:

  inference   the model's forward under `torch.no_grad`, in eval mode
  train_step  forward with autograd, backward from fixed gradients of the decoder's and the encoder's outputs to the
              parameters (the backbone's last three stages included, as Deformable DETR trains them), and an SGD
              step; in eval mode, so that dropout does not differ between the variants

Both variants start from the same weights and the same image, and the report gives the largest difference between
their outputs next to their times, so a run that times a broken switch says so.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch

from .bench import FREE_CORE, _FreeCore, _interleaved_times, memory_setup, set_threads

__all__ = ["MODELS", "MODEL_PHASES", "format_model_report", "run_model_benchmark"]

MODEL_PHASES = ("inference", "train_step")
MODEL_VARIANTS = ("xmsda", "transformers", FREE_CORE)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    image: tuple[int, int]  # default (H, W)
    d_model: int = 256
    layers: int = 6  # encoder and decoder layers each
    heads: int = 8
    ffn: int = 1024
    queries: int = 300
    backbone_widths: tuple[int, ...] = (256, 512, 1024, 2048)
    backbone_depths: tuple[int, ...] = (3, 4, 6, 3)
    backbone_stem: int = 64


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            "deformable-detr",
            "Deformable DETR as in the paper: ResNet-50 backbone, 4 levels, 6+6 layers of 256 channels, 300 queries",
            (800, 1333),
        ),
        ModelSpec(
            "tiny",
            "a small smoke-test model",
            (64, 96),
            d_model=32,
            layers=1,
            heads=2,
            ffn=32,
            queries=12,
            backbone_widths=(8, 16, 16, 16),
            backbone_depths=(1, 1, 1, 1),
            backbone_stem=8,
        ),
    )
}


def build_model(spec: ModelSpec, seed: int = 0):
    """`DeformableDetrModel` of `spec` with random weights (a ResNet backbone from transformers' own config). The
    backbone trains as in Deformable DETR: its last three stages, not the stem and first stage (transformers freezes
    a ResNetConfig backbone entirely, because it looks for timm's parameter names)."""
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=spec.backbone_stem,
        hidden_sizes=list(spec.backbone_widths),
        depths=list(spec.backbone_depths),
        layer_type="bottleneck",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=spec.d_model,
        encoder_layers=spec.layers,
        decoder_layers=spec.layers,
        encoder_attention_heads=spec.heads,
        decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.ffn,
        decoder_ffn_dim=spec.ffn,
        num_queries=spec.queries,
        num_feature_levels=4,
    )
    torch.manual_seed(seed)
    model = DeformableDetrModel(config).eval()
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(any(f"stages.{stage}." in name for stage in (1, 2, 3)))
    return model


def _free_core_forward(self, value, shapes, shapes_list, level_start_index, locations, weights, im2col_step):
    return _FreeCore.apply(value, locations, weights)


class _Variant:
    """One variant's model and phase runners. `core` is the variant: which forward transformers'
    MultiScaleDeformableAttention runs while this variant runs."""

    def __init__(self, spec: ModelSpec, core: str, pixels: torch.Tensor):
        self.model = build_model(spec)
        self.core = core
        self.pixels = pixels
        self.grads: tuple[torch.Tensor, ...] = ()  # of the two outputs, for the training step
        # a tiny step: the weights barely move over the runs, so every variant keeps timing the same model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-9)

    def _outputs(self):
        out = self.model(pixel_values=self.pixels)
        return out.last_hidden_state, out.encoder_last_hidden_state

    def run(self, phase: str):
        from transformers.models.deformable_detr import modeling_deformable_detr as mdd

        import xmsda.integrations.transformers as xt

        layer = mdd.MultiScaleDeformableAttention
        own_forward = layer.forward
        if self.core == "xmsda":
            xt.enable()
        elif self.core == FREE_CORE:
            layer.forward = _free_core_forward
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
            layer.forward = own_forward


def run_model_benchmark(
    spec: ModelSpec,
    image: tuple[int, int] | None = None,
    batch: int = 1,
    threads: int | None = None,
    repeat: int = 3,
    phases=MODEL_PHASES,
    log: Callable[[str], None] | None = print,
) -> dict:
    import xmsda.integrations.transformers as xt

    if xt.enabled():
        raise RuntimeError(
            "xmsda's transformers switch is on, so the 'transformers' variant would run xmsda too: call "
            "xmsda.integrations.transformers.disable() before benchmarking"
        )
    threads = set_threads(threads)
    image = image or spec.image
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, *image, generator=g)
    variants = {v: _Variant(spec, v, pixels) for v in MODEL_VARIANTS}
    # outputs of the first (untimed) run: the shapes of the fixed output gradients, and the variants' agreement
    first = {v: variants[v].run("inference") for v in ("xmsda", "transformers")}
    grads = tuple(torch.randn(o.shape, generator=g) for o in first["xmsda"])
    for variant in variants.values():
        variant.grads = grads
    difference = max((a - b).abs().max().item() for a, b in zip(first["xmsda"], first["transformers"], strict=True))
    result = {
        "model": dataclasses.asdict(spec),
        "image": list(image),
        "batch": batch,
        "threads": threads,
        "repeat": repeat,
        "machine": memory_setup(),
        "max_output_difference": difference,
        "phases": {},
    }
    for phase in phases:
        runners = {v: (lambda variant=variant, phase=phase: variant.run(phase)) for v, variant in variants.items()}
        times = _interleaved_times(runners, repeat, log, phase)
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
        f"image {h}x{w}, batch {result['batch']}, {result['threads']} threads, median of {result['repeat']} runs",
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
