"""What stage 2 needs to know about the Wan transformer (`WanTransformer3DModel`: Wan 2.1, Wan 2.2's experts and
TI2V-5B, the built-in model): where its tokens enter and leave, its attention modules, rotary embedding, region
self-attention and FLOPs.

Kept apart from the hooks so that another family (another attention layout) brings its own version of these few
functions and reuses everything else (`ltx.py` is the other one).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding, op for op as in `WanAttnProcessor` (so recorded keys equal the model's)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def token_modules(transformer) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The modules whose outputs a region step cuts to its tokens (patch embedding, rotary embedding) and the one
    whose output it scatters back to the full grid (output projection)."""
    return transformer.patch_embedding, transformer.rope, transformer.proj_out


def select_tokens(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The patch embedding's `[B, D, F, H, W]` cut to the region's tokens: the model flattens it to tokens next, and
    a `[B, D, 1, 1, Lr]` view flattens to the selection."""
    b, d = output.shape[:2]
    return output.flatten(2).index_select(2, index).reshape(b, d, 1, 1, -1)


def select_rotary(output, index: torch.Tensor):
    return tuple(freqs.index_select(1, index) for freqs in output)


def scatter_tokens(output: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The region's predictions back on the full grid (zeros elsewhere: the engine takes the source's step there)."""
    full = output.new_zeros(output.shape[0], num_tokens, output.shape[2])
    return full.index_copy(1, index, output)


def select_timestep(kwargs: dict, index: torch.Tensor) -> dict:
    """Per-token timesteps (Wan 2.2 TI2V's `expand_timesteps`, `[B, L]`) cut to the region's tokens."""
    timestep = kwargs.get("timestep")
    if timestep is not None and timestep.ndim == 2:
        kwargs = {**kwargs, "timestep": timestep.index_select(1, index)}
    return kwargs


def cross_attention_bias(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """TGAA: the bias `[T]` as the cross-attention's additive mask (the block passes (hidden_states,
    encoder_hidden_states, attention_mask, rotary_emb) positionally)."""
    bias = bias.view(1, 1, 1, -1).to(args[0].dtype)
    if len(args) > 2:
        return (*args[:2], bias, *args[3:]), kwargs
    return args, {**kwargs, "attention_mask": bias}


def self_attention_inputs(args: tuple, kwargs: dict):
    """(hidden_states, rotary_emb) of a `WanAttention` call: (hidden_states, encoder_hidden_states, attention_mask,
    rotary_emb), positionally or by name."""
    names = ("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    return bound["hidden_states"], bound.get("rotary_emb")


def first_of(rotary_emb):
    """The rotary embedding's frequencies of the batch's first element (recorded keys are per request)."""
    return tuple(freqs[0] for freqs in rotary_emb)


def self_attention_modules(transformer) -> list:
    return [block.attn1 for block in transformer.blocks]


def cross_attention_modules(transformer) -> list:
    return [block.attn2 for block in transformer.blocks]


def key_value_modules(attn) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The submodules whose outputs are a self-attention's keys (normed, before the rotary embedding) and values."""
    return attn.norm_k, attn.to_v


def rotate_keys(keys: torch.Tensor, heads: int, rotary_emb) -> torch.Tensor:
    """Recorded normed keys `[..., L, heads * hd]` -> the keys the attention used (rotary embedding applied).

    The same products as `apply_rotary_emb`, as one complex multiplication: equal results, several times faster,
    which keeps a miss's recording cheap (docs/chorus/design.md)."""
    freqs_cos, freqs_sin = rotary_emb
    pairs = torch.view_as_complex(keys.unflatten(-1, (heads, -1, 2)).float().contiguous())
    rotation = torch.complex(freqs_cos[..., 0::2].float(), freqs_sin[..., 1::2].float())
    return torch.view_as_real(pairs * rotation).flatten(-3).type_as(keys)


def region_self_attention(attn, hidden_states, rotary_emb, token_index, context_keys, context_values):
    """Self-attention of the region's tokens over every token: the region's own keys and values are computed, the
    others are the source's at this step (`context_*`: `[L, heads * hd]`, keys rotated). Returns the attention
    output of the region's tokens and the merged keys and values `[1, L, heads * hd]` (what this step saw)."""
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    query, key = apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)
    full_key = context_keys.to(key).unflatten(-1, (attn.heads, -1))[None].index_copy(1, token_index, key)
    full_value = context_values.to(value).unflatten(-1, (attn.heads, -1))[None].index_copy(1, token_index, value)
    processor = attn.processor
    out = dispatch_attention_fn(
        query,
        full_key,
        full_value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        backend=getattr(processor, "_attention_backend", None),
    )
    out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
    return out, full_key.flatten(2), full_value.flatten(2)


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
