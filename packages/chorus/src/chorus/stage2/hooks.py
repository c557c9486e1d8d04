"""Stage 2's hooks on the transformer (diffusers `ModelHook`s in its `HookRegistry`; the model code is untouched).

One `RegionHooks` per transformer installs them and holds the current request's `RunState`; between requests every
hook passes its module's call through unchanged. Which call is running is read from diffusers' cache context, which
the adapter opens around each transformer call (`cache_context("cond" | "uncond", step_index=...)`).

- Recording (steps in `record_steps`): the outputs of each self-attention's key norm and value projection are kept by
  reference (no copy during the step); `FeatureRecorder.bank()` turns them into the request's `FeatureBank`.
- Region steps (steps in `region_steps`): only the region's latent tokens enter the transformer. The patch embedding
  and the rotary embedding are cut to them, each self-attention lets them attend to every token (the others' keys and
  values are the source's at this step) and the output projection is scattered back to the full token grid. The
  merged keys and values are recorded, so a hit can serve as a source in turn.
- TGAA: at region steps, the cross-attention logits of the tokens that carry the new prompt's meaning get `log(alpha)`
  added (through the attention mask the model already accepts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from . import wan
from .bank import FeatureBank, FeatureKey

HOOK_PREFIX = "chorus_stage2"


@dataclass
class RunState:
    """What the hooks do during one request."""

    record_steps: frozenset[int] = frozenset()
    region_steps: frozenset[int] = frozenset()
    token_index: torch.Tensor | None = None  # sorted indices of the region's latent tokens
    num_tokens: int = 0  # latent tokens of the full grid
    source: FeatureBank | None = None  # the source's features at the region steps
    text_bias: torch.Tensor | None = None  # [T] added to cross-attention logits at region steps (TGAA)
    recorder: FeatureRecorder | None = None


class FeatureRecorder:
    """Keeps references to the keys and values of the steps it is asked to record; `bank()` builds the features.

    Full steps give normed keys before the rotary embedding (that is what the key norm outputs); the embedding is
    applied once, in `bank()`, with the step's own frequencies. Region steps give their merged, rotated keys."""

    def __init__(self, heads: int, dtype: torch.dtype):
        self.heads, self.dtype = heads, dtype
        self.unrotated: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        self.rotated: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        self.values: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        self.rotary: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls = 0  # tensors handed to the recorder (a test bounds it)

    def keep(self, table: dict, step: int, branch: str, layer: int, tensor: torch.Tensor) -> None:
        self.calls += 1
        table.setdefault((step, branch), {})[layer] = tensor.detach()[0]

    def bank(self) -> FeatureBank:
        tensors = {}
        for (step, branch), values in self.values.items():
            layers = sorted(values)
            if (step, branch) in self.rotated:
                keys = torch.stack([self.rotated[(step, branch)][i] for i in layers])
            else:
                cos, sin = self.rotary[(step, branch)]
                unrotated = torch.stack([self.unrotated[(step, branch)][i] for i in layers])
                keys = wan.rotate_keys(unrotated, self.heads, (cos[0], sin[0]))
            tensors[FeatureKey(step, branch, "k")] = keys.to(self.dtype).cpu()
            tensors[FeatureKey(step, branch, "v")] = torch.stack([values[i] for i in layers]).to(self.dtype).cpu()
        return FeatureBank(tensors)


class _Call(BaseState):
    def reset(self):
        pass


class _ContextHook(ModelHook):
    """On the transformer: reads which step and branch each call is (diffusers sets the context on stateful hooks)."""

    _is_stateful = True

    def __init__(self, owner: RegionHooks):
        super().__init__()
        self.owner = owner
        self.state_manager = StateManager(_Call)

    def pre_forward(self, module, *args, **kwargs):
        context = self.state_manager._context
        self.owner.step = None if context is None else context.step_index
        self.owner.branch = None if context is None else context.name
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
            recorder.keep(getattr(recorder, self.table), o.step, o.branch, self.layer, output)
        return output


class _SelectTokensHook(ModelHook):
    """On the patch embedding: keeps the region's tokens (the model flattens [B, D, F, H, W] to tokens next; a
    [B, D, 1, 1, Lr] view flattens to the selection)."""

    def __init__(self, owner: RegionHooks):
        super().__init__()
        self.owner = owner

    def post_forward(self, module, output):
        if not self.owner.in_region:
            return output
        b, d = output.shape[:2]
        return output.flatten(2).index_select(2, self.owner.run.token_index).reshape(b, d, 1, 1, -1)


