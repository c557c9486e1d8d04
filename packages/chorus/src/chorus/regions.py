"""Stage 2's region mask: which latent tokens must change when the target prompt differs from the source's.

Two steps. `prompt_diff` aligns the two prompts word by word and maps each word explicitly to the text encoder's
tokens, giving the target tokens whose meaning the source lacks (changed or added words) and the source tokens the
target dropped. `region_mask` then asks the transformer's own cross-attention where the video attends to those
tokens, using video queries captured at the first reused step (stage 1 reused them exactly, so for the target they
are the source's) against the keys of each prompt, keeps the layers and heads that localise best, thresholds,
dilates, and makes the mask consistent over frames.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

# Words whose change alone does not change what the video shows.
STOPWORDS = frozenset(
    ["a", "an", "the", "of", "on", "in", "at", "to", "and", "with", "is", "are", "its", "it", "this", "that"]
)
WORD = re.compile(r"\w+(?:'\w+)?")


@dataclass
class PromptTokens:
    """A prompt's words with their character spans and, explicitly, the encoder token positions of each word."""

    text: str
    words: list[str]
    word_tokens: list[list[int]]  # word index -> positions in the encoder's token sequence (specials included)

    @classmethod
    def of(cls, tokenizer, prompt: str, max_length: int) -> PromptTokens:
        text = prompt_clean(prompt)
        spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
        enc = tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, truncation=True, max_length=max_length
        )
        offsets = enc["offset_mapping"]
        word_tokens = [
            [i for i, (ts, te) in enumerate(offsets) if te > ts and ts < end and te > start] for start, end in spans
        ]
        return cls(text, [text[s:e].lower() for s, e in spans], word_tokens)


@dataclass
class PromptDiff:
    source: PromptTokens
    target: PromptTokens
    changed_words: list[int] = field(default_factory=list)  # target words the source lacks
    dropped_words: list[int] = field(default_factory=list)  # source words the target lacks

    @property
    def changed_tokens(self) -> list[int]:
        return sorted({t for w in self.changed_words for t in self.target.word_tokens[w]})

    @property
    def dropped_tokens(self) -> list[int]:
        return sorted({t for w in self.dropped_words for t in self.source.word_tokens[w]})

    @property
    def is_empty(self) -> bool:
        return not self.changed_tokens and not self.dropped_tokens

    def describe(self) -> dict:
        return {
            "changed": [self.target.words[w] for w in self.changed_words],
            "dropped": [self.source.words[w] for w in self.dropped_words],
        }


def prompt_diff(tokenizer, source: str, target: str, max_length: int = 512) -> PromptDiff:
    """Word-level alignment (difflib over the word sequences, so reordered words count as changed)."""
    src, tgt = PromptTokens.of(tokenizer, source, max_length), PromptTokens.of(tokenizer, target, max_length)
    diff = PromptDiff(src, tgt)
    matcher = difflib.SequenceMatcher(None, src.words, tgt.words, autojunk=False)
    for op, s0, s1, t0, t1 in matcher.get_opcodes():
        if op in ("replace", "insert"):
            diff.changed_words += [w for w in range(t0, t1) if tgt.words[w] not in STOPWORDS]
        if op in ("replace", "delete"):
            diff.dropped_words += [w for w in range(s0, s1) if src.words[w] not in STOPWORDS]
    return diff


@dataclass(frozen=True)
class MaskConfig:
    top_fraction: float = 0.5  # share of (layer, head) maps kept: the most concentrated ones
    threshold: float = 0.5  # of the aggregated map's maximum
    dilate: int = 1  # spatial dilation radius, in latent tokens
    temporal_window: int = 1  # a token is in the mask if it is in any frame within this distance


def attention_scores(queries: list[torch.Tensor], keys: list[torch.Tensor], tokens: list[int], top_fraction: float):
    """How strongly each video token attends to `tokens`: [L] in [0, 1], from the best-localising maps.

    queries[l]: [L, H, hd] video queries of layer l; keys[l]: [T, H, hd] text keys of layer l.
    """
    maps = []
    for q, k in zip(queries, keys, strict=True):
        scale = q.shape[-1] ** -0.5
        probs = torch.einsum("lhd,thd->hlt", q.float(), k.float()).mul(scale).softmax(-1)  # [H, L, T]
        maps.append(probs[:, :, tokens].sum(-1))  # [H, L]
    maps = torch.cat(maps)  # [layers * heads, L]
    spatial = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(spatial * spatial.clamp_min(1e-12).log()).sum(-1)  # low entropy: the map points somewhere
    keep = entropy.argsort()[: max(1, round(top_fraction * len(maps)))]
    chosen = maps[keep] / maps[keep].amax(-1, keepdim=True).clamp_min(1e-12)
    score = chosen.mean(0)
    return score / score.max().clamp_min(1e-12)


def region_mask(
    grid: tuple[int, int, int],
    diff: PromptDiff,
    queries: list[torch.Tensor],
    target_keys: list[torch.Tensor],
    source_keys: list[torch.Tensor],
    config: MaskConfig = MaskConfig(),
) -> torch.Tensor:
    """A bool mask over the latent token grid (frames, height, width) of what must be recomputed."""
    score = torch.zeros(grid).flatten()
    if diff.changed_tokens:
        score = torch.maximum(score, attention_scores(queries, target_keys, diff.changed_tokens, config.top_fraction))
    if diff.dropped_tokens:
        score = torch.maximum(score, attention_scores(queries, source_keys, diff.dropped_tokens, config.top_fraction))
    if diff.is_empty:
        return torch.zeros(grid, dtype=torch.bool)
    mask = (score >= config.threshold).float().view(1, 1, *grid)
    r, w = config.dilate, config.temporal_window
    mask = F.max_pool3d(mask, kernel_size=(2 * w + 1, 2 * r + 1, 2 * r + 1), stride=1, padding=(w, r, r))
    return mask[0, 0] > 0
