"""Serve-free inference: the loaded model (its input normalisation, BatchNorm and calibration folded into its layers),
the model slot with hot reload, the prediction type and the model card. Nothing here knows Ray Serve or HTTP.

Usage:
    slot = ModelSlot(Path("./model")); slot.poll()              # load (and later: swap in a changed model)
    [prediction] = slot.require().predict([to_mnist(png_bytes)])  # 28x28 uint8 images -> Prediction
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ray_app.model import Artifact, ArtifactError, files_signature, load_artifact

# Named under Serve's logger, so in a replica these lines reach its log files (Serve configures only "ray.serve").
log = logging.getLogger(f"ray.serve.{__name__}")

CARD_KEYS = (  # model.json keys shown by ``GET /model`` (the history and confusion matrix stay in the file)
    "version",
    "architecture",
    "test_accuracy",
    "per_digit_accuracy",
    "created_at",
    "run_name",
    "epochs",
    "resumed_from_epochs",
    "train_images",
    "num_workers",
    "cpus_per_worker",
    "batch_size",
    "lr",
    "wall_time_s",
    "ray_version",
    "torch_version",
    "data_sha256",
    "calibration",
)
DEFAULT_THRESHOLD = 0.5  # "not sure" threshold of a model.json without calibration (older models)


class Prediction(NamedTuple):
    """One image's result."""

    digit: int
    probs: list[float]  # calibrated: softmax(logits / temperature)
    model_version: str
    confident: bool  # the top probability reached the "not sure" threshold


class ModelUnavailable(RuntimeError):
    """No model has been loaded yet; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    """A validated model with the normalisation it was trained with and its calibration folded in."""

    model: nn.Module  # uint8 pixel values in, calibrated logits (logits / temperature) out
    version: str
    card: dict[str, Any] = field(default_factory=dict)  # what ``GET /model`` shows
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); folded into ``model``
    threshold: float = DEFAULT_THRESHOLD  # calibrated top probability below which an answer is "not sure"

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> LoadedModel:
        """Wrap a loaded artifact and run a warm-up forward pass that must give finite probabilities."""
        norm = artifact.meta["normalization"]
        mean, std = float(norm["mean"]), float(norm["std"])
        temperature, threshold = _calibration(artifact.meta)
        # (pixel / 255 - mean) / std  ==  pixel * scale - shift
        model = _for_inference(artifact.model, 1.0 / (255.0 * std), mean / std, temperature)
        card = {key: artifact.meta[key] for key in CARD_KEYS if key in artifact.meta}
        version = str(artifact.meta["version"])
        loaded = cls(model, version, card, temperature=temperature, threshold=threshold)
        (warm,) = loaded.predict([np.zeros((28, 28), np.uint8)])
        if not all(np.isfinite(warm.probs)):
            raise ArtifactError(f"model {loaded.version} gives non-finite outputs")
        return loaded

    def predict(self, images: list[np.ndarray], threshold: float | None = None) -> list[Prediction]:
        """Classify 28x28 uint8 images (white ink on black) in one forward pass; an answer is confident when
        its calibrated top probability reaches ``threshold`` (None: the model's own)."""
        batch = torch.from_numpy(np.stack(images)).unsqueeze(1).float()
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch.contiguous(memory_format=torch.channels_last)), dim=1)
        top, digits = probs.max(dim=1)
        confident = (top >= (self.threshold if threshold is None else threshold)).tolist()
        return [
            Prediction(digit, [round(p, 6) for p in row], self.version, sure)
            for digit, row, sure in zip(digits.tolist(), probs.tolist(), confident, strict=True)
        ]


def _calibration(meta: dict[str, Any]) -> tuple[float, float]:
    """``(temperature, threshold)`` from ``model.json``'s ``calibration``; ``(1, DEFAULT_THRESHOLD)`` without one."""
    calibration = meta.get("calibration")
    if calibration is None:
        return 1.0, DEFAULT_THRESHOLD
    try:
        temperature = float(calibration["temperature"])
        threshold = float(calibration.get("threshold", DEFAULT_THRESHOLD))
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise ArtifactError(f"model.json: unreadable calibration {calibration!r}: {exc!r}") from None
    if not (math.isfinite(temperature) and temperature > 0 and 0 <= threshold <= 1):
        raise ArtifactError(
            f"model.json: calibration temperature {temperature} or threshold {threshold} is invalid"
        )
    return temperature, threshold


