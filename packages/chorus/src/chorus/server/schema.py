"""The OpenAI Videos API shape: parsing and checking `POST /v1/videos` bodies, and rendering video objects.

Duration: `seconds` (a number, given as a string as OpenAI does, e.g. "2" or "0.5") maps to the smallest frame
count the model accepts that is at least `seconds * fps` (a model whose codec compresses time by 4 takes 1 + 4k
frames, so 5 s at 16 fps is Wan's usual 81 frames). The result may be at most the model's default frame count:
longer durations are refused. `size` is "WIDTHxHEIGHT"; the model must take it (`adapter.check_size`) and it may
have at most as many pixels as the model's default size. Everything refused here is refused before anything is
written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..engine import CACHE_POLICIES, MAX_PROMPT_CHARS

MAX_SEED = 2**63 - 1
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
OPENAI_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
CHORUS_FIELDS = ("seed", "steps", "cache_policy", "guidance_scale", "negative_prompt")
ALL_FIELDS = OPENAI_FIELDS + CHORUS_FIELDS


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ModelLimits:
    """What the served model can make, derived from its adapter."""

    model_id: str
    aliases: tuple[str, ...]
    fps: int
    default_height: int
    default_width: int
    default_frames: int
    default_steps: int
    default_guidance: float
    frame_step: int  # valid frame counts are 1 + k * frame_step

    @classmethod
    def from_engine(cls, engine, model_id: str, fps: int) -> ModelLimits:
        d = engine.adapter.defaults
        return cls(
            model_id=model_id,
            aliases=tuple(dict.fromkeys((model_id, engine.adapter.name, "chorus"))),
            fps=fps,
            default_height=d.height,
            default_width=d.width,
            default_frames=d.num_frames,
            default_steps=d.num_inference_steps,
            default_guidance=d.guidance_scale,
            frame_step=engine.adapter.codec.scale_temporal,
        )

    @property
    def max_pixels(self) -> int:
        return self.default_height * self.default_width

    @property
    def default_seconds(self) -> str:
        return format_seconds(self.default_frames / self.fps)

    @property
    def max_seconds(self) -> float:
        return self.default_frames / self.fps

    def frames_for(self, seconds: float) -> int:
        wanted = max(1, math.ceil(seconds * self.fps - 1e-9))
        return 1 + math.ceil((wanted - 1) / self.frame_step) * self.frame_step

    def describe(self) -> dict:
        return {
            "model": self.model_id,
            "fps": self.fps,
            "default_size": f"{self.default_width}x{self.default_height}",
            "default_seconds": self.default_seconds,
            "max_seconds": self.max_seconds,
            "max_pixels": self.max_pixels,
            "default_steps": self.default_steps,
            "max_steps": MAX_STEPS,
            "default_guidance_scale": self.default_guidance,
            "frame_step": self.frame_step,
            "cache_policies": list(CACHE_POLICIES),
        }


@dataclass(frozen=True)
class CreateVideo:
    """A checked `POST /v1/videos` request, every default filled in."""

    prompt: str
    model: str
    seconds: str
    size: str
    width: int
    height: int
    num_frames: int
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    cache_policy: str

    def engine_params(self) -> dict:
        """Keyword arguments for `ChorusEngine.generate` (besides the prompt)."""
        return {
            "seed": self.seed,
            "num_inference_steps": self.steps,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "cache_policy": self.cache_policy,
        }


def format_seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def parse_create(body: dict, limits: ModelLimits, check_size) -> CreateVideo:
    """Check a create body (from JSON or a form); raise ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object or a form", "invalid_body")
    for name in body:
        if name not in ALL_FIELDS:
            raise bad(
                name,
                f"Unrecognized request argument supplied: {name} (accepted: {', '.join(ALL_FIELDS)})",
                "unknown_parameter",
            )
    values = {k: v for k, v in body.items() if v is not None}
    if "input_reference" in values:
        raise bad("input_reference", "input_reference is not supported by this server", "unsupported_parameter")

    prompt = values.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad("prompt", f"prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted")

    model = values.get("model", limits.model_id)
    if not isinstance(model, str) or model not in limits.aliases:
        raise bad(
            "model", f"model {model!r} is not served here; this server serves {limits.model_id!r}", "model_not_found"
        )

    seconds_value = _number(values, "seconds", float(limits.default_frames) / limits.fps)
    if not 0 < seconds_value <= limits.max_seconds + 1e-9:
        raise bad(
            "seconds",
            f"seconds={values.get('seconds')!r}: this model makes clips of more than 0 and at most "
            f"{format_seconds(limits.max_seconds)} seconds ({limits.default_frames} frames at {limits.fps} fps)",
        )
    num_frames = limits.frames_for(seconds_value)
    if num_frames > limits.default_frames:
        raise bad(
            "seconds", f"seconds={values.get('seconds')!r} needs {num_frames} frames; at most {limits.default_frames}"
        )

    size = values.get("size", f"{limits.default_width}x{limits.default_height}")
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", size) if isinstance(size, str) else None
    if match is None:
        raise bad("size", f"size={size!r}: expected WIDTHxHEIGHT, e.g. {limits.default_width}x{limits.default_height}")
    width, height = int(match[1]), int(match[2])
    if width * height > limits.max_pixels:
        raise bad(
            "size",
            f"size={size}: at most {limits.max_pixels} pixels per frame "
            f"({limits.default_width}x{limits.default_height}) for this model",
        )
    try:
        check_size(height, width, num_frames)
    except ValueError as exc:
        param = "seconds" if str(exc).startswith("num_frames") else "size"
        raise bad(param, f"{param}={values.get(param, size)!r} is not supported: {exc}") from None

    seed = _integer(values, "seed", 0, 0, MAX_SEED)
    steps = _integer(values, "steps", limits.default_steps, 1, MAX_STEPS)
    guidance = _number(values, "guidance_scale", limits.default_guidance)
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise bad("guidance_scale", f"guidance_scale={guidance}: must be between 0 and {MAX_GUIDANCE}")
    negative = values.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS):
        raise bad("negative_prompt", f"negative_prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
    cache_policy = values.get("cache_policy", "reuse")
    if cache_policy not in CACHE_POLICIES:
        raise bad("cache_policy", f"cache_policy={cache_policy!r}: expected one of {', '.join(CACHE_POLICIES)}")

    return CreateVideo(
        prompt=prompt,
        model=limits.model_id,
        seconds=format_seconds(seconds_value),
        size=f"{width}x{height}",
        width=width,
        height=height,
        num_frames=num_frames,
        seed=seed,
        steps=steps,
        guidance_scale=float(guidance),
        negative_prompt=negative,
        cache_policy=cache_policy,
    )


def _number(values: dict, name: str, default: float) -> float:
    """A finite number, given as a JSON number or as a string (forms carry only strings)."""
    if name not in values:
        return default
    raw = values[name]
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise bad(name, f"{name}={raw!r}: must be a number")
    try:
        value = float(raw)
    except ValueError:
        raise bad(name, f"{name}={raw!r}: must be a number") from None
    if not math.isfinite(value):
        raise bad(name, f"{name}={raw!r}: must be a finite number")
    return value


def _integer(values: dict, name: str, default: int, low: int, high: int) -> int:
    if name not in values:
        return default
    raw = values[name]
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and re.fullmatch(r"[+-]?[0-9]{1,20}", raw.strip()):
        value = int(raw)
    else:
        raise bad(name, f"{name}={raw!r}: must be an integer")
    if not low <= value <= high:
        raise bad(name, f"{name}={value}: must be between {low} and {high}")
    return value


def video_object(job, poll_after_ms: int | None = None) -> dict:
    """A job as an OpenAI video object, plus a `chorus` field: the request's settings and the engine's report."""
    params = job.params
    return {
        "id": job.id,
        "object": "video",
        "created_at": int(job.created_at),
        "completed_at": int(job.completed_at) if job.completed_at and job.status == "completed" else None,
        "expires_at": None,
        "error": job.error,
        "model": job.model,
        "progress": int(job.progress),
        "prompt": job.prompt,
        "remixed_from_video_id": None,
        "seconds": job.seconds,
        "size": job.size,
        "status": job.status,
        "chorus": {
            "seed": params["seed"],
            "steps": params["num_inference_steps"],
            "num_frames": params["num_frames"],
            "guidance_scale": params["guidance_scale"],
            "negative_prompt": params["negative_prompt"],
            "cache_policy": params["cache_policy"],
            "attempts": job.attempts,
            "started_at": job.started_at,
            "finished_at": job.completed_at,
            "report": job.report,
        },
    }
