"""Prompt embedders: unit vectors, paraphrases closer than edits, and each pluggable kind loads offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chorus.embed import CLIPTextEmbedder, TextEncoderEmbedder, make_embedder


def test_minilm_embeddings_are_unit_vectors_and_rank_near_duplicates_first(embedder):
    vectors = embedder.embed(["a red circle moving left", "a red circle moving left.", "a blue square rising"])
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.95 > sims[0, 2]


def test_pipeline_text_encoder_embedder_shares_the_conditioning_pass(tiny_adapter, embedder):
    # The tiny pipeline's text encoder is MiniLM: pooling its conditioning states gives the sentence embedding.
    emb = TextEncoderEmbedder(tiny_adapter)
    texts = ["a red circle", "a crimson ball drifting leftward on a white background"]
    vectors = emb.embed(texts)
    assert vectors.shape == (2, emb.dim) == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose((vectors * embedder.embed(texts)).sum(1), 1.0, atol=1e-5)

    passes = []
    handle = tiny_adapter.text_encoder.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        prompt = "a green triangle sliding to the right"
        emb.embed([prompt])
        conditioning = tiny_adapter.encode_prompt(prompt, None, 1.0, tiny_adapter.defaults.max_sequence_length)
    finally:
        handle.remove()
    assert len(passes) == 1  # one encoder pass served retrieval and conditioning
    assert torch.equal(
        conditioning.cond, tiny_adapter.encode_texts([prompt], tiny_adapter.defaults.max_sequence_length)
    )


def test_clip_text_embedder_from_a_local_directory(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from chorus.models.loading import load_minilm

    tokenizer, _ = load_minilm()  # any local tokenizer works for a randomly initialised text tower
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
        max_position_embeddings=64,
        eos_token_id=tokenizer.sep_token_id,
    )
    CLIPTextModelWithProjection(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    emb = make_embedder(f"clip:{tmp_path}")
    assert isinstance(emb, CLIPTextEmbedder) and emb.dim == 16
    vectors = emb.embed(["a red circle", "a blue square"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_unknown_embedder_is_refused():
    with pytest.raises(ValueError, match="embedder"):
        make_embedder("word2vec")
    with pytest.raises(ValueError, match="adapter"):
        make_embedder("text-encoder")
