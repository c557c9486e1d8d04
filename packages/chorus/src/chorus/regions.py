"""What differs between two prompts, word by word, mapped to the text encoder's token positions.

`prompt_diff` aligns the two prompts' words (difflib, so reordered words count as changed) and maps each word
explicitly to its tokens (tokenizer offsets), giving the target tokens whose meaning the source lacks (changed or
added words) and the source's words the target dropped. TGAA amplifies the attention to the changed tokens; the
report names the words.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

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
