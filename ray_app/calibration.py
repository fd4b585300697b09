"""Calibrated probabilities: a held-out validation split, temperature scaling, ECE/NLL and the "not sure" threshold.

Training with label smoothing leaves the softmax under-confident. One temperature ``T`` fitted on held-out
training images (``softmax(logits / T)``) makes the top probability match how often the model is right; it never
changes the argmax, so accuracy is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
TARGET_PRECISION = 0.998  # validation accuracy of the answers at or above the default threshold
MIN_THRESHOLD = 0.5  # below this the top digit is not even the majority of the probability
MAX_THRESHOLD = 0.99  # never demand more than this (a small validation split cannot support more)


def holdout_split(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, validation)`` of ``n`` training images: ``size`` of them, drawn with ``seed``, held out.

    Both are sorted, so the training images keep the file's order (and ``--train-limit`` keeps its meaning).
    """
    if not 0 <= size < n:
        raise ValueError(f"validation split of {size} images out of {n}: need 0 <= size < {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, low: float = 0.05, high: float = 20.0
) -> float:
    """The temperature minimising NLL on ``(logits, labels)``: golden-section search on ``1/T``.

    NLL is convex in ``1/T`` (a log-sum-exp of linear functions minus a linear one), so the search finds the
    global minimum within ``[low, high]``.
    """
    logits = logits.double()

    def loss(beta: float) -> float:
        return F.cross_entropy(logits * beta, labels).item()

    ratio = (math.sqrt(5) - 1) / 2
    a, b = 1 / high, 1 / low
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return 2 / (a + b)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per confidence bin (equal width on (0, 1]): images, mean top probability, accuracy."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = ((confidence * bins).ceil().long() - 1).clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": confidence[mask].double().mean().item() if count else 0.0,
                "accuracy": correct[mask].mean().item() if count else 0.0,
            }
        )
    return rows


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between confidence and accuracy per bin."""
    rows = reliability(probs, labels, bins)
    return sum(r["count"] * abs(r["confidence"] - r["accuracy"]) for r in rows) / max(1, len(labels))


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, target: float = TARGET_PRECISION) -> float:
    """The lowest top-probability threshold whose confident answers (``p >= threshold``) are right at least
    ``target`` of the time on ``(probs, labels)``, within [:data:`MIN_THRESHOLD`, :data:`MAX_THRESHOLD`]."""
    confidence, predicted = probs.double().max(1)
    order = confidence.argsort(descending=True)
    correct = (predicted == labels)[order].double()
    precision = correct.cumsum(0) / torch.arange(1, len(correct) + 1, dtype=torch.float64)
    # Walk down from the most confident answer; stop before precision first falls below the target for good.
    ok = (precision >= target).nonzero()
    if len(ok) == 0:
        return MAX_THRESHOLD
    if ok[-1, 0] == len(correct) - 1:  # every answer may count as confident
        return MIN_THRESHOLD
    threshold = confidence[order][ok[-1, 0]].item()
    return round(min(max(threshold, MIN_THRESHOLD), MAX_THRESHOLD), 4)


def confident_stats(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Share of answers at or above ``threshold`` and their accuracy (precision)."""
    confidence, predicted = probs.max(1)
    confident = confidence >= threshold
    right = (predicted == labels) & confident
    return {
        "confident_share": confident.double().mean().item(),
        "confident_precision": right.sum().item() / max(1, int(confident.sum())),
    }


def calibrate(
    val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor, test_labels: torch.Tensor
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """Fit the temperature and threshold on the validation split; measure both on the test set.

    Returns the ``calibration`` record for ``model.json`` and the test set's reliability bins before and after.
    """
    temperature = fit_temperature(val_logits, val_labels)
    val_probs = torch.softmax(val_logits.double() / temperature, 1)
    threshold = choose_threshold(val_probs, val_labels)
    before = torch.softmax(test_logits.double(), 1)
    after = torch.softmax(test_logits.double() / temperature, 1)
    record = {
        "method": "temperature",
        "temperature": round(temperature, 5),
        "threshold": threshold,
        "target_precision": TARGET_PRECISION,
        "validation_images": len(val_labels),
        "validation_nll": {
            "before": nll(val_logits, val_labels),
            "after": nll(val_logits, val_labels, temperature),
        },
        "test": {
            "ece_bins": ECE_BINS,
            "ece_before": ece(before, test_labels),
            "ece_after": ece(after, test_labels),
            "nll_before": nll(test_logits, test_labels),
            "nll_after": nll(test_logits, test_labels, temperature),
            **confident_stats(after, test_labels, threshold),
        },
    }
    return record, {"before": reliability(before, test_labels), "after": reliability(after, test_labels)}
