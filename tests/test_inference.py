"""Serve-free inference (``ray_app.inference``): hot reload in the model slot, batched predictions, BatchNorm,
normalisation and temperature folding.

Run: pytest tests/test_inference.py     (seconds, no Ray)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ray_app.inference import LoadedModel, ModelSlot, _for_inference
from ray_app.model import Net, load_artifact
from ray_app.preprocess import to_mnist
from tests.helpers import (
    BAR,
    CROSS,
    NORMALIZATION,
    RING,
    publish,
    publish_broken,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    publish(tmp_path)
    return tmp_path


def test_model_slot_hot_reload(tmp_path: Path) -> None:
    slot = ModelSlot(tmp_path)
    assert not slot.poll() and slot.current is None and "no model yet" in slot.health()[1]["detail"]
    first = publish(tmp_path, seed=1)
    assert slot.poll() and slot.current.version == first
    assert not slot.poll()  # unchanged files: nothing loaded

    publish_broken(tmp_path)  # a bad new pair: keep serving the last good model
    assert not slot.poll()
    status, body = slot.health()
    assert status == 200 and body["status"] == "degraded" and body["model_version"] == first
    assert "does not fit" in body["detail"]

    second = publish(tmp_path, seed=2)
    assert (
        slot.poll()
        and slot.current.version == second
        and slot.health() == (200, {"status": "ok", "model_version": second})
    )


def test_batched_inference_matches_single_images_and_the_training_normalisation(model_dir: Path) -> None:
    artifact = load_artifact(model_dir)
    loaded = LoadedModel.from_artifact(artifact)
    images = [BAR, RING, CROSS]
    batch = loaded.predict([to_mnist(data) for data in images])
    for data, result in zip(images, batch, strict=True):
        (single,) = loaded.predict([to_mnist(data)])
        assert result.probs == pytest.approx(single.probs, abs=1e-5)
        pixels = torch.from_numpy(to_mnist(data)).float() / 255
        x = ((pixels - NORMALIZATION["mean"]) / NORMALIZATION["std"])[None, None]  # as in training
        with torch.inference_mode():
            expected = torch.softmax(artifact.model(x), dim=1)[0].tolist()
        assert result.probs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("negative_scale", [False, True])
def test_inference_copy_folds_batchnorm_without_changing_outputs(negative_scale: bool) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    if negative_scale:  # max-pool does not commute with a flipped sign: that BatchNorm must stay
        model.features[2].weight.data[0] = -1.0
    fast = _for_inference(model)
    kept = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert kept == (1 if negative_scale else 0)
    x = torch.randn(32, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-4)


def test_inference_copy_folds_normalisation_and_temperature_without_changing_outputs() -> None:
    """The served copy takes pixel values and returns calibrated logits: the same probabilities as the trained
    network on normalised pixels with the temperature applied (within 1e-6), and the trained network is not
    touched (``model.pth`` stays the plain state_dict training wrote)."""
    torch.manual_seed(0)
    model = Net().eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mean, std, temperature = NORMALIZATION["mean"], NORMALIZATION["std"], 0.6
    fast = _for_inference(model, 1 / (255 * std), mean / std, temperature)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pixels = torch.randint(0, 256, (64, 1, 28, 28)).float()
    pixels[32:] *= torch.rand(32, 1, 28, 28) < 0.2  # sparse ink, like MNIST
    with torch.inference_mode():
        expected = torch.softmax(model((pixels / 255 - mean) / std) / temperature, dim=1)
        served = torch.softmax(fast(pixels.contiguous(memory_format=torch.channels_last)), dim=1)
    assert (served - expected).abs().max() < 1e-6
