"""The model adapter: everything the engine needs from a video DiT, and nothing more.

The engine owns the denoising loop; an adapter supplies its parts (prompt encoding, initial latents, one
transformer prediction, the scheduler and its step, the clean latent a prediction implies, decoding). Latents are
always `[B, C, F, H, W]` in the engine; a family whose transformer wants another layout (packed tokens, frames before
channels) converts inside its adapter. This class is the Wan layout (Wan 2.1 and 2.2 pipelines, the built-in
pixel-space model) with a flow-matching scheduler; the other families (`hunyuan`, `ltx`, `cogvideox`) subclass
its `PipelineAdapter`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor

from .device import dtype_name


@dataclass(frozen=True)
class ModelDefaults:
    """Generation settings used when a request does not give its own."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str = ""
    max_sequence_length: int = 512


# What the transformer outputs: "flow" the velocity `noise - x0` (Wan), "sample" the clean latents x0 (the built-in
# pixel model: a small model learns clean images far more easily than pixel noise, see its model card).
PREDICTION_TYPES = ("flow", "sample")


@dataclass
class PromptEmbeds:
    """Text conditioning for one request: [1, T, C] hidden states, plus the negative ones under CFG."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    tokens: list[str] = field(default_factory=list)  # the encoder's tokens of the cleaned prompt, in order
    # Further transformer arguments per branch (attention masks, pooled embeddings) for the families that take them.
    cond_kwargs: dict = field(default_factory=dict)
    uncond_kwargs: dict = field(default_factory=dict)


class FlowVideoDiTAdapter:
    """A Wan-architecture video DiT with its text encoder, flow-matching scheduler and codec."""

    # The family's name in signatures, reports and the server's model list (`loading.FAMILIES`).
    family = "wan2.1"

    def __init__(
        self,
        *,
        name: str,
        transformer,
        scheduler,
        tokenizer,
        text_encoder,
        codec,
        defaults: ModelDefaults,
        device: str | torch.device = "cpu",
        text_encoder_is_minilm: bool = False,
        prediction_type: str = "flow",
        family: str | None = None,
    ):
        self.name = name
        self.family = family or type(self).family
        self.transformer = transformer.eval()
        self.scheduler_config = scheduler.config
        self.scheduler_class = type(scheduler)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.codec = codec
        self.defaults = defaults
        self.device = torch.device(device)
        self.text_encoder_is_minilm = text_encoder_is_minilm  # the retrieval embedder's model: share its pass
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        self.text_memo_bytes = 64 << 20
        self._text_memo: OrderedDict[tuple, torch.Tensor | tuple] = OrderedDict()
        self._text_memo_bytes = 0

    # ---- description ------------------------------------------------------------------------------------

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        # diffusers' `dtype` walks every module (milliseconds per request on the built-in model): read it once
        if getattr(self, "_dtype_of", None) is not self.transformer:
            self._dtype_of, self._dtype = self.transformer, self.transformer.dtype
        return self._dtype

    @property
    def transformers(self) -> tuple:
        """Every transformer a step may run (two for Wan 2.2 A14B's experts); `expert_at` picks one."""
        return (self.transformer,)

    def expert_at(self, step_index: int, t) -> int:
        """Which of `transformers` runs the step at timestep `t`."""
        return 0

    @property
    def text_tokens(self) -> int:
        """Text tokens the transformer attends to (for FLOP counts)."""
        return self.defaults.max_sequence_length

    def _identity_extra(self) -> dict:
        """What else besides the transformers' configs shapes this family's latents (e.g. Wan 2.2's boundary)."""
        return {}

    def identity(self) -> dict:
        """What makes two adapters produce the same latents: part of every cache signature. The dtype is in it (a
        bfloat16 trajectory is not a float32 one); the device is not (the same model gives the same video, up to
        rounding, on any device, and a cache moves between machines)."""
        configs = [dict(t.config) for t in self.transformers]
        blob = json.dumps(
            {
                "transformer": configs[0] if len(configs) == 1 else configs,
                "codec": type(self.codec).__name__,
                "prediction_type": self.prediction_type,
                **self._identity_extra(),
            },
            sort_keys=True,
            default=str,
        )
        return {
            "model": self.name,
            "family": self.family,
            "dtype": dtype_name(self.dtype),
            "model_config": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "scheduler": self.scheduler_class.__name__,
            "scheduler_config": hashlib.sha256(
                json.dumps(dict(self.scheduler_config), sort_keys=True, default=str).encode()
            ).hexdigest()[:16],
        }

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        s = self.codec.scale_spatial
        return (
            1,
            self.transformer.config.in_channels,
            self.codec.latent_frames(num_frames),
            height // s,
            width // s,
        )

    # ---- the parts of a denoising loop ------------------------------------------------------------------

    def new_scheduler(self):
        """A fresh scheduler per request: schedulers carry per-run state (step index, multistep history)."""
        return self.scheduler_class.from_config(self.scheduler_config)

    def scheduler_for(self, num_steps: int, latent_shape) -> object:
        """A fresh scheduler with its timesteps set as the family's pipeline sets them."""
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(num_steps, device=self.device)
        return scheduler

    # The scheduler-specific parts of the loop, here for flow matching (the model output is a velocity, the latent
    # at noise level sigma is (1 - sigma) * x0 + sigma * noise). A DDIM family (CogVideoX) overrides these four.

    def noise_level(self, scheduler, i: int) -> float:
        """The noise level of step i (diffusers' cache context passes it to intra-request caches)."""
        return float(scheduler.sigmas[i])

    def predicted_clean(self, scheduler, i: int, latents: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The clean latent x0 that the model output at step i implies (what the planner compares)."""
        return latents - scheduler.sigmas[i].to(latents) * output

    def output_towards(self, scheduler, i: int, latents: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """The model output that takes step i from `latents` to `following` (a reused step replays the source)."""
        return (following - latents) / (scheduler.sigmas[i + 1] - scheduler.sigmas[i]).to(latents)

    def step(self, scheduler, i: int, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return scheduler.step(output, scheduler.timesteps[i], latents, return_dict=False)[0]

    def token_count(self, prompt: str, max_sequence_length: int) -> int:
        """How many encoder tokens (specials included) of the prompt the model sees."""
        ids = self.tokenizer(prompt_clean(prompt), truncation=True, max_length=max_sequence_length)["input_ids"]
        return len(ids)

    def tokens(self, prompt: str) -> list[str]:
        ids = self.tokenizer(prompt_clean(prompt), add_special_tokens=True)["input_ids"]
        return self.tokenizer.convert_ids_to_tokens(ids)

    def encode_texts(self, texts: list[str], max_sequence_length: int) -> torch.Tensor:
        """[len(texts), T, C] text hidden states, exactly `WanPipeline._get_t5_prompt_embeds`: encode padded,
        cut each row to its true length, zero-pad back (also used batched by training).

        Single prompts are memoised (byte-bounded LRU): a request's prompt is encoded once for retrieval and
        conditioning, and stage 2's source prompt and repeated negative prompts cost nothing."""
        if len(texts) != 1:
            return self._encode_texts(texts, max_sequence_length)
        return self._memoised((texts[0], max_sequence_length), lambda: self._encode_texts(texts, max_sequence_length))

    def _memoised(self, key, compute):
        """`compute()` (a tensor or a tuple of tensors), kept in the byte-bounded LRU under `key`."""
        hit = self._text_memo.get(key)
        if hit is not None:
            self._text_memo.move_to_end(key)
            return hit
        value = compute()
        self._text_memo[key] = value
        self._text_memo_bytes += _nbytes(value)
        while self._text_memo_bytes > self.text_memo_bytes and len(self._text_memo) > 1:
            _, old = self._text_memo.popitem(last=False)
            self._text_memo_bytes -= _nbytes(old)
        return value

    @torch.no_grad()
    def _encode_texts(self, texts: list[str], max_sequence_length: int) -> torch.Tensor:
        inputs = self.tokenizer(
            [prompt_clean(t) for t in texts],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask
        lengths = mask.gt(0).sum(dim=1).tolist()
        hidden = self.text_encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state
        rows = [
            torch.cat([h[:n], h.new_zeros(max_sequence_length - n, h.size(1))])
            for h, n in zip(hidden, lengths, strict=True)
        ]
        return torch.stack(rows).to(self.dtype)

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None, guidance_scale: float, max_sequence_length: int
    ) -> PromptEmbeds:
        cond = self.encode_texts([prompt], max_sequence_length)
        uncond = self.encode_texts([negative_prompt or ""], max_sequence_length) if guidance_scale > 1.0 else None
        return PromptEmbeds(cond=cond, uncond=uncond, tokens=self.tokens(prompt))

    def initial_latents(self, height: int, width: int, num_frames: int, seed: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = self.latent_shape(height, width, num_frames)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        *,
        step_index: int,
        sigma: float,
        num_steps: int,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """One denoising prediction, as the output the scheduler steps with (a velocity under flow matching): a
        transformer call (two under classifier-free guidance), on the expert that runs this step."""
        transformer = self.transformers[self.expert_at(step_index, t)]
        context = {"step_index": step_index, "sigma": sigma, "num_inference_steps": num_steps}

        def call(branch: str, text: torch.Tensor, extra: dict) -> torch.Tensor:
            with transformer.cache_context(branch, **context):
                return self._forward(transformer, latents, t, text, extra, attention_kwargs)

        output = call("cond", embeds.cond, embeds.cond_kwargs)
        if embeds.uncond is not None:
            output_uncond = call("uncond", embeds.uncond, embeds.uncond_kwargs)
            output = output_uncond + guidance_scale * (output - output_uncond)
        if self.prediction_type == "sample":  # x0 -> velocity; stable down to the last step (see Euler's update)
            output = (latents - output.float()) / sigma
        return output

    def _forward(self, transformer, latents, t, text, extra: dict, attention_kwargs) -> torch.Tensor:
        """One transformer call on `[B, C, F, H, W]` latents; the output in the same layout."""
        return transformer(
            hidden_states=latents.to(self.dtype),
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=text,
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **extra,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> frames [F, H, W, 3] float32 in [0, 1] (batch of one)."""
        return self.codec.decode(latents)[0]

    def describe(self) -> dict:
        return {**self.identity(), "defaults": asdict(self.defaults), "device": str(self.device)}


def _nbytes(value) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PipelineAdapter(FlowVideoDiTAdapter):
    """An adapter built from a loaded diffusers pipeline of a non-Wan family: its transformer, scheduler, text stack
    and VAE (a `LatentGrid` at the VAE's compression ratios). Subclasses convert layouts and conditioning."""

    def __init__(self, pipe, *, name: str, device, defaults: ModelDefaults, spatial: int, temporal: int, **kwargs):
        from .codecs import LatentGrid

        grid = LatentGrid(pipe.vae, spatial, temporal, pipe.vae.config.latent_channels)
        super().__init__(
            name=name,
            transformer=pipe.transformer,
            scheduler=pipe.scheduler,
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            codec=grid,
            defaults=defaults,
            device=device,
            **kwargs,
        )
        self.pipe = pipe

    @property
    def patch_size(self) -> tuple[int, int, int]:
        cfg = self.transformer.config
        return (getattr(cfg, "patch_size_t", None) or 1, cfg.patch_size, cfg.patch_size)
