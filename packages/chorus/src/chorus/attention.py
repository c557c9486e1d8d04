"""Attention processors and hooks through which Chorus observes and steers a Wan transformer (no model fork).

One `Stage2Runtime` is shared by a processor on every attention module and by four hooks on the transformer:

- idle: every processor delegates to the model's own `WanAttnProcessor`: outputs are bit-identical.
- active (a step computed in full): Chorus's processor computes the same attention, and may record self-attention
  keys/values (after norm and RoPE) and cross-attention queries, so later requests can reuse them as features of
  this request, and may apply TGAA.
- restricted (a stage-2 step of a hit): only the latent tokens inside the region mask enter the transformer. Hooks
  on the patch embedding and RoPE select those tokens; in self-attention they attend to all tokens, the unmasked
  ones entering as keys/values from the source's cached features at this step; a hook on `proj_out` scatters the
  prediction back to the full token grid. The work of the step shrinks with the mask fraction.
- TGAA (Token-Guided Attention Amplification): in cross-attention, a bias of log(alpha) on the logits of the
  changed prompt tokens, for the query tokens inside the mask. alpha = 1 adds no bias at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding, op for op as in `WanAttnProcessor` (so results stay bit-identical)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@dataclass
class Stage2Runtime:
    """What the processors and hooks need to know about the step being computed."""

    mode: str = "idle"  # "idle", "active" or "restricted"
    step: int = 0
    pass_index: int = -1  # 0 for the conditional transformer call of a step, 1 for the unconditional one
    capture_kv: bool = False
    capture_queries: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    capture_dtype: torch.dtype = torch.float16
    # restricted mode
    token_index: torch.Tensor | None = None  # sorted indices of the recomputed latent tokens
    num_tokens: int = 0  # latent tokens of the full grid
    source_features: dict[str, torch.Tensor] = field(default_factory=dict)
    # TGAA: additive bias over the text tokens [T] (None: no amplification); rows it applies to when not restricted
    text_bias: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None  # bool [L] (None: every query row)

    def begin_step(self, step: int) -> None:
        self.step, self.pass_index = step, -1

    def reset(self) -> None:
        self.mode, self.capture_kv, self.capture_queries = "idle", False, False
        self.token_index, self.source_features, self.text_bias, self.bias_rows = None, {}, None, None

    @property
    def restricted(self) -> bool:
        return self.mode == "restricted"


def kv_name(step: int, pass_index: int, layer: int, which: str) -> str:
    return f"kv.{step}.{pass_index}.{layer}.{which}"


def query_name(step: int, layer: int) -> str:
    return f"q.{step}.{layer}"


class ChorusWanAttnProcessor:
    """Replaces `WanAttnProcessor` on one attention module; see the module docstring for its modes."""

    def __init__(self, runtime: Stage2Runtime, layer: int, cross: bool, original: WanAttnProcessor):
        self.runtime, self.layer, self.cross, self.original = runtime, layer, cross, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        rt = self.runtime
        if rt.mode == "idle" or attn.add_k_proj is not None:  # image-conditioned (I2V) attention: untouched
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.cross:
            return self._cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self._self_attention(attn, hidden_states, rotary_emb)

    def _self_attention(self, attn, hidden_states, rotary_emb):
        rt = self.runtime
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)
        if rt.restricted:
            # The unmasked tokens follow the source's trajectory, so their keys/values are the source's.
            source_key = rt.source_features[kv_name(rt.step, rt.pass_index, self.layer, "k")]
            source_value = rt.source_features[kv_name(rt.step, rt.pass_index, self.layer, "v")]
            key = source_key.to(key).index_copy(1, rt.token_index, key)
            value = source_value.to(value).index_copy(1, rt.token_index, value)
        if rt.capture_kv:
            rt.captured[kv_name(rt.step, rt.pass_index, self.layer, "k")] = key.to(rt.capture_dtype).cpu()
            rt.captured[kv_name(rt.step, rt.pass_index, self.layer, "v")] = value.to(rt.capture_dtype).cpu()
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self.original._attention_backend
        )
        return self._project_out(attn, out, query)

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        rt = self.runtime
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        # A restricted step has only the masked tokens' queries: no mask of a later hit can be built from them.
        if rt.capture_queries and rt.pass_index == 0 and not rt.restricted:
            rt.captured[query_name(rt.step, self.layer)] = query.to(rt.capture_dtype).cpu()
        bias = attention_mask
        if rt.text_bias is not None:
            bias = rt.text_bias.to(query).view(1, 1, 1, -1)  # [B, H, Lq, T] after broadcasting
            if rt.bias_rows is not None and not rt.restricted:  # amplify inside the region only
                bias = bias * rt.bias_rows.to(query).view(1, 1, -1, 1)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False, backend=self.original._attention_backend
        )
        return self._project_out(attn, out, query)

    @staticmethod
    def _project_out(attn, out, query):
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class Stage2Controller:
    """Installs the processors and hooks on a `WanTransformer3DModel` and owns their shared runtime."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.runtime = Stage2Runtime()
        self.num_layers = len(transformer.blocks)
        processors = {}
        for name, processor in transformer.attn_processors.items():
            # names look like "blocks.3.attn1.processor"
            parts = name.split(".")
            layer, kind = int(parts[1]), parts[2]
            original = processor.original if isinstance(processor, ChorusWanAttnProcessor) else processor
            processors[name] = ChorusWanAttnProcessor(self.runtime, layer, kind == "attn2", original)
        transformer.set_attn_processor(processors)
        self._handles = [
            transformer.register_forward_pre_hook(self._count_pass),
            transformer.rope.register_forward_hook(self._select_rope),
            transformer.patch_embedding.register_forward_hook(self._select_tokens),
            transformer.proj_out.register_forward_hook(self._scatter_tokens),
        ]

    def _count_pass(self, module, args):
        self.runtime.pass_index += 1

    def _select_rope(self, module, args, output):
        rt = self.runtime
        if not rt.restricted:
            return output
        return tuple(freqs.index_select(1, rt.token_index) for freqs in output)

    def _select_tokens(self, module, args, output):
        rt = self.runtime
        if not rt.restricted:
            return output
        b, d = output.shape[:2]
        # The model flattens [B, D, F, H, W] to tokens next; a [B, D, 1, 1, Lm] view flattens to the selection.
        return output.flatten(2).index_select(2, rt.token_index).reshape(b, d, 1, 1, -1)

    def _scatter_tokens(self, module, args, output):
        rt = self.runtime
        if not rt.restricted:
            return output
        full = output.new_zeros(output.shape[0], rt.num_tokens, output.shape[2])
        return full.index_copy(1, rt.token_index, output)

    @torch.no_grad()
    def text_keys(self, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the cross-attention keys [B, T, H, hd] of a prompt (as the model computes them)."""
        context = self.transformer.condition_embedder.text_embedder(prompt_embeds)
        keys = []
        for block in self.transformer.blocks:
            attn = block.attn2
            keys.append(attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1)))
        return keys

    def remove(self) -> None:
        """Take the hooks off and give back the model's own processors where ours are still installed."""
        for handle in self._handles:
            handle.remove()
        self.transformer.set_attn_processor(
            {
                name: p.original if isinstance(p, ChorusWanAttnProcessor) and p.runtime is self.runtime else p
                for name, p in self.transformer.attn_processors.items()
            }
        )


def transformer_flops(transformer, num_tokens: int, text_tokens: int, query_tokens: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of one `WanTransformer3DModel` call over `num_tokens` latent tokens of which
    `query_tokens` are computed (all by default); matches torch's FlopCounterMode (tested)."""
    cfg = transformer.config
    lq = num_tokens if query_tokens is None else query_tokens
    d = cfg.num_attention_heads * cfg.attention_head_dim
    patch = math.prod(cfg.patch_size)
    macs = num_tokens * cfg.in_channels * patch * d  # patch embedding (a convolution over the whole grid)
    macs += text_tokens * (cfg.text_dim * d + d * d)  # text projection
    macs += cfg.freq_dim * d + d * d + d * 6 * d  # timestep embedding and its projection
    per_block = (
        4 * lq * d * d  # self-attention q, k, v, out
        + 2 * lq * num_tokens * d  # self-attention scores and weighted values
        + 2 * lq * d * d  # cross-attention q, out
        + 2 * text_tokens * d * d  # cross-attention k, v
        + 2 * lq * text_tokens * d  # cross-attention scores and weighted values
        + 2 * lq * d * cfg.ffn_dim  # feed-forward
    )
    macs += cfg.num_layers * per_block
    macs += lq * d * cfg.out_channels * patch  # output projection
    return 2 * macs
