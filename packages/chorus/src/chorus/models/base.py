"""The model adapter: everything the engine needs from a flow-matching video DiT, and nothing more.

The engine owns the denoising loop; an adapter supplies its parts (prompt encoding, initial latents, one
transformer prediction, one scheduler step, decoding). The same adapter serves diffusers Wan-family pipelines and
the built-in pixel-space model: they differ only in their text encoder and their codec.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor


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


class FlowVideoDiTAdapter:
    """A Wan-architecture video DiT with its text encoder, flow-matching scheduler and codec."""

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
    ):
        self.name = name
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
        self._text_memo: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._text_memo_bytes = 0

    # ---- description ------------------------------------------------------------------------------------

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def identity(self) -> dict:
        """What makes two adapters produce the same latents: part of every cache signature."""
        blob = json.dumps(
            {
                "transformer": dict(self.transformer.config),
                "codec": type(self.codec).__name__,
                "prediction_type": self.prediction_type,
            },
            sort_keys=True,
            default=str,
        )
        return {
            "model": self.name,
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
        key = (texts[0], max_sequence_length)
        hit = self._text_memo.get(key)
        if hit is not None:
            self._text_memo.move_to_end(key)
            return hit
        encoded = self._encode_texts(texts, max_sequence_length)
        self._text_memo[key] = encoded
        self._text_memo_bytes += encoded.numel() * encoded.element_size()
        while self._text_memo_bytes > self.text_memo_bytes and len(self._text_memo) > 1:
            _, old = self._text_memo.popitem(last=False)
            self._text_memo_bytes -= old.numel() * old.element_size()
        return encoded

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
        """One denoising prediction, as the velocity the scheduler steps with: a transformer call (two under
        classifier-free guidance)."""
        model_input = latents.to(self.dtype)
        timestep = t.expand(latents.shape[0])
        context = {"step_index": step_index, "sigma": sigma, "num_inference_steps": num_steps}

        def call(branch: str, text: torch.Tensor) -> torch.Tensor:
            with self.transformer.cache_context(branch, **context):
                return self.transformer(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=text,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                )[0]

        output = call("cond", embeds.cond)
        if embeds.uncond is not None:
            output_uncond = call("uncond", embeds.uncond)
            output = output_uncond + guidance_scale * (output - output_uncond)
        if self.prediction_type == "sample":  # x0 -> velocity; stable down to the last step (see Euler's update)
            output = (latents - output.float()) / sigma
        return output

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> frames [F, H, W, 3] float32 in [0, 1] (batch of one)."""
        return self.codec.decode(latents)[0]

    def describe(self) -> dict:
        return {**self.identity(), "defaults": asdict(self.defaults), "device": str(self.device)}
