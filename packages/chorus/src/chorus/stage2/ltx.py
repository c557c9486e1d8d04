"""What stage 2 needs to know about LTX-Video's transformer (`LTXVideoTransformer3DModel`): the same roles as
`wan.py` for a model that takes packed tokens `[B, L, C]` and applies its rotary embedding over the whole key
(not per head), with the text padding mask as an additive cross-attention bias.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .wan import scatter_tokens, select_rotary, select_timestep  # noqa: F401 - the same on packed tokens


def token_modules(transformer) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    return transformer.proj_in, transformer.rope, transformer.proj_out


def select_tokens(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The input projection's `[B, L, D]` cut to the region's tokens."""
    return output.index_select(1, index)


def cross_attention_bias(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """TGAA: the bias `[T]` added to the text mask's bias `[B, 1, T]` the block passes as `attention_mask`."""
    mask = kwargs.get("attention_mask")
    bias = bias.view(1, 1, -1).to(args[0].dtype)
    return args, {**kwargs, "attention_mask": bias if mask is None else mask + bias}


def self_attention_inputs(args: tuple, kwargs: dict):
    """(hidden_states, rotary_emb) of an `LTXAttention` call (the block passes them by name)."""
    names = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    return bound["hidden_states"], bound.get("image_rotary_emb")


def first_of(rotary_emb):
    return tuple(freqs[0] for freqs in rotary_emb)


def self_attention_modules(transformer) -> list:
    return [block.attn1 for block in transformer.transformer_blocks]


def cross_attention_modules(transformer) -> list:
    return [block.attn2 for block in transformer.transformer_blocks]


def key_value_modules(attn) -> tuple[torch.nn.Module, torch.nn.Module]:
    return attn.norm_k, attn.to_v


def apply_rotary_emb(x: torch.Tensor, freqs) -> torch.Tensor:
    """LTX's rotary embedding over the last dimension, op for op as in the model (recorded keys equal its own)."""
    cos, sin = freqs
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def rotate_keys(keys: torch.Tensor, heads: int, rotary_emb) -> torch.Tensor:
    """Recorded normed keys `[..., L, D]` -> the keys the attention used."""
    return apply_rotary_emb(keys, rotary_emb)


def region_self_attention(attn, hidden_states, rotary_emb, token_index, context_keys, context_values):
    """As `wan.region_self_attention`: the region's queries over every token's keys and values, the others' from
    the source (`context_*`: `[L, D]`, keys rotated)."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key = apply_rotary_emb(query, rotary_emb), apply_rotary_emb(key, rotary_emb)
    full_key = context_keys.to(key)[None].index_copy(1, token_index, key)
    full_value = context_values.to(value)[None].index_copy(1, token_index, value)
    out = dispatch_attention_fn(
        query.unflatten(2, (attn.heads, -1)),
        full_key.unflatten(2, (attn.heads, -1)),
        full_value.unflatten(2, (attn.heads, -1)),
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        backend=getattr(attn.processor, "_attention_backend", None),
    )
    out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
    return out, full_key, full_value


def transformer_flops(transformer, num_tokens: int, text_tokens: int, query_tokens: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of one `LTXVideoTransformer3DModel` call over `num_tokens` latent tokens of which
    `query_tokens` are computed (all by default); matches torch's FlopCounterMode (tested)."""
    cfg = transformer.config
    lq = num_tokens if query_tokens is None else query_tokens
    d = cfg.num_attention_heads * cfg.attention_head_dim
    cross = cfg.cross_attention_dim
    macs = num_tokens * cfg.in_channels * d  # input projection (before the region is cut)
    macs += 256 * d + d * d + d * 6 * d  # timestep embedding and its adaptive-norm projection
    macs += text_tokens * (cfg.caption_channels * d + d * d)  # caption projection
    per_block = (
        4 * lq * d * d  # self-attention q, k, v, out
        + 2 * lq * num_tokens * d  # self-attention scores and weighted values
        + 2 * lq * d * d  # cross-attention q, out
        + 2 * text_tokens * cross * d  # cross-attention k, v
        + 2 * lq * text_tokens * d  # cross-attention scores and weighted values
        + 2 * lq * d * 4 * d  # feed-forward (4x inner width)
    )
    macs += cfg.num_layers * per_block
    macs += lq * d * cfg.out_channels  # output projection
    return 2 * macs
