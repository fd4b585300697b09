"""Write sample digits 0–9 as PNGs in two styles, from the MNIST test set.

- ``<out>/zero.png`` … ``<out>/nine.png``: MNIST itself, 28×28 grayscale, white digit on black.
- ``<out>/ink/zero.png`` … ``<out>/ink/nine.png``: the same digit as an upload would look, black ink on white,
  280×280.

Each digit is the first test image of its class that is typical of the class: it correlates best with its own
class's mean image, clearly ahead of every other class, so the samples are unambiguous.

Usage:
    python samples/gen_samples.py --data-dir ../shared/data [--out samples]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MARGIN = 0.1  # own-class correlation must beat every other class's by this much
INK_SIDE = 280
INK_LEVELS = 8  # grey levels kept in the ink-style PNGs, which keeps each file under 4 KB


def typical(images: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Index of the first image of each digit that is closest to its own class mean, by a margin."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    means = np.stack([flat[labels == d].mean(axis=0) for d in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    scores = flat @ means.T
    chosen = {}
    for digit in range(10):
        for i in np.flatnonzero(labels == digit):
            others = np.delete(scores[i], digit)
            if scores[i, digit] >= others.max() + MARGIN:
                chosen[digit] = int(i)
                break
    return chosen


def ink_style(image: np.ndarray) -> Image.Image:
    """Black ink on white at INK_SIDE × INK_SIDE: MNIST's digit scaled up smoothly, inverted, posterised."""
    big = np.asarray(
        Image.fromarray(image).resize((INK_SIDE, INK_SIDE), Image.Resampling.BICUBIC), dtype=np.float64
    )
    step = 255 / (INK_LEVELS - 1)
    return Image.fromarray((255 - np.round(big / step) * step).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DATA_DIR"),
        help="MNIST root (default: env MNIST_DATA_DIR)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent, help="output folder (default: samples/)"
    )
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir (or MNIST_DATA_DIR) is required")

    test = torchvision.datasets.MNIST(args.data_dir, train=False)
    images, labels = test.data.numpy(), test.targets.numpy()
    (args.out / "ink").mkdir(parents=True, exist_ok=True)
    for digit, index in sorted(typical(images, labels).items()):
        Image.fromarray(images[index]).save(args.out / f"{NAMES[digit]}.png", optimize=True)
        ink_style(images[index]).save(args.out / "ink" / f"{NAMES[digit]}.png", optimize=True)
        print(f"{digit}: MNIST test image #{index} -> {NAMES[digit]}.png, ink/{NAMES[digit]}.png")


if __name__ == "__main__":
    main()
