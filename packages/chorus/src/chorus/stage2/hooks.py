"""Stage 2's hooks on the transformer (diffusers `ModelHook`s in its `HookRegistry`; the model code is untouched).

One `RegionHooks` per model installs them on each of its transformers (Wan 2.2 A14B has two experts) and holds the
current request's `RunState`; between requests every hook passes its module's call through unchanged. Which call is
running is read from diffusers' cache context, which the adapter opens around each transformer call
(`cache_context("cond" | "uncond", step_index=...)`); which expert, from the transformer the call entered.
What is family-specific (where tokens enter and leave, the attention modules, the rotary embedding) comes from the
transformer's layout module (`wan.py`, `ltx.py`; `layout_for`).

- Recording (steps in `record_steps`): the outputs of each self-attention's key norm and value projection are kept by
  reference (no copy during the step); `FeatureRecorder.bank()` turns them into the request's `FeatureBank`.
- Region steps (steps in `region_steps`): only the region's latent tokens enter the transformer. The patch embedding
  and the rotary embedding (and per-token timesteps) are cut to them, each self-attention lets them attend to every
  token (the others' keys and values are the source's at this step) and the output projection is scattered back to
  the full token grid. The merged keys and values are recorded, so a hit can serve as a source in turn. The source's
  features of a step move to the model's device once per step and branch (all layers in one copy, non-blocking from
  page-locked memory on a GPU), never per layer.
- TGAA: at region steps, the cross-attention logits of the tokens that carry the new prompt's meaning get `log(alpha)`
  added (through the attention mask the model already accepts).
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from . import wan
from .bank import FeatureBank, FeatureKey

HOOK_PREFIX = "chorus_stage2"
_instances = itertools.count()


# Transformer classes with a layout module: region steps run on them. The others compute region steps in full.
LAYOUTS = {"WanTransformer3DModel": "wan", "LTXVideoTransformer3DModel": "ltx"}
# Why the other families' transformers have no region steps (the engine reports it).
NO_REGION = {
    "HunyuanVideoTransformer3DModel": "joint (MM-DiT) attention over text and video tokens",
    "CogVideoXTransformer3DModel": "joint attention over text and video tokens",
}


def layout_for(transformer):
    """The layout module of this transformer's class, or None when region steps cannot run on it."""
    name = LAYOUTS.get(type(transformer).__name__)
    return importlib.import_module(f".{name}", __package__) if name else None


def region_support(transformers) -> str | None:
    """None when region steps can run on every one of `transformers`; else why not (for reports)."""
    for transformer in transformers:
        if layout_for(transformer) is None:
            name = type(transformer).__name__
            why = NO_REGION.get(name, "no region layout for this transformer")
            return f"{name}: {why}; region steps are computed in full"
    return None


@dataclass
class RunState:
    """What the hooks do during one request."""

    record_steps: frozenset[int] = frozenset()
    region_steps: frozenset[int] = frozenset()
    token_index: torch.Tensor | None = None  # sorted indices of the region's latent tokens
    num_tokens: int = 0  # latent tokens of the full grid
    source: FeatureBank | None = None  # the source's features at the region steps
    feature_steps: dict[int, int] = field(default_factory=dict)  # region step -> the source's step to read
    text_bias: torch.Tensor | None = None  # [T] added to cross-attention logits at region steps (TGAA)
    recorder: FeatureRecorder | None = None


class FeatureRecorder:
    """Keeps references to the keys and values of the steps it is asked to record; `bank()` builds the features.

    Full steps give normed keys before the rotary embedding (that is what the key norm outputs); the embedding is
    applied once, in `bank()`, with the step's own frequencies. Region steps give their merged, rotated keys.
    Tables are keyed by (step, branch, expert)."""

    def __init__(self, heads: int, dtype: torch.dtype, layout=None):
        self.heads, self.dtype = heads, dtype
        self.layout = layout or wan
        self.unrotated: dict[tuple[int, str, int], dict[int, torch.Tensor]] = {}
        self.rotated: dict[tuple[int, str, int], dict[int, torch.Tensor]] = {}
        self.values: dict[tuple[int, str, int], dict[int, torch.Tensor]] = {}
        self.rotary: dict[tuple[int, str, int], object] = {}
        self.calls = 0  # tensors handed to the recorder (a test bounds it)

    def keep(self, table: dict, call: tuple[int, str, int], layer: int, tensor: torch.Tensor) -> None:
        self.calls += 1
        table.setdefault(call, {})[layer] = tensor.detach()[0]

    def bank(self) -> FeatureBank:
        tensors = {}
        for call, values in self.values.items():
            step, branch, expert = call
            layers = sorted(values)
            if call in self.rotated:
                keys = torch.stack([self.rotated[call][i] for i in layers])
            else:
                unrotated = torch.stack([self.unrotated[call][i] for i in layers])
                keys = self.layout.rotate_keys(unrotated, self.heads, self.layout.first_of(self.rotary[call]))
            tensors[FeatureKey(step, branch, "k", expert)] = keys.to(self.dtype).cpu()
            stacked = torch.stack([values[i] for i in layers])
            tensors[FeatureKey(step, branch, "v", expert)] = stacked.to(self.dtype).cpu()
        return FeatureBank(tensors)


