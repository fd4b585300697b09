"""Ray Serve application: the MNIST classifier behind a FastAPI ingress, with batching and hot model reload.

This module holds the runtime settings (``user_config``), the replica's metrics, the HTTP API and the deployment;
the model itself (loading, hot reload, predictions) is Serve-free in ``ray_app.inference``, request bodies are read
by ``ray_app.multipart`` and images decoded by ``ray_app.decode``.

Usage:
    MODEL_DIR=./model serve run ray_app/serve_config.yaml     # what `make serve` runs
    curl -s -X POST -F "file=@samples/zero.png" http://localhost:8000/predict

Routes: ``POST /predict`` (multipart field ``file``; ``?include_input=1`` adds the 28x28 image the model saw),
``POST /predict/batch`` (repeated ``files`` fields), ``GET /model`` (model card), ``GET /healthz``, ``GET /``
(upload and drawing page), ``GET /docs``. Every client error is a 4xx ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from ray_app.decode import DecodeBudget, DecodeBusy, Decoder, ItemError
from ray_app.multipart import FormLimits, Part, read_form
from ray_app.preprocess import InputError, Limits

if TYPE_CHECKING:  # torch (through ray_app.inference) is imported in the replica only; see MNISTClassifier
    from ray_app.inference import ModelSlot, Prediction

# A child of Serve's logger, so messages reach the replica log files (Serve configures only "ray.serve").
log = logging.getLogger(f"ray.serve.{__name__}")

FILE_FIELD = "file"
FILES_FIELD = "files"
TOKEN_ENV = "PREDICT_TOKEN"  # when set (e.g. from a Kubernetes Secret), /predict* need this bearer token
STATIC_DIR = Path(__file__).with_name("static")


# Runtime settings (the deployment's ``user_config``)
@dataclass(frozen=True)
class Settings:
    """Knobs that ``user_config`` changes without restarting replicas."""

    max_batch_size: int = 16  # images per forward pass
    batch_wait_timeout_s: float = 0.0  # 0: batch whatever queued while the previous batch ran
    max_files: int = 64  # multipart parts per request
    max_body_bytes: int = 5 * 2**20  # request body
    max_part_header_bytes: int = 4096  # header bytes of one multipart part
    max_part_headers: int = 8  # headers of one multipart part
    body_timeout_s: float = 10.0  # time allowed to receive the request body (slow clients get 408)
    model_poll_interval_s: float = 1.0  # how often the model directory is checked for a new model
    limits: Limits = field(default_factory=Limits)  # image limits; ``limits.max_bytes`` also caps each part
    decode: DecodeBudget = field(default_factory=DecodeBudget)  # decodes at once, their time and memory
    confidence_threshold: float | None = None  # "not sure" below this top probability; None: model.json's

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> Settings:
        """Validate a ``user_config`` dict; unknown keys or bad values raise ``ValueError``."""
        values = dict(config or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown user_config keys {unknown}; known: {[f.name for f in fields(cls)]}")
        if "limits" in values:
            try:
                values["limits"] = Limits(**values["limits"])
            except TypeError as exc:
                raise ValueError(f"user_config limits: {exc}") from None
        if "decode" in values:
            values["decode"] = DecodeBudget.from_config(values["decode"])
        settings = cls(**values)
        for name in (
            "max_batch_size",
            "max_files",
            "max_body_bytes",
            "max_part_header_bytes",
            "max_part_headers",
        ):
            if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
                raise ValueError(f"user_config {name} must be an integer >= 1")
        if not 0 <= settings.batch_wait_timeout_s < 1:
            raise ValueError("user_config batch_wait_timeout_s must be in [0, 1)")
        if not (settings.body_timeout_s > 0 and settings.model_poll_interval_s > 0):
            raise ValueError("user_config body_timeout_s and model_poll_interval_s must be > 0")
        threshold = settings.confidence_threshold
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1
        ):
            raise ValueError("user_config confidence_threshold must be null or a number in [0, 1]")
        return settings

    def form_limits(self) -> FormLimits:
        """The multipart limits: an image part may hold at most ``limits.max_bytes``."""
        return FormLimits(
            max_body_bytes=self.max_body_bytes,
            max_part_bytes=min(self.limits.max_bytes, self.max_body_bytes),
            max_parts=self.max_files,
            max_header_bytes=self.max_part_header_bytes,
            max_headers=self.max_part_headers,
            timeout_s=self.body_timeout_s,
        )


def configured_token(value: str | None) -> str | None:
    """The bearer token from the ``PREDICT_TOKEN`` value, stripped (``None``: auth off); empty is refused."""
    if value is None:
        return None
    token = value.strip()
    if not token:
        raise ValueError(
            f"{TOKEN_ENV} is set but empty: set it to the token clients must send, or unset it to turn auth off"
        )
    return token


# Custom Prometheus metrics (Ray exports them with a ``ray_`` prefix, tagged with deployment and replica)
LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
_DIGIT_TAGS = [{"digit": str(d)} for d in range(10)]
_INPUT_REASONS = {413: "image_too_large", 415: "not_an_image", 422: "unusable_image"}
_REQUEST_REASONS = {
    400: "malformed_request",
    401: "unauthorized",
    408: "body_timeout",
    413: "body_too_large",
    415: "not_multipart",
    422: "wrong_fields",
}


def rejection_reason(status_code: int, detail: str, from_image: bool) -> str | None:
    """A short, bounded label for a rejected request (``None`` for wrong routes and methods, not inputs)."""
    if status_code in (404, 405):
        return None
    if from_image:
        return "no_digit" if "no digit found" in detail else _INPUT_REASONS.get(status_code, "unusable_image")
    return _REQUEST_REASONS.get(status_code, f"http_{status_code}")


class ServeMetrics:
    """The replica's own metrics; each record costs a few microseconds (a batch records at most 12 points)."""

    def __init__(self) -> None:
        self.predictions = Counter(
            "mnist_predictions", "Images classified, by predicted digit", tag_keys=("digit",)
        )
        self.preprocess_s = Histogram(
            "mnist_preprocess_seconds",
            "Upload bytes to the 28x28 model input (decode, crop, centre), per image",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.model_s = Histogram(
            "mnist_model_seconds", "Forward pass of one batch", boundaries=LATENCY_BOUNDARIES_S
        )
        self.batch_size = Histogram(
            "mnist_batch_size", "Images per forward pass", boundaries=BATCH_BOUNDARIES
        )
        self.rejected = Counter(
            "mnist_rejected_inputs", "Requests refused with a 4xx, by reason", tag_keys=("reason",)
        )

    def batch(self, digits: list[int], seconds: float) -> None:
        """Record one forward pass and its predicted digits."""
        self.model_s.observe(seconds)
        self.batch_size.observe(len(digits))
        counts = np.bincount(digits, minlength=10)
        for digit in np.flatnonzero(counts):
            self.predictions.inc(int(counts[digit]), _DIGIT_TAGS[digit])

    def reject(self, status_code: int, detail: str, from_image: bool = False) -> None:
        """Count a refused request (wrong routes and methods are not counted)."""
        reason = rejection_reason(status_code, detail, from_image)
        if reason is not None:
            self.rejected.inc(1, {"reason": reason})


# The FastAPI application
def infer(
    slot: ModelSlot, metrics: ServeMetrics, images: list[np.ndarray], threshold: float | None = None
) -> list[Prediction]:
    """One forward pass over 28x28 uint8 images with the slot's current model, recorded in the metrics;
    ``threshold`` overrides the model's "not sure" threshold."""
    model = slot.require()
    started = time.perf_counter()
    results = model.predict(images, threshold)
    metrics.batch([r.digit for r in results], time.perf_counter() - started)
    return results


class Backend(Protocol):
    """What the routes need: settings, the model slot, metrics, and an awaitable per-image classifier."""

    settings: Settings
    slot: ModelSlot
    metrics: ServeMetrics
    decoder: Decoder

    async def classify(self, image: np.ndarray) -> Prediction:
        """Classify one 28x28 uint8 image."""
        ...


_PROBS = "The ten digits' calibrated probabilities (temperature-scaled softmax), in digit order"
_CONFIDENT = (
    "false: not sure - the top probability is below the confidence threshold (user_config "
    "confidence_threshold, else the one model.json recommends); the upload may not be one clear digit"
)


class PredictionOut(BaseModel):
    """``POST /predict`` response."""

    prediction: int
    probs: list[float] = Field(description=_PROBS)
    model_version: str
    confident: bool = Field(description=_CONFIDENT)
    input_png: str | None = Field(
        None, description="Only with ?include_input=1: the 28x28 image the model saw, a base64 PNG"
    )


class ImageResult(BaseModel):
    """One image's result in a batch response."""

    prediction: int
    probs: list[float] = Field(description=_PROBS)
    confident: bool = Field(description=_CONFIDENT)


class BatchOut(BaseModel):
    """``POST /predict/batch`` response: one result per ``files`` part, in order."""

    results: list[ImageResult]
    model_version: str


class HealthOut(BaseModel):
    """``GET /healthz`` response (503 with ``detail`` when no model is loaded)."""

    status: str
    model_version: str | None = None
    detail: str | None = None


class ErrorOut(BaseModel):
    """Every error response."""

    detail: str


def _multipart_body(field_name: str, description: str) -> dict[str, Any]:
    """OpenAPI request body for a multipart upload (the routes parse the body themselves)."""
    prop: dict[str, Any] = {"type": "string", "format": "binary", "description": description}
    if field_name == FILES_FIELD:
        prop = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": description}
    schema = {"type": "object", "required": [field_name], "properties": {field_name: prop}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in {
        400: "Malformed request (empty body, broken multipart)",
        401: f"Missing or wrong bearer token (only when {TOKEN_ENV} is set)",
        408: "Body not received in time",
        413: "Body, image or part count over the limit",
        415: "Not multipart/form-data, or not a supported image format",
        422: "Missing field, undecodable or unusable image (e.g. no digit found)",
        503: "No model loaded yet",
    }.items()
}


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode a JSON response directly (no response-model validation on the hot path)."""
    content = json.dumps(body, separators=(",", ":")).encode()
    return Response(content, status, headers, media_type="application/json")


async def _decode(items: list[bytes], backend: Backend) -> list[np.ndarray]:
    """Upload bytes to the 28x28 images the model sees, within the replica's decode budget (small uploads on the
    event loop, the rest in decode worker processes); over the budget: 503 with Retry-After."""
    started = time.perf_counter()
    try:
        images = await backend.decoder.decode(items, backend.settings.limits)
    except DecodeBusy as exc:
        retry = str(backend.settings.decode.retry_after_s)
        raise HTTPException(503, f"{exc}", {"Retry-After": retry}) from None
    seconds = (time.perf_counter() - started) / len(images)
    for _ in images:
        backend.metrics.preprocess_s.observe(seconds)
    return images


def png_base64(image: np.ndarray) -> str:
    """A uint8 grayscale image as a base64 PNG (about 0.4 KB for 28x28)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _wants_input(request: Request) -> bool:
    """``?include_input=1`` (or ``true``) on the URL; a request without a query string costs one lookup."""
    if not request.scope.get("query_string"):
        return False
    return request.query_params.get("include_input", "").lower() in ("1", "true", "yes")


