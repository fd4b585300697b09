"""Hostile-upload benchmark: what each hostile input costs a replica (answer time, event-loop stall, memory).

    python -m bench.hostile                 # against a `serve run` it starts (MODEL_DIR), 3 rounds per case
    python -m bench.hostile --smoke         # 1 round, results in a temporary folder

Each case of ``tests/hostile_inputs.py`` (plus three legitimate uploads for comparison) is sent to one replica's
own HTTP port while a thread sends ``GET /healthz`` to the same replica back to back (the stall is the longest
probe wait during the case, next to the idle baseline) and another samples the resident memory of the replica and
its decode workers (peak growth over the pre-case level). The header check's in-process time is measured too.
Writes ``hostile.json`` and ``hostile.md`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ray_app.preprocess import InputError, inspect
from tests.helpers import replica_pids, replica_url
from tests.hostile_inputs import (
    Case,
    Probe,
    cases,
    family_rss,
    phone_photo_jpeg,
    screenshot_png,
    send,
)
from tests.serving import running_serve_app  # the tests' `serve run`: starts and stops it

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--smoke`` runs one round and writes to a temporary folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir",
        default=os.environ.get("MODEL_DIR", str(ROOT / "model")),
        help="env MODEL_DIR (default ./model)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="times each case is sent (default 3; the median is shown)"
    )
    p.add_argument("--out", default="", help="results folder (default bench/results; smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = 1
    args.out = args.out or (
        tempfile.mkdtemp(prefix="hostile-") if args.smoke else str(ROOT / "bench" / "results")
    )
    return args


def legitimate() -> list[Case]:
    """Uploads real users send, for comparison: an MNIST-style sample, a 12 MP phone photo, a 4K screenshot."""
    ink = np.zeros((28, 28), np.uint8)
    ink[4:24, 12:16] = 255  # a '1'
    ok = frozenset({200})
    return [
        Case(
            "legit: samples/zero.png",
            "legitimate",
            "file",
            (ROOT / "samples" / "zero.png").read_bytes(),
            ok,
            "",
        ),
        Case("legit: 12 MP phone photo", "legitimate", "file", phone_photo_jpeg(ink), ok, ""),
        Case("legit: 4K screenshot PNG", "legitimate", "file", screenshot_png(ink), ok, ""),
    ]


class MemoryPeak:
    """Samples the replica family's RSS every 20 ms; ``peak_since(t)`` is the highest sample taken after ``t``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a worker exiting between listing and reading
                self.samples.append((time.monotonic(), family_rss(self.pid)))
            self._stop.wait(0.02)

    def peak_since(self, since: float) -> int:
        """Highest RSS sampled at or after ``since``."""
        return max((rss for t, rss in self.samples if t >= since), default=0)

    def stop(self) -> None:
        """End the sampling."""
        self._stop.set()
        self._thread.join()


def header_check_us(case: Case) -> float | None:
    """In-process time of ``inspect`` (the header check) in microseconds, best of 5 (None for non-file cases)."""
    if case.kind != "file":
        return None
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        with contextlib.suppress(InputError):
            inspect(case.data)
        best = min(best, time.perf_counter() - started)
    return round(best * 1e6, 1)


def measure(url: str, pid: int, battery: list[Case], rounds: int) -> dict[str, Any]:
    """Send every case ``rounds`` times; time, status, stall and memory per case."""
    for _ in range(3):  # warm-up: decode workers started and used once
        send(url, legitimate()[2])
    memory = MemoryPeak(pid)
    rows = []
    with Probe(url).running() as probe:
        time.sleep(2)
        idle = [s for _, s in probe.samples]
        for case in battery:
            times, stalls, growths, answers = [], [], [], []
            for _ in range(rounds):
                time.sleep(0.3)
                before = family_rss(pid)
                started = time.monotonic()
                status, detail = send(url, case)
                times.append(time.monotonic() - started)
                stalls.append(probe.worst(started))
                time.sleep(0.05)
                growths.append(max(0, memory.peak_since(started) - before))
                answers.append((status, detail))
            status, detail = answers[-1]
            rows.append(
                {
                    "case": case.name,
                    "threat": case.row,
                    "bytes": len(case.data),
                    "status": status,
                    "detail": detail[:140],
                    "expected": status in case.statuses,
                    "answer_ms": round(1000 * statistics.median(times), 1),
                    "answer_ms_max": round(1000 * max(times), 1),
                    "healthz_worst_ms": round(1000 * max(stalls), 1),
                    "rss_peak_growth_mb": round(max(growths) / 2**20, 1),
                    "header_check_us": header_check_us(case),
                }
            )
    memory.stop()
    return {
        "healthz_idle_ms": {
            "p50": round(1000 * statistics.median(idle), 1),
            "max": round(1000 * max(idle), 1),
            "samples": len(idle),
        },
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report."""
    idle = result["healthz_idle_ms"]
    lines = [
        "# Hostile uploads: what each one costs a replica",
        "",
        f"`python -m bench.hostile` on {result['date']}, {result['cpus']} CPUs, load average "
        f"{result['load_average_start']} → {result['load_average_end']}; each case sent {result['rounds']} time(s) "
        "to one replica's own HTTP port (median answer time shown, worst stall and memory over the rounds). "
        f"`/healthz` on the same replica, back to back: idle p50 {idle['p50']} ms, max {idle['max']} ms "
        f"({idle['samples']} probes). Memory is the peak RSS growth of the replica plus its decode workers. "
        "Header check: in-process `inspect()` time, before any pixel is decoded. Timing on a shared machine is "
        "noisy; compare rows, not runs.",
        "",
        "| case | threat | bytes | answer | answer ms | /healthz worst ms | RSS peak +MB | header check µs |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        check = "" if r["header_check_us"] is None else f"{r['header_check_us']:g}"
        answer = f"{r['status']} {r['detail'][:70]}".replace("|", "\\|")
        lines.append(
            f"| {r['case']} | {r['threat']} | {r['bytes']} | {answer} | {r['answer_ms']:g} | "
            f"{r['healthz_worst_ms']:g} | {r['rss_peak_growth_mb']:g} | {check} |"
        )
    unexpected = [r["case"] for r in result["rows"] if not r["expected"]]
    lines += ["", f"Unexpected answers: {', '.join(unexpected) if unexpected else 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    battery = cases() + legitimate()
    with running_serve_app(Path(args.model_dir).resolve()) as served:
        deadline = time.monotonic() + 120
        while httpx.get(f"{served.url}/healthz", timeout=5).json().get("status") != "ok":
            if time.monotonic() > deadline:
                raise SystemExit(f"no model served from {args.model_dir}")
            time.sleep(0.5)
        pid = min(replica_pids(served.log.parent))
        load_start = round(os.getloadavg()[0], 2)
        measured = measure(replica_url(pid), pid, battery, args.rounds)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "rounds": args.rounds,
        "load_average_start": load_start,
        "load_average_end": round(os.getloadavg()[0], 2),
        **measured,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "hostile.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results: {out / 'hostile.json'}, {out / 'hostile.md'}")
    return 0 if all(r["expected"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
