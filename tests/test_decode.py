"""Unit tests of the replica's decode budget (``ray_app/decode.py``) with real worker processes, no Ray.

Small uploads decode inline; the rest in worker processes; one decode more than there are workers gets
``DecodeBusy`` (503 with Retry-After through ``serve._decode``); a decode over its wall-time budget is killed with
its worker, which is replaced; a batch's declared pixels and the memory in flight are bounded.

Run: python -m pytest tests/test_decode.py -q
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from starlette.exceptions import HTTPException

from ray_app.decode import DecodeBudget, DecodeBusy, Decoder, ItemError
from ray_app.preprocess import InputError, Limits, inspect, to_mnist
from ray_app.serve import ServeMetrics, Settings, _decode
from tests.hostile_inputs import blank_png, rle8_bmp

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ZERO = (SAMPLES / "zero.png").read_bytes()
BIG = blank_png(4000, 4000, 6)  # 16 MP RGBA: a few hundred ms in a worker, never inline
LIMITS = Limits()


@pytest.fixture
def decoder() -> Iterator[Decoder]:
    """A started decoder with two workers and a generous time budget; stopped afterwards."""
    started = Decoder(DecodeBudget(workers=2, timeout_s=30))
    started.start()
    yield started
    started.close()


def run(coroutine: Any) -> Any:
    """Run a coroutine to completion."""
    return asyncio.run(coroutine)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_small_uploads_decode_inline_without_starting_a_worker() -> None:
    lazy = Decoder()
    (image,) = run(lazy.decode([ZERO], LIMITS))
    np.testing.assert_array_equal(image, to_mnist(ZERO))
    assert lazy.worker_pids() == []  # nothing needed a worker process
    lazy.close()


def test_big_and_python_work_uploads_go_to_the_workers(decoder: Decoder) -> None:
    rle = rle8_bmp(64, 64)  # small, but Pillow decodes RLE pixel by pixel in Python
    assert inspect(rle).python_work
    with pytest.raises(ItemError, match="no digit found"):  # decoded (blank) in a worker, refused there
        run(decoder.decode([rle], LIMITS))
    with pytest.raises(ItemError, match="no digit found") as raised:
        run(decoder.decode([ZERO, BIG], LIMITS))
    assert raised.value.index == 1 and raised.value.status_code == 422
    assert len(decoder.worker_pids()) == 2 and all(alive(pid) for pid in decoder.worker_pids())


def test_inline_budget_is_per_request() -> None:
    budget = DecodeBudget(inline_max_pixels=2 * 28 * 28)  # two MNIST images inline, the third in a worker
    counting = Decoder(budget)
    images = run(counting.decode([ZERO, ZERO], LIMITS))
    assert len(images) == 2 and counting.worker_pids() == []
    images = run(counting.decode([ZERO, ZERO, ZERO], LIMITS))
    assert len(images) == 3 and len(counting.worker_pids()) == budget.workers
    np.testing.assert_array_equal(images[2], images[0])  # the worker's answer is the inline one
    counting.close()


def test_one_decode_more_than_workers_is_busy_and_becomes_503(decoder: Decoder) -> None:
    async def three_at_once() -> list[Any]:
        return await asyncio.gather(
            *(decoder.decode([BIG], LIMITS) for _ in range(3)), return_exceptions=True
        )

    outcomes = run(three_at_once())
    busy = [o for o in outcomes if isinstance(o, DecodeBusy)]
    assert len(busy) == 1 and "busy" in str(busy[0])
    assert sum(isinstance(o, ItemError) and "no digit" in o.detail for o in outcomes) == 2

    class Backend:
        settings = Settings(decode=DecodeBudget(workers=1, timeout_s=30, retry_after_s=3))
        metrics = ServeMetrics()

    backend = Backend()
    backend.decoder = Decoder(backend.settings.decode)  # type: ignore[attr-defined]

    async def two_through_serve() -> list[Any]:
        calls = (_decode([BIG], backend) for _ in range(2))  # type: ignore[arg-type]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = run(two_through_serve())
    (refused,) = [o for o in outcomes if isinstance(o, HTTPException)]
    assert refused.status_code == 503 and refused.headers == {"Retry-After": "3"}
    assert "busy" in refused.detail
    backend.decoder.close()  # type: ignore[attr-defined]


def test_decode_over_its_time_budget_is_killed_and_the_worker_replaced() -> None:
    slow = Decoder(DecodeBudget(workers=1, timeout_s=0.05))
    slow.start()
    (first,) = slow.worker_pids()
    run(
        slow.decode([ZERO, ZERO, ZERO, ZERO, ZERO, ZERO], LIMITS)
    )  # over the inline budget: warms the worker up
    started = time.monotonic()
    with pytest.raises(ItemError, match="took longer than 0.05 s") as raised:
        run(slow.decode([BIG], LIMITS))
    assert raised.value.status_code == 422 and time.monotonic() - started < 5
    (second,) = slow.worker_pids()
    assert second != first
    assert not alive(first)  # killed and reaped, not left running
    slow.budget = DecodeBudget(workers=1, timeout_s=30)
    with pytest.raises(ItemError, match="no digit found"):
        run(slow.decode([BIG], LIMITS))  # the replacement decodes
    slow.close()


def test_a_crashed_worker_is_replaced(decoder: Decoder) -> None:
    with pytest.raises(ItemError):
        run(decoder.decode([BIG], LIMITS))  # both workers are running
    for pid in decoder.worker_pids():
        os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid) for pid in decoder.worker_pids() if alive(pid)], timeout=5)
    with pytest.raises(ItemError, match="no digit found"):
        run(decoder.decode([BIG, BIG], LIMITS))  # both workers, each replaced before it gets the image
    assert all(alive(pid) for pid in decoder.worker_pids())


def test_batch_pixels_are_counted_against_one_budget(decoder: Decoder) -> None:
    decoder.budget = DecodeBudget(workers=2, timeout_s=30, max_batch_pixels=2 * 4000 * 4000)
    with pytest.raises(InputError, match="pixels in all") as raised:
        run(decoder.decode([BIG, BIG, BIG], LIMITS))
    assert raised.value.status_code == 413
    assert decoder.stats()["bytes_in_flight"] == 0


def test_batch_parts_share_the_workers_and_the_memory_in_flight(decoder: Decoder) -> None:
    need = inspect(BIG).decode_bytes
    decoder.budget = DecodeBudget(
        workers=2, timeout_s=30, max_mib_in_flight=-(-need // 2**20)
    )  # one at a time
    with pytest.raises(ItemError, match="no digit found"):
        run(decoder.decode([BIG, BIG, BIG], LIMITS))  # the batch's own lanes wait for each other
    assert decoder.stats() == {"workers": 2, "idle": 2, "bytes_in_flight": 0}


def test_memory_in_flight_over_the_budget_is_busy(decoder: Decoder) -> None:
    need = inspect(BIG).decode_bytes
    decoder.budget = DecodeBudget(workers=2, timeout_s=30, max_mib_in_flight=-(-need // 2**20))

    async def two_requests() -> list[Any]:
        return await asyncio.gather(
            *(decoder.decode([BIG], LIMITS) for _ in range(2)), return_exceptions=True
        )

    outcomes = run(two_requests())
    assert sum(isinstance(o, DecodeBusy) and "MiB" in str(o) for o in outcomes) == 1


def test_an_image_bigger_than_the_memory_budget_is_413() -> None:
    small_budget = Decoder(DecodeBudget(max_mib_in_flight=16))
    with pytest.raises(ItemError, match="MiB") as raised:
        run(small_budget.decode([BIG], LIMITS))
    assert raised.value.status_code == 413
    small_budget.close()


def test_reconfigure_changes_the_worker_count(decoder: Decoder) -> None:
    decoder.reconfigure(DecodeBudget(workers=3))
    assert len(decoder.worker_pids()) == 3
    pids = decoder.worker_pids()
    decoder.reconfigure(DecodeBudget(workers=1))
    assert len(decoder.worker_pids()) == 1
    for pid in set(pids) - set(decoder.worker_pids()):
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=5)
            psutil.Process(pid)


def test_close_stops_every_worker() -> None:
    closing = Decoder(DecodeBudget(workers=2))
    closing.start()
    pids = closing.worker_pids()
    closing.close()
    for pid in pids:
        assert not alive(pid)


def test_workers_are_lean_and_yield_the_cpu(decoder: Decoder) -> None:
    with pytest.raises(ItemError):
        run(decoder.decode([BIG], LIMITS))
    for pid in decoder.worker_pids():
        maps = Path(f"/proc/{pid}/maps").read_text() if Path(f"/proc/{pid}/maps").exists() else ""
        assert "torch" not in maps and "/ray/" not in maps, "a decode worker loaded torch or ray"
        assert psutil.Process(pid).memory_info().rss < 200 * 2**20
        assert psutil.Process(pid).nice() >= 10  # the replica's event loop gets the CPU first


@pytest.mark.parametrize(
    "config",
    [
        {"workers": 0},
        {"workers": 99},
        {"timeout_s": 0},
        {"max_mib_in_flight": 0},
        {"inline_max_bytes": -1},
        {"typo": 1},
        {"workers": True},
    ],
)
def test_invalid_budgets_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DecodeBudget.from_config(config)