class _Call(BaseState):
    def reset(self):
        pass


class _ContextHook(ModelHook):
    """On a transformer: reads which step and branch each call is (diffusers sets the context on stateful hooks),
    and cuts per-token timesteps to the region at region steps."""

    _is_stateful = True

    def __init__(self, owner: RegionHooks, expert: int, layout):
        super().__init__()
        self.owner, self.expert, self.layout = owner, expert, layout
        self.state_manager = StateManager(_Call)

    def pre_forward(self, module, *args, **kwargs):
        context = self.state_manager._context
        o = self.owner
        o.step = None if context is None else context.step_index
        o.branch = None if context is None else context.name
        o.expert = self.expert
        if o.in_region:
            kwargs = self.layout.select_timestep(kwargs, o.run.token_index)
        return args, kwargs

    def reset_state(self, module):
        return module


class _RecordHook(ModelHook):
    """On a self-attention's key norm or value projection: keeps its output at recorded full steps."""

    def __init__(self, owner: RegionHooks, layer: int, table: str):
        super().__init__()
        self.owner, self.layer, self.table = owner, layer, table

    def post_forward(self, module, output):
        o = self.owner
        if o.recording and not o.in_region:
            recorder = o.run.recorder
            recorder.keep(getattr(recorder, self.table), o.call, self.layer, output)
        return output


class _SelectTokensHook(ModelHook):
    """On the patch embedding: keeps the region's tokens."""

    def __init__(self, owner: RegionHooks, layout):
        super().__init__()
        self.owner, self.layout = owner, layout

    def post_forward(self, module, output):
        if not self.owner.in_region:
            return output
        return self.layout.select_tokens(output, self.owner.run.token_index)


class _SelectRotaryHook(ModelHook):
    """On the rotary embedding: the region's frequencies; the full grid's are kept for recording."""

    def __init__(self, owner: RegionHooks, layout):
        super().__init__()
        self.owner, self.layout = owner, layout

    def post_forward(self, module, output):
        o = self.owner
        if o.recording and not o.in_region:
            o.run.recorder.rotary[o.call] = output
        if not o.in_region:
            return output
        return self.layout.select_rotary(output, o.run.token_index)


class _ScatterTokensHook(ModelHook):
    """On the output projection: the region's predictions back on the full grid."""

    def __init__(self, owner: RegionHooks, layout):
        super().__init__()
        self.owner, self.layout = owner, layout

    def post_forward(self, module, output):
        o = self.owner
        if not o.in_region:
            return output
        return self.layout.scatter_tokens(output, o.run.token_index, o.run.num_tokens)


class _RegionSelfAttentionHook(ModelHook):
    """On a self-attention: at region steps, the region's tokens attend to every token (see the layout module)."""

    def __init__(self, owner: RegionHooks, layer: int, layout):
        super().__init__()
        self.owner, self.layer, self.layout = owner, layer, layout

    def new_forward(self, module, *args, **kwargs):
        o = self.owner
        if not o.in_region:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden_states, rotary_emb = self.layout.self_attention_inputs(args, kwargs)
        keys, values = o.source_features()
        out, merged_k, merged_v = self.layout.region_self_attention(
            module, hidden_states, rotary_emb, o.run.token_index, keys[self.layer], values[self.layer]
        )
        if o.recording:
            recorder = o.run.recorder
            recorder.keep(recorder.rotated, o.call, self.layer, merged_k)
            recorder.keep(recorder.values, o.call, self.layer, merged_v)
        return out


