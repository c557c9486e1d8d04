"""Training runs a few steps, checkpoints, resumes exactly where it stopped, and exports a loadable model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from chorus.world import prompts, train


def tiny_config(**kw) -> train.TrainConfig:
    model = train.ModelConfig(num_attention_heads=2, attention_head_dim=12, num_layers=1, ffn_dim=32, freq_dim=16)
    return train.TrainConfig(**{"batch_size": 2, "pool_size": 8, "warmup": 2, "steps": 4, "model": model, **kw})


def test_batched_encoding_matches_the_adapter():
    cfg = tiny_config()
    adapter = train.make_adapter(train.build_transformer(cfg.model), cfg)
    rng = np.random.default_rng(0)
    texts = [prompts.training_prompt(rng)[1] for _ in range(3)] + [""]
    batched = adapter.encode_texts(texts, cfg.max_sequence_length)
    one_by_one = torch.cat([adapter.encode_prompt(t, None, 1.0, cfg.max_sequence_length).cond for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_resume_and_export(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train.train(straight, tiny_config(), save_every=2, progress=False)
    assert summary["step"] == 4 and np.isfinite(summary["loss"])

    train.train(split, tiny_config(), steps=2, progress=False)
    assert torch.load(split / "checkpoint.pt", weights_only=False)["step"] == 2
    train.train(split, resume=True, steps=4, progress=False)

    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    assert b["step"] == 4
    for key, value in a["model"].items():  # seeded: the resumed run is the uninterrupted one
        torch.testing.assert_close(b["model"][key], value)
    with (split / "loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]

    out = train.export(split, tmp_path / "model")
    chorus_json = json.loads((out / "chorus.json").read_text())
    assert chorus_json["kind"] == "builtin-pixel-wan" and chorus_json["default_steps"] == 4
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    from chorus.models import load_adapter

    adapter = load_adapter(out)
    assert adapter.transformer.config.in_channels == 3 and adapter.transformer.config.text_dim == 384
    latents = adapter.initial_latents(32, 32, 8, seed=0)
    assert latents.shape == (1, 3, 8, 32, 32)

    # the model predicts x0; the adapter hands the scheduler the velocity (x_t - x0) / sigma
    assert chorus_json["prediction_type"] == adapter.prediction_type == "sample"
    embeds = adapter.encode_prompt("a red circle moving left on a white background", None, 1.0, 40)
    t, sigma = torch.tensor([700.0]), 0.7
    velocity = adapter.predict(latents, t, embeds, 1.0, step_index=0, sigma=sigma, num_steps=4)
    with torch.no_grad():
        x0 = adapter.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds.cond)[0]
    torch.testing.assert_close(velocity, (latents - x0) / sigma)


def test_identity_init_makes_the_model_pass_its_input_through():
    torch.manual_seed(0)
    model = train.build_transformer(train.ModelConfig(num_layers=1, identity_init=True)).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 40, 384))[0]
    assert (out - x).pow(2).mean() < 1e-3 * x.pow(2).mean()


@pytest.mark.slow
def test_batches_do_not_depend_on_the_number_of_loader_workers(tmp_path):
    """Batch `step` is a function of (seed, step): rendering in loader processes trains the same model."""
    in_process = train.train(tmp_path / "a", tiny_config(steps=3), progress=False)
    two_workers = train.train(tmp_path / "b", tiny_config(steps=3), workers=2, progress=False)
    assert in_process["step"] == two_workers["step"] == 3
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value)


def test_pool_is_stored_compactly_and_round_trips(tmp_path):
    cfg = tiny_config()
    pool = train.Pool.build(train.make_adapter(train.build_transformer(cfg.model), cfg), cfg, progress=False)
    pool.save(tmp_path / "pool.pt")
    loaded = train.Pool.load(tmp_path / "pool.pt")
    assert loaded.items == pool.items
    dense = loaded.dense("cpu")
    assert dense.shape == (cfg.pool_size, cfg.max_sequence_length, 384)
    assert int(loaded.lengths.sum()) == loaded.tokens.shape[0] < dense.shape[0] * dense.shape[1]  # padding not stored
    adapter = train.make_adapter(train.build_transformer(cfg.model), cfg)
    direct = adapter.encode_texts([t for _, t in pool.items], cfg.max_sequence_length).half()
    torch.testing.assert_close(dense, direct, atol=0, rtol=0)