class _SelectRotaryHook(ModelHook):
    """On the rotary embedding: the region's frequencies; the full grid's are kept for recording."""

    def __init__(self, owner: RegionHooks):
        super().__init__()
        self.owner = owner

    def post_forward(self, module, output):
        o = self.owner
        if o.recording and not o.in_region:
            o.run.recorder.rotary[(o.step, o.branch)] = output
        if not o.in_region:
            return output
        return tuple(freqs.index_select(1, o.run.token_index) for freqs in output)


class _ScatterTokensHook(ModelHook):
    """On the output projection: the region's predictions back on the full grid (zeros elsewhere: the engine takes
    the source's step there)."""

    def __init__(self, owner: RegionHooks):
        super().__init__()
        self.owner = owner

    def post_forward(self, module, output):
        o = self.owner
        if not o.in_region:
            return output
        full = output.new_zeros(output.shape[0], o.run.num_tokens, output.shape[2])
        return full.index_copy(1, o.run.token_index, output)


class _RegionSelfAttentionHook(ModelHook):
    """On a self-attention: at region steps, the region's tokens attend to every token (see `wan`)."""

    def __init__(self, owner: RegionHooks, layer: int):
        super().__init__()
        self.owner, self.layer = owner, layer

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        o = self.owner
        if not o.in_region:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        keys, values = o.run.source.kv(o.step, o.branch)
        out, merged_k, merged_v = wan.region_self_attention(
            module, hidden_states, rotary_emb, o.run.token_index, keys[self.layer], values[self.layer]
        )
        if o.recording:
            recorder = o.run.recorder
            recorder.keep(recorder.rotated, o.step, o.branch, self.layer, merged_k)
            recorder.keep(recorder.values, o.step, o.branch, self.layer, merged_v)
        return out


class _TGAAHook(ModelHook):
    """On a cross-attention: at region steps, adds the TGAA bias to the logits of the new prompt's tokens."""

    def __init__(self, owner: RegionHooks):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        o = self.owner
        if o.in_region and o.run.text_bias is not None:
            bias = o.run.text_bias.view(1, 1, 1, -1).to(args[0].dtype)
            if len(args) > 2:  # the block passes (hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
                args = (*args[:2], bias, *args[3:])
            else:
                kwargs["attention_mask"] = bias
        return args, kwargs


@dataclass
class RegionHooks:
    """Installs stage 2's hooks on a Wan transformer and holds the current request's `RunState`."""

    transformer: torch.nn.Module
    run: RunState = field(default_factory=RunState)
    step: int | None = None
    branch: str | None = None

    def __post_init__(self):
        self._names: list[tuple[torch.nn.Module, str]] = []
        self._register(self.transformer, _ContextHook(self), "context")
        self._register(self.transformer.patch_embedding, _SelectTokensHook(self), "select")
        self._register(self.transformer.rope, _SelectRotaryHook(self), "rotary")
        self._register(self.transformer.proj_out, _ScatterTokensHook(self), "scatter")
        for layer, attn in enumerate(wan.self_attention_modules(self.transformer)):
            key_module, value_module = wan.key_value_modules(attn)
            self._register(key_module, _RecordHook(self, layer, "unrotated"), f"keys.{layer}")
            self._register(value_module, _RecordHook(self, layer, "values"), f"values.{layer}")
            self._register(attn, _RegionSelfAttentionHook(self, layer), f"self_attention.{layer}")
        for layer, attn in enumerate(wan.cross_attention_modules(self.transformer)):
            self._register(attn, _TGAAHook(self), f"tgaa.{layer}")
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def _register(self, module, hook: ModelHook, name: str) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, f"{HOOK_PREFIX}.{name}")
        self._names.append((module, f"{HOOK_PREFIX}.{name}"))

    @property
    def heads(self) -> int:
        return self.transformer.config.num_attention_heads

    @property
    def recording(self) -> bool:
        return self.step in self.run.record_steps and self.run.recorder is not None

    @property
    def in_region(self) -> bool:
        return self.step in self.run.region_steps

    def start(self, run: RunState) -> None:
        self.run, self.step, self.branch = run, None, None

    def finish(self) -> None:
        self.run, self.step, self.branch = RunState(), None, None

    def remove(self) -> None:
        for module, name in self._names:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self._names.clear()
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()