class _TGAAHook(ModelHook):
    """On a cross-attention: at region steps, adds the TGAA bias to the logits of the new prompt's tokens."""

    def __init__(self, owner: RegionHooks, layout):
        super().__init__()
        self.owner, self.layout = owner, layout

    def pre_forward(self, module, *args, **kwargs):
        o = self.owner
        if o.in_region and o.run.text_bias is not None:
            args, kwargs = self.layout.cross_attention_bias(args, kwargs, o.run.text_bias)
        return args, kwargs


class RegionHooks:
    """Installs stage 2's hooks on a model's transformers and holds the current request's `RunState`."""

    def __init__(self, transformers):
        self.transformers = (transformers,) if isinstance(transformers, torch.nn.Module) else tuple(transformers)
        self.layouts = [layout_for(t) for t in self.transformers]
        if any(layout is None for layout in self.layouts):
            raise ValueError(region_support(self.transformers))
        self.run, self.step, self.branch, self.expert = RunState(), None, None, 0
        self._staged: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stagings = 0  # fetches of a step's source features onto the model's device (a test bounds it)
        # Several engines may share one model (each idle while another runs): each has its own hook names.
        self._prefix = f"{HOOK_PREFIX}.{next(_instances)}"
        self._names: list[tuple[torch.nn.Module, str]] = []
        for expert, (transformer, layout) in enumerate(zip(self.transformers, self.layouts, strict=True)):
            tag = f"e{expert}."
            embed, rope, proj_out = layout.token_modules(transformer)
            self._register(transformer, _ContextHook(self, expert, layout), tag + "context")
            self._register(embed, _SelectTokensHook(self, layout), tag + "select")
            self._register(rope, _SelectRotaryHook(self, layout), tag + "rotary")
            self._register(proj_out, _ScatterTokensHook(self, layout), tag + "scatter")
            for layer, attn in enumerate(layout.self_attention_modules(transformer)):
                key_module, value_module = layout.key_value_modules(attn)
                self._register(key_module, _RecordHook(self, layer, "unrotated"), f"{tag}keys.{layer}")
                self._register(value_module, _RecordHook(self, layer, "values"), f"{tag}values.{layer}")
                self._register(attn, _RegionSelfAttentionHook(self, layer, layout), f"{tag}self_attention.{layer}")
            for layer, attn in enumerate(layout.cross_attention_modules(transformer)):
                self._register(attn, _TGAAHook(self, layout), f"{tag}tgaa.{layer}")
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    @property
    def transformer(self) -> torch.nn.Module:
        return self.transformers[0]

    def _register(self, module, hook: ModelHook, name: str) -> None:
        full_name = f"{self._prefix}.{name}"
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, full_name)
        self._names.append((module, full_name))

    @property
    def heads(self) -> int:
        return self.transformer.config.num_attention_heads

    @property
    def layout(self):
        return self.layouts[0]

    @property
    def call(self) -> tuple[int, str, int]:
        return self.step, self.branch, self.expert

    @property
    def recording(self) -> bool:
        return self.step in self.run.record_steps and self.run.recorder is not None

    @property
    def in_region(self) -> bool:
        return self.step in self.run.region_steps

    def source_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's keys and values `[layers, tokens, dim]` of the running call, on the model's device: copied
        once per step and branch (non-blocking; the bank is page-locked on a GPU), the previous step's dropped."""
        call = self.call
        staged = self._staged.get(call)
        if staged is None:
            device = self.transformers[self.expert].device
            step, branch, expert = call
            keys, values = self.run.source.kv(self.run.feature_steps.get(step, step), branch, expert)
            self.stagings += 1
            staged = tuple(t.to(device, non_blocking=True) for t in (keys, values))
            self._staged = {k: v for k, v in self._staged.items() if k[0] == self.step}
            self._staged[call] = staged
        return staged

    def start(self, run: RunState) -> None:
        self.run, self.step, self.branch, self.expert = run, None, None, 0
        self._staged = {}

    def finish(self) -> None:
        self.run, self.step, self.branch, self.expert = RunState(), None, None, 0
        self._staged = {}

    def remove(self) -> None:
        for module, name in self._names:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self._names.clear()
        for transformer in self.transformers:
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
