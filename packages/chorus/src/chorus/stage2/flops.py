"""FLOPs of one transformer call, for reports: exact for the families with a layout module (their formula matches
torch's FlopCounterMode, tested), an estimate from the weights for the others."""

from __future__ import annotations

from .hooks import layout_for


def transformer_flops(transformer, num_tokens: int, text_tokens: int, query_tokens: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of one call over `num_tokens` latent tokens of which `query_tokens` are computed
    (all by default), with `text_tokens` of text."""
    layout = layout_for(transformer)
    if layout is not None:
        return layout.transformer_flops(transformer, num_tokens, text_tokens, query_tokens)
    return estimated_flops(transformer, num_tokens, text_tokens)


def estimated_flops(transformer, num_tokens: int, text_tokens: int) -> int:
    """Joint-attention families (every token, text included, through the blocks' weights): 2 FLOPs per weight per
    token, plus the two attention products over all tokens in every attention layer."""
    cfg = transformer.config
    weights = sum(p.numel() for p in transformer.parameters() if p.dim() >= 2)
    tokens = num_tokens + text_tokens
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    layers = len(transformer.attn_processors)
    return 2 * weights * tokens + 4 * layers * tokens * tokens * inner
