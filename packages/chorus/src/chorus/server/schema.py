"""The OpenAI Videos API shape: the `POST /v1/videos` body, and video objects.

The body's fields are checked by the engine's request model (`chorus.request`): the same bounds as `chorus generate`
and `ChorusEngine.generate`. What is the server's own is the OpenAI names. Duration: `seconds` (a number, given as a
string as OpenAI does, e.g. "1" or "0.5") maps to the smallest frame count the model accepts that is at least
`seconds * fps` (a model whose codec compresses time by 4 takes 1 + 4k frames, so 5 s at 16 fps is Wan's usual 81
frames), at most the model's default frame count. `size` is "WIDTHxHEIGHT", at most the model's default pixels.
Everything refused here is refused before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ..request import (
    CACHE_POLICIES,
    MAX_STEPS,
    GenerationRequest,
    ModelLimits,
    RequestError,
    RequestFields,
    Steps,
    finite,
    validate,
)


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
class ServerLimits:
    """The served model's limits, under the names and the frame rate this server gives them."""

    model: ModelLimits
    model_id: str
    aliases: tuple[str, ...]
    fps: int
    placement: dict = field(default_factory=dict)  # the model's family, device and dtype

    @classmethod
    def from_engine(cls, engine, model_id: str, fps: int) -> ServerLimits:
        from ..models.device import dtype_name

        a = engine.adapter
        names = (model_id, a.name, "chorus")
        placement = {"family": a.family, "device": str(a.device), "dtype": dtype_name(a.dtype)}
        return cls(ModelLimits.from_adapter(a), model_id, tuple(dict.fromkeys(names)), fps, placement)

    @property
    def max_seconds(self) -> float:
        return self.model.defaults.num_frames / self.fps

    def describe(self) -> dict:
        d = self.model.defaults
        return {
            "model": self.model_id,
            **self.placement,
            "fps": self.fps,
            "default_size": f"{d.width}x{d.height}",
            "default_seconds": format_seconds(self.max_seconds),
            "max_seconds": self.max_seconds,
            "max_pixels": self.model.max_pixels,
            "default_steps": d.num_inference_steps,
            "max_steps": MAX_STEPS,
            "default_guidance_scale": d.guidance_scale,
            "frame_step": self.model.frame_step,
            "cache_policies": list(CACHE_POLICIES),
        }


def format_seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _size(value):
    if not isinstance(value, str) or not re.fullmatch(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}", value):
        raise PydanticCustomError("invalid_size", "expected WIDTHxHEIGHT, e.g. 832x480")
    return value


def _unsupported(value):
    if value is not None:
        raise PydanticCustomError("unsupported_parameter", "input_reference is not supported by this server")
    return value


class CreateVideoBody(RequestFields):
    """A `POST /v1/videos` body: OpenAI's fields, plus Chorus's (`RequestFields`, and `steps`)."""

    model: object = None  # checked against the served model's names in `to_request`
    seconds: Annotated[float, BeforeValidator(finite), Field(gt=0, allow_inf_nan=False)] | None = None
    size: Annotated[str, BeforeValidator(_size)] | None = None
    input_reference: Annotated[object, BeforeValidator(_unsupported)] = None
    steps: Steps | None = None

    @classmethod
    def parse(cls, fields: dict, limits: ServerLimits) -> tuple[CreateVideoBody, GenerationRequest]:
        """The body and the engine request it asks for (model defaults filled in); ApiError(400) naming the field."""
        try:
            body = validate(cls, {k: v for k, v in fields.items() if v is not None})
            return body, body.to_request(limits)
        except RequestError as exc:
            raise bad(exc.param, exc.message, exc.code) from None

    def to_request(self, limits: ServerLimits) -> GenerationRequest:
        if self.model is not None and (not isinstance(self.model, str) or self.model not in limits.aliases):
            raise RequestError(
                "model",
                f"model {self.model!r} is not served here; this server serves {limits.model_id!r}",
                "model_not_found",
            )
        m = limits.model
        num_frames = None
        if self.seconds is not None:
            if self.seconds > limits.max_seconds + 1e-9:
                raise RequestError(
                    "seconds",
                    f"seconds={self.seconds:g}: this model makes clips of at most {format_seconds(limits.max_seconds)} "
                    f"seconds ({m.defaults.num_frames} frames at {limits.fps} fps)",
                )
            num_frames = m.frames_at_least(self.seconds * limits.fps)
        width, height = (int(x) for x in self.size.split("x")) if self.size is not None else (None, None)
        request = GenerationRequest(
            **self.model_dump(include=set(RequestFields.model_fields)),
            num_inference_steps=self.steps,
            height=height,
            width=width,
            num_frames=num_frames,
        )
        try:
            return m.complete(request)
        except RequestError as exc:
            param = "seconds" if exc.param == "num_frames" else "size"
            shown = self.seconds if param == "seconds" else self.size
            raise RequestError(param, f"{param}={shown!r} is not supported: {exc.message}") from None


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
            # `chorus serve --replicas`: the replica that ran the job, and where its source's tensors were
            "replica": job.replica,
            "source_tier": (job.report or {}).get("source_tier"),
            "started_at": job.started_at,
            "finished_at": job.completed_at,
            "report": job.report,
        },
    }
