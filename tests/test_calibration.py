"""Calibration: the held-out split, temperature fitting, ECE/NLL, the "not sure" threshold, and what a real
training run writes into ``model.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from itertools import permutations
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ray_app import data
from ray_app.calibration import (
    MAX_THRESHOLD,
    MIN_THRESHOLD,
    calibrate,
    choose_threshold,
    confident_stats,
    ece,
    fit_temperature,
    holdout_split,
    nll,
    reliability,
)
from ray_app.inference import DEFAULT_THRESHOLD, LoadedModel
from ray_app.model import ArtifactError, ModelConfig, Net, load_artifact, save_artifact
from ray_app.preprocess import to_mnist
from ray_app.serve import Settings, build_api
from ray_app.train import predict_logits
from tests.helpers import (
    BAR,
    NORMALIZATION,
    RING,
    WORDS,
    ZERO,
    DirectBackend,
    sample_files,
    side_by_side,
    unsure_pairs,
)
from tests.serving import Served


def test_holdout_split_is_disjoint_sorted_and_seeded() -> None:
    train, val = holdout_split(1000, 100, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert sorted(set(train.tolist()) | set(val.tolist())) == list(range(1000))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert torch.equal(val, holdout_split(1000, 100, seed=3)[1])
    assert not torch.equal(val, holdout_split(1000, 100, seed=4)[1])
    assert len(holdout_split(1000, 0, seed=3)[1]) == 0
    for size in (-1, 1000):
        with pytest.raises(ValueError, match="validation split"):
            holdout_split(1000, size, seed=3)


def _sampled(true_temperature: float, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from ``softmax(logits / true_temperature)``: a model off by that temperature."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 10, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator)[:, 0]
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_temperature: float) -> None:
    logits, labels = _sampled(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.06)
    assert nll(logits, labels, fitted) <= nll(logits, labels, true_temperature) + 1e-9  # the NLL optimum
    assert nll(logits, labels, fitted) < nll(logits, labels, fitted * 1.2)
    assert nll(logits, labels, fitted) < nll(logits, labels, fitted / 1.2)


def test_ece_and_reliability_by_hand() -> None:
    # 10 answers at top probability 0.9: 9 right is perfectly calibrated, 5 right is 0.4 over-confident.
    probs = torch.full((10, 10), 0.1 / 9)
    probs[:, 0] = 0.9
    right, half = torch.zeros(10, dtype=torch.long), torch.tensor([0] * 5 + [1] * 5)
    assert ece(probs, torch.tensor([0] * 9 + [1])) == pytest.approx(0.0, abs=1e-6)
    assert ece(probs, half) == pytest.approx(0.4, abs=1e-6)
    rows = reliability(probs, right)
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 10
    (full,) = [r for r in rows if r["count"]]
    assert full["low"] < 0.9 <= full["high"] and full["accuracy"] == 1.0
    assert full["confidence"] == pytest.approx(0.9)


def test_threshold_is_the_lowest_with_the_target_precision() -> None:
    confidence = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, True, True, True, False, True, False])
    probs = torch.stack([confidence, 1 - confidence] + [torch.zeros(7)] * 8, 1)
    labels = torch.where(correct, 0, 1)
    assert choose_threshold(probs, labels, target=1.0) == pytest.approx(0.96)
    assert choose_threshold(probs, labels, target=0.8) == pytest.approx(0.7)  # 5 of 6 right at >= 0.7
    assert choose_threshold(probs, labels, target=0.5) == MIN_THRESHOLD  # every answer qualifies
    assert choose_threshold(probs, torch.ones(7, dtype=torch.long), target=0.5) == MAX_THRESHOLD  # none does
    stats = confident_stats(probs, labels, 0.7)
    assert stats == {"confident_share": pytest.approx(6 / 7), "confident_precision": pytest.approx(5 / 6)}


def test_calibrate_keeps_the_argmax_and_lowers_ece() -> None:
    val_logits, val_labels = _sampled(0.5)
    test_logits, test_labels = _sampled(0.5, n=5000)
    record, bins = calibrate(val_logits, val_labels, test_logits * 1.0, test_labels)
    assert record["temperature"] == pytest.approx(0.5, rel=0.06)
    assert record["validation_nll"]["after"] < record["validation_nll"]["before"]
    test = record["test"]
    assert test["ece_after"] < test["ece_before"] and test["nll_after"] < test["nll_before"]
    assert MIN_THRESHOLD <= record["threshold"] <= MAX_THRESHOLD
    assert set(bins) == {"before", "after"} and all(len(rows) == 15 for rows in bins.values())
    assert sum(r["count"] for r in bins["after"]) == 5000
    scaled = torch.softmax(test_logits / record["temperature"], 1)
    assert torch.equal(scaled.argmax(1), test_logits.argmax(1))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_trained_model_is_calibrated_on_held_out_images(trained_model_dir: Path, mnist_dir: Path) -> None:
    meta = json.loads((trained_model_dir / "model.json").read_text())
    calibration = meta["calibration"]
    assert calibration["validation_images"] == 5000 and calibration["method"] == "temperature"
    assert calibration["validation_nll"]["after"] < calibration["validation_nll"]["before"]
    test = calibration["test"]
    assert test["ece_bins"] == 15
    assert test["ece_after"] < test["ece_before"] and test["nll_after"] < test["nll_before"]
    assert test["ece_after"] <= 0.01
    assert (trained_model_dir / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Recompute from the published weights: the validation images were held out of training, and the stored
    # temperature is the NLL optimum on them.
    train_x, train_y = data.load_mnist(mnist_dir, train=True)
    keep, val = holdout_split(len(train_x), 5000, meta["seed"])
    model = load_artifact(trained_model_dir).model
    logits = predict_logits(model, train_x[val], data.MEAN, data.STD)
    temperature = calibration["temperature"]
    assert nll(logits, train_y[val], temperature) == pytest.approx(
        calibration["validation_nll"]["after"], 1e-3
    )
    assert nll(logits, train_y[val], temperature) < nll(logits, train_y[val], 1.0)
    assert meta["train_images"] == 12000 and not set(keep[:12000].tolist()) & set(val.tolist())


# Serving: the temperature and threshold from model.json, and the "confident" field
def _publish_calibrated(model_dir: Path, calibration: dict | None, seed: int = 0) -> str:
    """Publish a randomly initialised model with ``calibration`` in its model.json (None: an older model)."""
    torch.manual_seed(seed)
    meta: dict = {"config": asdict(ModelConfig()), "normalization": NORMALIZATION}
    if calibration is not None:
        meta["calibration"] = calibration
    return save_artifact(model_dir, Net().state_dict(), meta)


def _raw_softmax(model: torch.nn.Module, image: np.ndarray, temperature: float = 1.0) -> list[float]:
    x = (torch.from_numpy(image).float() / 255 - NORMALIZATION["mean"]) / NORMALIZATION["std"]
    with torch.inference_mode():
        return torch.softmax(model.eval()(x[None, None]) / temperature, 1)[0].tolist()


def test_calibration_survives_save_load_and_serve(tmp_path: Path) -> None:
    calibration = {
        "method": "temperature",
        "temperature": 0.05,
        "threshold": 0.75,
        "test": {"ece_after": 0.002},
    }
    version = _publish_calibrated(tmp_path, calibration)
    artifact = load_artifact(tmp_path)
    assert artifact.meta["calibration"] == calibration
    loaded = LoadedModel.from_artifact(artifact)
    assert (loaded.temperature, loaded.threshold) == (0.05, 0.75)
    assert loaded.card["calibration"] == calibration

    client = TestClient(build_api(DirectBackend(tmp_path)))
    image = to_mnist(BAR)
    body = client.post("/predict", files={"file": ("bar.png", BAR)}).json()
    assert body["model_version"] == version
    assert body["probs"] == pytest.approx(_raw_softmax(artifact.model, image, 0.05), abs=1e-5)
    assert body["probs"] != pytest.approx(_raw_softmax(artifact.model, image), abs=1e-3)  # T really applied
    assert body["prediction"] == int(np.argmax(_raw_softmax(artifact.model, image)))  # the argmax is not
    assert body["confident"] is (max(body["probs"]) >= 0.75)
    assert client.get("/model").json()["calibration"] == calibration
    batch = client.post(
        "/predict/batch", files=[("files", ("a.png", BAR)), ("files", ("b.png", RING))]
    ).json()
    assert [r["confident"] for r in batch["results"]] == [max(r["probs"]) >= 0.75 for r in batch["results"]]


def test_model_without_calibration_serves_with_temperature_1(tmp_path: Path) -> None:
    _publish_calibrated(tmp_path, None)  # a model.json from before calibration
    artifact = load_artifact(tmp_path)
    loaded = LoadedModel.from_artifact(artifact)
    assert (loaded.temperature, loaded.threshold) == (1.0, DEFAULT_THRESHOLD)
    assert "calibration" not in loaded.card
    body = (
        TestClient(build_api(DirectBackend(tmp_path)))
        .post("/predict", files={"file": ("r.png", RING)})
        .json()
    )
    assert body["probs"] == pytest.approx(_raw_softmax(artifact.model, to_mnist(RING)), abs=1e-5)
    assert body["confident"] is (max(body["probs"]) >= DEFAULT_THRESHOLD)


def test_threshold_from_user_config_overrides_the_models(tmp_path: Path) -> None:
    _publish_calibrated(tmp_path, {"temperature": 1.0, "threshold": 0.0})
    assert Settings.from_user_config({}).confidence_threshold is None
    for threshold, expected in ((None, True), (0.0, True), (1.0, False)):
        settings = Settings.from_user_config({"confidence_threshold": threshold})
        client = TestClient(build_api(DirectBackend(tmp_path, settings)))
        body = client.post("/predict", files={"file": ("bar.png", BAR)}).json()
        assert body["confident"] is expected, threshold
        batch = client.post("/predict/batch", files=[("files", ("a.png", BAR))]).json()
        assert batch["results"][0]["confident"] is expected, threshold
    for bad in (-0.1, 1.5, "high", True):
        with pytest.raises(ValueError, match="confidence_threshold"):
            Settings.from_user_config({"confidence_threshold": bad})


@pytest.mark.parametrize(
    "calibration",
    [{"temperature": 0}, {"temperature": "hot"}, {"threshold": 0.9}, {"temperature": 1, "threshold": 2}],
)
def test_unusable_calibration_is_refused(tmp_path: Path, calibration: dict) -> None:
    _publish_calibrated(tmp_path, calibration)
    with pytest.raises(ArtifactError, match="calibration"):
        LoadedModel.from_artifact(load_artifact(tmp_path))


def test_openapi_documents_the_confident_field(tmp_path: Path) -> None:
    schemas = (
        TestClient(build_api(DirectBackend(tmp_path))).get("/openapi.json").json()["components"]["schemas"]
    )
    for name in ("PredictionOut", "ImageResult"):
        assert "confident" in schemas[name]["required"], name
        assert schemas[name]["properties"]["confident"]["type"] == "boolean"
        assert "not sure" in schemas[name]["properties"]["confident"]["description"]


# The trained model and the real serve run: sure of the committed samples, and mostly not sure of two of them side by
# side. Any one pair can still look like a single digit to a small model (a 7 beside a 2 can read as a wide 7), so
# the claim is about the share of the 90 ordered pairs: 77-96 % "not sure" in repeated trainings of the test model.
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_trained_model_is_sure_of_the_samples_and_not_of_two_digits(trained_model_dir: Path) -> None:
    loaded = LoadedModel.from_artifact(load_artifact(trained_model_dir))
    assert (
        loaded.temperature
        == json.loads((trained_model_dir / "model.json").read_text())["calibration"]["temperature"]
    )
    samples = sample_files()
    results = loaded.predict([to_mnist(path.read_bytes()) for path, _ in samples])
    assert [(r.digit, r.confident) for r in results] == [(digit, True) for _, digit in samples]
    unsure = unsure_pairs(trained_model_dir)
    assert len(unsure) >= 0.6 * 90, sorted(set(permutations(WORDS, 2)) - set(unsure))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_served_answers_are_calibrated_and_say_when_not_sure(served: Served, trained_model_dir: Path) -> None:
    card = httpx.get(f"{served.url}/model", timeout=10).json()
    calibration = json.loads((trained_model_dir / "model.json").read_text())["calibration"]
    assert card["calibration"] == calibration
    zero = httpx.post(f"{served.url}/predict", files={"file": ("zero.png", ZERO)}, timeout=30).json()
    assert zero["prediction"] == 0 and zero["confident"] is True
    assert zero["probs"][0] >= calibration["threshold"]
    pair = side_by_side(*unsure_pairs(trained_model_dir)[0])
    unsure = httpx.post(f"{served.url}/predict", files={"file": ("pair.png", pair)}, timeout=30).json()
    assert unsure["confident"] is False and max(unsure["probs"]) < calibration["threshold"]
    batch = httpx.post(
        f"{served.url}/predict/batch",
        files=[("files", ("a.png", ZERO)), ("files", ("b.png", pair))],
        timeout=30,
    ).json()
    assert [r["confident"] for r in batch["results"]] == [True, False]
    assert [r["probs"] for r in batch["results"]] == [
        pytest.approx(zero["probs"], abs=1e-5),
        pytest.approx(unsure["probs"], abs=1e-5),
    ]