def _for_inference(
    model: nn.Module, scale: float = 1.0, shift: float = 0.0, temperature: float = 1.0
) -> nn.Module:
    """A copy of an eval-mode model made faster on CPU, with the same outputs as ``model(pixel * scale - shift)
    / temperature``: the input normalisation folded into the first convolution and the temperature into the
    last linear layer (the network's first and last layers, as in ``Net``), each BatchNorm folded into the
    convolution before it, weights in channels_last layout. A max-pool between the two commutes with the
    BatchNorm's per-channel affine map when every scale is positive; otherwise that BatchNorm stays."""
    model = copy.deepcopy(model).eval()
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i, norm in enumerate(sequence):
            if not isinstance(norm, nn.BatchNorm2d):
                continue
            j = i - 1
            while j > 0 and isinstance(sequence[j], nn.MaxPool2d):
                j -= 1
            scale_bn = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            if j >= 0 and isinstance(sequence[j], nn.Conv2d) and (j == i - 1 or bool((scale_bn > 0).all())):
                sequence[j], sequence[i] = fuse_conv_bn_eval(sequence[j], norm), nn.Identity()
    _fold_affine_input(next(m for m in model.modules() if isinstance(m, nn.Conv2d)), scale, shift)
    _fold_temperature([m for m in model.modules() if isinstance(m, nn.Linear)][-1], temperature)
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def _fold_affine_input(conv: nn.Conv2d, scale: float, shift: float) -> None:
    """Make ``conv(x)`` compute ``conv(x * scale - shift)``; exact for a convolution without padding (every
    output sees whole kernels of input), computed in float64."""
    if conv.padding not in ((0, 0), "valid"):
        raise ValueError(
            f"the first convolution must have no padding to fold the input normalisation: {conv}"
        )
    weight = conv.weight.double()
    bias = torch.zeros(conv.out_channels, dtype=torch.float64) if conv.bias is None else conv.bias.double()
    conv.weight.copy_(weight * scale)
    conv.bias = nn.Parameter((bias - shift * weight.sum(dim=(1, 2, 3))).float(), requires_grad=False)


@torch.no_grad()
def _fold_temperature(linear: nn.Linear, temperature: float) -> None:
    """Make ``linear(x)`` compute ``linear(x) / temperature``."""
    linear.weight.copy_(linear.weight.double() / temperature)
    linear.bias.copy_(linear.bias.double() / temperature)


class ModelSlot:
    """The model a replica serves, and the reason a newer one in ``model_dir`` is not in use.

    ``poll`` (blocking; call it off the event loop) loads a changed pair and swaps it in only after a
    successful load and warm-up, so a bad new file leaves the last good model serving.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.current: LoadedModel | None = None
        self.problem: str | None = f"model in {model_dir} not checked yet"
        self.warning: str | None = None  # the model is in use, but its files on disk are damaged
        self._seen: tuple[int, ...] | None | str = "never"

    def poll(self) -> bool:
        """Load the model pair if its files changed since the last attempt; return True on a swap."""
        signature = files_signature(self.model_dir)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            artifact = load_artifact(self.model_dir)
            loaded = LoadedModel.from_artifact(artifact)
        except Exception as exc:  # ArtifactError, or anything torch raises on a damaged file
            self.problem = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
            if self.current is None:
                log.warning("no model to serve: %s", self.problem)
            else:
                log.error("keeping model %s: %s", self.current.version, self.problem)
            return False
        self.problem, self.warning = None, artifact.warning
        if self.current is not None and loaded.version == self.current.version:
            return False
        previous, self.current = self.current, loaded
        log.info("serving model %s (was %s)", loaded.version, previous.version if previous else "none")
        return True

    def require(self) -> LoadedModel:
        """The current model, or ``ModelUnavailable`` saying why there is none."""
        current = self.current
        if current is None:
            raise ModelUnavailable(self.problem or "no model loaded")
        return current

    def health(self) -> tuple[int, dict[str, Any]]:
        """HTTP status and body for ``/healthz``."""
        current, problem, warning = self.current, self.problem, self.warning
        if current is None:
            return 503, {"status": "unavailable", "detail": problem or "no model loaded"}
        body: dict[str, Any] = {"status": "ok", "model_version": current.version}
        if problem:
            body |= {
                "status": "degraded",
                "detail": f"serving {current.version}; newer files rejected: {problem}",
            }
        elif warning:
            body |= {"status": "degraded", "detail": f"serving {current.version}; {warning}"}
        return 200, body
