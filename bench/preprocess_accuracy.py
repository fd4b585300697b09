"""Accuracy of preprocessing + model on upload-style digits, per style: the table the README reports.

Each style (see ``tests/uploads.py``) renders the same random sample of MNIST test digits, and every digit of every
available font, as upload files; they go through ``ray_app.preprocess.to_mnist``, the training normalisation and the model. The "resize only"
column feeds the same files through a plain grayscale + 28×28 resize, as the original service did.

Usage:
    python -m bench.preprocess_accuracy --model-dir ./model --data-dir ./model/data [--per-style 500]
        [--output accuracy.md]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from ray_app.calibration import ece
from ray_app.model import load_artifact
from ray_app.preprocess import InputError, to_mnist
from tests.uploads import STYLES, fonts, printed_ink, upload


def resize_only(data: bytes, mean: float, std: float) -> np.ndarray:
    """The naive pipeline: grayscale, resize to 28×28, normalise (no inversion, no cropping, no centring)."""
    img = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    return (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std


def classify(model: torch.nn.Module, images: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities (N, 10), ``softmax(logits / temperature)``, for normalised 28×28 arrays."""
    with torch.inference_mode():
        batch = torch.from_numpy(np.stack(images))[:, None]
        return np.concatenate([torch.softmax(model(c) / temperature, 1).numpy() for c in batch.split(512)])


def evaluate(
    model: torch.nn.Module,
    inks: list[np.ndarray],
    labels: np.ndarray,
    style: str,
    mean: float,
    std: float,
    seed: int,
    temperature: float = 1.0,
    threshold: float = 0.0,
) -> dict[str, Any]:
    """Accuracy of the full pipeline and of resize-only on ``inks`` rendered in ``style``; CPU ms per image;
    the answers below the not-sure ``threshold``, and the calibrated probabilities of the accepted uploads."""
    rng = np.random.default_rng(seed)
    files = [upload(ink, style, rng) for ink in inks]
    blank = np.zeros((28, 28), dtype=np.float32)
    inputs, rejected, elapsed = [], 0, 0.0
    for data in files:
        start = time.process_time()  # CPU time: wall time on a shared machine says more about its load
        try:
            inputs.append((to_mnist(data).astype(np.float32) / 255.0 - mean) / std)
        except InputError:
            inputs.append(blank)  # counted as wrong below
            rejected += 1
        elapsed += time.process_time() - start
    probs = classify(model, inputs, temperature)
    ok = probs.argmax(1) == labels
    accepted = np.array([x is not blank for x in inputs])
    ok[~accepted] = False
    naive = classify(model, [resize_only(data, mean, std) for data in files]).argmax(1) == labels
    return {
        "unsure": int((probs[accepted].max(1) < threshold).sum()),
        "probs": probs[accepted],
        "labels": labels[accepted],
        "n": len(files),
        "correct": int(ok.sum()),
        "naive": int(naive.sum()),
        "rejected": rejected,
        "ms": 1000 * elapsed / len(files),
    }


def calibration_cells(parts: list[dict[str, Any]]) -> str:
    """ECE (15 bins) and the share of not-sure answers over the accepted uploads of ``parts``."""
    probs = np.concatenate([p["probs"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    if not len(labels):
        return "– | –"
    error = ece(torch.from_numpy(probs), torch.from_numpy(labels).long())
    return f"{100 * error:.1f}% | {100 * sum(p['unsure'] for p in parts) / len(labels):.1f}%"


def markdown(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The per-style table (MNIST digits, printed digits, both) with an overall row."""
    lines = [
        "| style | MNIST test digits | printed digits | all | resize only | ECE | not sure | preprocess CPU ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = {"mnist": [0, 0], "printed": [0, 0], "all": [0, 0], "naive": [0, 0]}

    def cell(correct: int, n: int) -> str:
        return f"{100 * correct / n:.1f}% ({n})" if n else "–"

    for style, result in rows.items():
        parts = [result[k] for k in ("mnist", "printed") if k in result]
        correct, n = sum(p["correct"] for p in parts), sum(p["n"] for p in parts)
        naive = sum(p["naive"] for p in parts)
        ms = sum(p["ms"] * p["n"] for p in parts) / n
        for key in ("mnist", "printed"):
            if key in result:
                totals[key][0] += result[key]["correct"]
                totals[key][1] += result[key]["n"]
        totals["all"][0] += correct
        totals["all"][1] += n
        totals["naive"][0] += naive
        totals["naive"][1] += n
        mnist, printed = result.get("mnist", {}), result.get("printed", {})
        lines.append(
            f"| {style} | {cell(mnist.get('correct', 0), mnist.get('n', 0))} "
            f"| {cell(printed.get('correct', 0), printed.get('n', 0))} | {cell(correct, n)} "
            f"| {cell(naive, n)} | {calibration_cells(parts)} | {ms:.2f} |"
        )
    lines.append(
        f"| **overall** | {cell(*totals['mnist'])} | {cell(*totals['printed'])} | **{cell(*totals['all'])}** "
        f"| {cell(*totals['naive'])} | {calibration_cells([p for r in rows.values() for p in r.values()])} | |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR"), help="model directory (env MODEL_DIR)"
    )
    parser.add_argument(
        "--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST root (env MNIST_DATA_DIR)"
    )
    parser.add_argument(
        "--per-style", type=int, default=500, help="MNIST test digits per style (default 500)"
    )
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated styles (default: all)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for the sample and layouts (default 0)"
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if not args.model_dir or not args.data_dir:
        parser.error("--model-dir and --data-dir (or MODEL_DIR and MNIST_DATA_DIR) are required")

    torch.set_num_threads(1)
    artifact = load_artifact(args.model_dir)
    mean, std = artifact.meta["normalization"]["mean"], artifact.meta["normalization"]["std"]
    calibration = artifact.meta.get("calibration", {})  # older models: raw softmax, no threshold
    scaling = (calibration.get("temperature", 1.0), calibration.get("threshold", 0.0))
    test = torchvision.datasets.MNIST(args.data_dir, train=False)
    pick = np.random.default_rng(args.seed).choice(len(test.data), size=args.per_style, replace=False)
    mnist_inks = [test.data[i].numpy() for i in pick]
    mnist_labels = test.targets[pick].numpy()
    font_set = fonts()
    printed = [(printed_ink(d, font), d) for font in font_set.values() for d in range(10)]
    printed_inks = [ink for ink, _ in printed]
    printed_labels = np.array([d for _, d in printed])

    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for style in args.styles.split(","):
        rows[style] = {
            "mnist": evaluate(
                artifact.model, mnist_inks, mnist_labels, style, mean, std, args.seed, *scaling
            ),
            "printed": evaluate(
                artifact.model, printed_inks, printed_labels, style, mean, std, args.seed, *scaling
            ),
        }
        print(f"{style}: done", file=sys.stderr, flush=True)
    table = markdown(rows)
    rejected = sum(part["rejected"] for result in rows.values() for part in result.values())
    note = (
        f"\nModel {artifact.meta.get('version')} (MNIST test accuracy {artifact.meta.get('test_accuracy')}); "
        f"{len(font_set)} fonts; {rejected} uploads rejected by preprocessing (counted as wrong). ECE (15 bins) "
        f"and not sure (top probability below {scaling[1]}) over the accepted uploads, with temperature "
        f"{scaling[0]}.\n"
    )
    print(table + note)
    if args.output:
        args.output.write_text(table + note)


if __name__ == "__main__":
    main()