_HINTS = {
    FILE_FIELD: "send the image as -F file=@digit.png",
    FILES_FIELD: "send -F files=@a.png -F files=@b.png",
}


def _require_token(request: Request, token: str | None) -> None:
    """401 unless ``Authorization: Bearer <token>`` matches ``token`` (``None``: no auth)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token: send Authorization: Bearer <token>",
            {"WWW-Authenticate": "Bearer"},
        )


def build_api(backend: Backend, token: str | None = None) -> FastAPI:
    """The HTTP API over ``backend``: routes, the upload page and JSON error handlers.

    With ``token`` (stripped; empty is refused), ``/predict``, ``/predict/batch`` and ``/model`` require it as
    a bearer token; ``/healthz`` and the page stay open.
    """
    token = configured_token(token)
    api = FastAPI(
        title="MNIST digit classifier",
        summary="Upload an image of a handwritten digit; get the digit and the ten class probabilities.",
        version="1.0",
        redoc_url=None,
        # FastAPI's native OpenTelemetry hooks check global providers on every request; Serve traces instead
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    index_html = (STATIC_DIR / "index.html").read_bytes()
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    async def open_upload(request: Request, field_name: str) -> list[Part]:
        """The opening both predict routes share: token, body within the limits, the field, a loaded model."""
        _require_token(request, token)
        form = await read_form(request, field_name, backend.settings.form_limits())
        if not form.parts:
            got = sorted(set(form.names))
            raise HTTPException(
                422,
                f"missing multipart field '{field_name}' (got {got or 'no fields'}); {_HINTS[field_name]}",
            )
        backend.slot.require()
        return form.parts

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @api.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    async def healthz() -> Response:
        """200 when a model is loaded and warmed up; 503 with the reason otherwise."""
        status, body = backend.slot.health()
        return _json(body, status)

    @api.get("/model", responses={503: {"model": ErrorOut}})
    async def model_card(request: Request) -> Response:
        """The served model's card from its model.json: version, test accuracy (overall and per digit), when
        and how it was trained."""
        _require_token(request, token)
        return _json(backend.slot.require().card)

    @api.post(
        "/predict",
        response_model=PredictionOut,
        responses=_ERRORS,
        openapi_extra=_multipart_body(FILE_FIELD, "PNG, JPEG, GIF, BMP or WebP image of one digit"),
    )
    async def predict(request: Request) -> Response:
        """Classify one uploaded image (multipart field `file`)."""
        files = await open_upload(request, FILE_FIELD)
        if len(files) > 1:
            raise HTTPException(
                422, f"{len(files)} '{FILE_FIELD}' fields; use POST /predict/batch with '{FILES_FIELD}'"
            )
        (image,) = await _decode([files[0].data], backend)
        result = await backend.classify(image)
        body = {
            "prediction": result.digit,
            "probs": result.probs,
            "model_version": result.model_version,
            "confident": result.confident,
        }
        if _wants_input(request):
            body["input_png"] = png_base64(image)
        return _json(body)

    @api.post(
        "/predict/batch",
        response_model=BatchOut,
        responses=_ERRORS,
        openapi_extra=_multipart_body(FILES_FIELD, "one or more images, one digit each"),
    )
    async def predict_batch(request: Request) -> Response:
        """Classify several images (repeated multipart field `files`); results come in upload order."""
        files = await open_upload(request, FILES_FIELD)
        try:
            images = await _decode([part.data for part in files], backend)
        except ItemError as exc:  # name the part that was refused
            name = f" ({files[exc.index].filename})" if files[exc.index].filename else ""
            raise InputError(exc.status_code, f"files[{exc.index}]{name}: {exc.detail}") from None
        threshold = backend.settings.confidence_threshold
        results = infer(backend.slot, backend.metrics, images, threshold)  # already a batch: one forward pass
        return _json(
            {
                "results": [
                    {"prediction": r.digit, "probs": r.probs, "confident": r.confident} for r in results
                ],
                "model_version": results[0].model_version,
            }
        )

    _add_error_handlers(api, backend.metrics)
    return api


def _add_error_handlers(api: FastAPI, metrics: ServeMetrics) -> None:
    """Render every error as ``{"detail": "<what was wrong>"}`` and count the refused inputs."""
    from ray_app.inference import ModelUnavailable  # torch: see MNISTClassifier

    @api.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> Response:
        metrics.reject(exc.status_code, exc.detail, from_image=True)
        return _json({"detail": exc.detail}, exc.status_code)

    @api.exception_handler(ModelUnavailable)
    async def unavailable(_: Request, exc: ModelUnavailable) -> Response:
        return _json({"detail": f"model not loaded: {exc}"}, 503, {"Retry-After": "2"})

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            detail = f"method {request.method} not allowed on {request.url.path}; use {allowed}"
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs"
        else:
            metrics.reject(exc.status_code, str(detail))
        return _json({"detail": detail}, exc.status_code, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _json({"detail": f"invalid request: {problems}"}, 422)


# The Serve deployment
def _replica_cpus() -> int:
    """Whole CPUs Ray reserved for this replica (at least 1): the torch thread count."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class MNISTClassifier:
    """One replica: the model from ``MODEL_DIR`` (hot-reloaded), batched inference, the HTTP API.

    A replica without a usable model stays up (healthy to Serve) and answers 503 with the reason until a
    model appears; ``check_health`` fails only if the replica itself is broken.
    """

    async def __init__(self) -> None:
        # torch, the network and the model slot are imported here, not with this module: Serve's build step
        # imports this module in a fresh worker only to read the deployment, and torch was most of that import
        # (the build step of `serve deploy` 3.1 -> 1.9 s).
        import torch

        from ray_app.inference import ModelSlot
        from ray_app.model import DEFAULT_MODEL_DIR

        self.token = configured_token(os.environ.get(TOKEN_ENV))  # refuse to start on an empty token
        torch.set_num_threads(_replica_cpus())
        self.settings = Settings()
        self.metrics = ServeMetrics()
        self.decoder = Decoder(self.settings.decode)
        self.decoder.start()  # decode worker processes (PIL and numpy only)
        self.slot = ModelSlot(Path(os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR)))
        await asyncio.to_thread(self.slot.poll)
        self._watcher = asyncio.create_task(self._watch_model())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (batching, limits, timeouts) without a restart."""
        self.settings = Settings.from_user_config(user_config)
        self.classify.set_max_batch_size(self.settings.max_batch_size)
        self.classify.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.decoder.reconfigure(self.settings.decode)

    def __del__(self) -> None:
        """Stop the decode workers (Serve calls this when the replica shuts down)."""
        self.decoder.close()

    def check_health(self) -> None:
        """Fail only when the replica is broken (the model watcher died), not when a model is missing."""
        if self._watcher.done():
            raise RuntimeError(f"model watcher stopped: {self._watcher}")

    async def _watch_model(self) -> None:
        """Poll the model directory and swap in new versions."""
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
            try:
                await asyncio.to_thread(self.slot.poll)
            except Exception:  # never let a surprise end the watcher; the next poll retries
                log.exception("model poll failed")

    @serve.batch(max_batch_size=Settings.max_batch_size, batch_wait_timeout_s=Settings.batch_wait_timeout_s)
    async def classify(self, images: list[np.ndarray]) -> list[Prediction]:
        """Classify a batch of 28x28 uint8 images with the current model."""
        return infer(self.slot, self.metrics, images, self.settings.confidence_threshold)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Build the HTTP API inside the replica (Serve calls this after ``__init__``)."""
        return build_api(self, self.token)


app = MNISTClassifier.bind()
