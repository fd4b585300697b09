"""Hostile uploads cannot stall, bloat or crash a replica: the battery of ``tests/hostile_inputs.py``.

Unit: every hostile file is refused from its header (before any pixel is decoded) or admitted with a bounded
decode cost. Integration (the session's ``serve run``): each case sent to one replica's own HTTP port is answered
within 2 s with an acceptable status, while a ``/healthz`` probe on that replica never waits more than 100 ms and
the replica (with its decode workers) grows by less than 150 MB; legitimate uploads still classify correctly.
Precise figures per case: ``bench/hostile.py`` → ``bench/results/hostile.md``.

Run: MNIST_DATA_DIR=../shared/data python -m pytest tests/test_hostile.py -q
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torchvision
from PIL import Image

from ray_app.preprocess import InputError, Limits, inspect, to_mnist
from tests.helpers import WORDS, replica_pids, replica_url
from tests.hostile_inputs import (
    Case,
    Probe,
    cases,
    family_rss,
    phone_photo_jpeg,
    screenshot_png,
    send,
)
from tests.serving import Served
from tests.uploads import STYLES, upload

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ANSWER_S = 2.0  # every hostile request is answered within this
PROBE_DELAY_S = 0.1  # a /healthz on the same replica never waits longer than this
RSS_GROWTH = 150 * 2**20  # the replica and its decode workers grow by less than this
LIMITS = Limits()


@pytest.fixture(scope="module")
def battery() -> list[Case]:
    """The hostile inputs, generated once for this module."""
    return cases()


@pytest.fixture(scope="module")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images (uint8 N×28×28) and labels."""
    test = torchvision.datasets.MNIST(str(mnist_dir), train=False)
    return test.data.numpy(), test.targets.numpy()


# ---- unit: the file rules, in process
def test_the_battery_covers_every_threat_row(battery: list[Case]) -> None:
    rows = {case.row for case in battery}
    assert len(battery) >= 15 and len(rows) >= 9
    assert all(len(case.data) <= 5 * 2**20 + 2**16 for case in battery)


def test_hostile_files_are_refused_from_the_header_or_admitted_with_a_bounded_cost(
    battery: list[Case],
) -> None:
    for case in (c for c in battery if c.kind == "file"):
        started = time.perf_counter()
        try:
            header = inspect(case.data, LIMITS)
        except InputError as exc:
            assert exc.status_code in case.statuses, (case.name, exc.status_code, exc.detail)
            assert case.phrase in exc.detail, (case.name, exc.detail)
            assert time.perf_counter() - started < 0.5, case.name  # refused without decoding (generous bound)
            continue
        assert 200 in case.statuses, f"{case.name} should have been refused from its header"
        assert header.pixels <= LIMITS.max_pixels[header.format], case.name
        assert header.decode_bytes <= LIMITS.max_decode_mib * 2**20, case.name


def test_phone_photo_decodes_at_one_eighth_scale(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist_test
    seven = images[int(np.flatnonzero(labels == 7)[0])]
    photo = phone_photo_jpeg(seven)
    header = inspect(photo)
    assert (header.width, header.height, header.draft_scale) == (4032, 3024, 8)
    assert header.decode_bytes < 2**20  # 504×378 pixels decoded, not 12 M
    reference = to_mnist(png_of(seven))
    out = to_mnist(photo, header=header)
    assert np.corrcoef(out.ravel().astype(float), reference.ravel().astype(float))[0, 1] > 0.8


def png_of(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# ---- integration: one replica of the session's serve run
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_hostile_battery_against_a_replica(served: Served, battery: list[Case]) -> None:
    pid = min(replica_pids(served.ray_tmp))
    url = replica_url(pid)
    for _ in range(3):  # warm up: the decode workers are started and have decoded once
        send(url, next(c for c in battery if c.name == "png-rgba-at-cap"))
    baseline = family_rss(pid)
    failures = []
    with Probe(url).running() as probe:
        time.sleep(0.3)
        for case in battery:
            started = time.monotonic()
            status, detail = send(url, case)
            seconds = time.monotonic() - started
            stall = probe.worst(started)
            growth = family_rss(pid) - baseline
            ok = (
                status in case.statuses
                and (status == 200 or case.phrase in detail)
                and seconds < ANSWER_S
                and stall < PROBE_DELAY_S
                and growth < RSS_GROWTH
            )
            if not ok:
                failures.append(
                    f"{case.name}: {status} {detail[:120]!r} in {seconds:.2f} s, /healthz waited {stall * 1000:.0f} ms,"
                    f" RSS +{growth >> 20} MB"
                )
    assert not failures, "\n".join(failures)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_four_big_decodes_at_once_get_answers_or_503(served: Served, battery: list[Case]) -> None:
    url = replica_url(min(replica_pids(served.ray_tmp)))
    big = next(c for c in battery if c.name == "png-rgba-at-cap")
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(httpx.post(f"{url}/predict", files={"file": ("big.png", big.data)}, timeout=30))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {422, 503} and 422 in statuses, statuses
    for response in results:
        if response.status_code == 503:
            assert response.headers["retry-after"].isdigit() and "busy" in response.json()["detail"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_legitimate_uploads_still_classify(served: Served, mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist_test
    with httpx.Client(base_url=served.url, timeout=30) as client:

        def predict(data: bytes, name: str = "upload") -> int:
            response = client.post("/predict", files={"file": (name, data)})
            assert response.status_code == 200, (name, response.text)
            return response.json()["prediction"]

        for digit, name in enumerate(WORDS):
            assert predict((SAMPLES / f"{name}.png").read_bytes(), f"{name}.png") == digit
        rng = np.random.default_rng(0)
        for style in STYLES:  # the served answer is the one for the image preprocessing makes in process
            for digit in range(10):
                source = images[int(np.flatnonzero(labels == digit)[0])]
                data = upload(source, style, rng)
                assert predict(data, style) == predict(png_of(to_mnist(data))), (style, digit)
        # 12 MP phone photos and 4K screenshots of digits the model knows: each served answer is the one for the
        # image preprocessing makes in process, and nearly all are right (the small session model misreads one
        # resampled digit now and then, so one miss in five is allowed per kind)
        for digit in (7, 3):
            first = np.flatnonzero(labels == digit)[:20]
            known = [index for index in first if predict(png_of(images[index])) == digit][:5]
            assert len(known) == 5, (digit, known)
            for make, name in ((phone_photo_jpeg, "photo.jpg"), (screenshot_png, "screenshot.png")):
                answers = []
                for index in known:
                    data = make(images[index])
                    answers.append(predict(data, name))
                    assert answers[-1] == predict(png_of(to_mnist(data))), (name, digit, index)
                assert answers.count(digit) >= 4, (name, digit, answers)
