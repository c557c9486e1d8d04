"""The one request model: what a generation request may ask for, checked in one place for the CLI, the engine and
the server.

`GenerationRequest` carries the fields of `ChorusEngine.generate` (diffusers' names); its bounds hold whatever the
model. `ModelLimits` adds what depends on the model (sizes its codec and patches take, at most its default frame
count and pixels) and fills in the model's defaults. The server's body (`chorus.server.schema.CreateVideoBody`)
shares the fields it has in common with the engine's through `RequestFields`. Every refusal is a `RequestError`
naming the field, raised before anything is computed or stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from .models import ModelDefaults

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
MAX_STEPS = 200  # a cap on one request's work, the same for every caller
MAX_GUIDANCE = 50.0
CachePolicy = Literal["reuse", "refresh", "off"]  # read+write; write only (compute in full); neither
CACHE_POLICIES = get_args(CachePolicy)


class RequestError(ValueError):
    """A refused request: `param` names the field (None for the body as a whole), `code` says why in a word."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def not_bool(value):
    # JSON's true is not 1: refuse booleans where pydantic would take them as numbers.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_type", "must be a number, not a boolean")
    return value


def finite(value):
    # Checked first: pydantic's bounds would call NaN "not greater than 0", hiding what is wrong with it.
    not_bool(value)
    try:
        number = float(value) if isinstance(value, int | float | str) else 0.0
    except ValueError:
        return value  # not a number at all: pydantic says so
    if not math.isfinite(number):
        raise PydanticCustomError("finite_number", "must be a finite number")
    return value


def _not_blank(value):
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("string_too_short", "must be a non-empty string")
    return value


Prompt = Annotated[str, BeforeValidator(_not_blank), Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Seed = Annotated[int, BeforeValidator(not_bool), Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, BeforeValidator(not_bool), Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, BeforeValidator(finite), Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]
Pixels = Annotated[int, BeforeValidator(not_bool), Field(ge=1)]


class RequestFields(BaseModel):
    """The fields the engine's request and the server's body both have, with the same bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt
    negative_prompt: NegativePrompt | None = None
    seed: Seed = 0
    guidance_scale: Guidance | None = None
    cache_policy: CachePolicy = "reuse"


class GenerationRequest(RequestFields):
    """`ChorusEngine.generate`'s arguments; None means the model's default (see `ModelLimits.complete`)."""

    num_inference_steps: Steps | None = None
    height: Pixels | None = None
    width: Pixels | None = None
    num_frames: Pixels | None = None

    @classmethod
    def parse(cls, **fields) -> GenerationRequest:
        return validate(cls, fields)

    @property
    def num_steps(self) -> int:  # the name the engine's loop uses
        return self.num_inference_steps


def validate(model: type[BaseModel], fields: dict):
    """`model(**fields)`, its first error as a RequestError."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise error_from(exc) from None


def error_from(exc: ValidationError) -> RequestError:
    """The error a caller should see first: an unknown field, then a missing one, then the first bad value."""
    order = {"extra_forbidden": 0, "missing": 1}
    err = min(exc.errors(), key=lambda e: order.get(e["type"], 2))
    field = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "extra_forbidden":
        return RequestError(field, f"Unrecognized request argument supplied: {field}", "unknown_parameter")
    if err["type"] == "missing":
        return RequestError(field, f"{field} is required", "missing_required_parameter")
    shown = repr(err["input"])
    shown = shown if len(shown) <= 40 else f"{shown[:30]}... ({len(err['input'])} long)"
    message = err["msg"][0].lower() + err["msg"][1:]
    if err["type"] == "literal_error":
        message = f"expected one of {', '.join(CACHE_POLICIES)}"
    code = err["type"] if err["type"] in ("unsupported_parameter",) else "invalid_value"
    return RequestError(field, f"{field}={shown}: {message}", code)


@dataclass(frozen=True)
class ModelLimits:
    """What a model takes; the same bounds for every caller of one model."""

    name: str
    defaults: ModelDefaults  # filled in where a request gives no value; also at most its frames and pixels
    size_multiple: int  # height and width are multiples of this (the codec's scale times the patch size)
    frame_step: int  # frame counts are 1 + k * frame_step (a codec that compresses time by 4 takes 1 + 4k)

    @classmethod
    def from_adapter(cls, adapter) -> ModelLimits:
        multiple = adapter.codec.scale_spatial * adapter.patch_size[1]
        return cls(adapter.name, adapter.defaults, multiple, adapter.codec.scale_temporal)

    @property
    def max_pixels(self) -> int:
        return self.defaults.height * self.defaults.width

    def frames_at_least(self, wanted: float) -> int:
        """The smallest frame count the model takes that is at least `wanted`."""
        wanted = max(1, math.ceil(wanted - 1e-9))
        return 1 + math.ceil((wanted - 1) / self.frame_step) * self.frame_step

    def complete(self, req: GenerationRequest) -> GenerationRequest:
        """`req` with the model's defaults filled in; RequestError if the model cannot make it."""
        d = self.defaults
        fields = ("negative_prompt", "guidance_scale", "num_inference_steps", "height", "width", "num_frames")
        filled = req.model_copy(update={name: getattr(d, name) for name in fields if getattr(req, name) is None})
        m = self.size_multiple
        for name in ("height", "width"):
            if getattr(filled, name) % m:
                value = getattr(filled, name)
                raise RequestError(name, f"{name}={value}: must be a positive multiple of {m} for {self.name}")
        if filled.height * filled.width > self.max_pixels:
            raise RequestError(
                "height",
                f"{filled.width}x{filled.height}: at most {self.max_pixels} pixels per frame "
                f"({d.width}x{d.height}) for {self.name}",
            )
        frames = filled.num_frames
        if (frames - 1) % self.frame_step:
            raise RequestError(
                "num_frames", f"num_frames={frames}: must be 1 + a multiple of {self.frame_step} for {self.name}"
            )
        if frames > d.num_frames:
            raise RequestError("num_frames", f"num_frames={frames}: at most {d.num_frames} for {self.name}")
        return filled
