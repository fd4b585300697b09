"""Soak test: sustained ``/predict`` load from ``wrk`` in windows: errors, p50/p99 per window, replica memory.

    python -m bench.soak                   # 5 min at concurrency 32 against a `serve run` it starts (MODEL_DIR)
    python -m bench.soak --url http://host:8000 --token "$PREDICT_TOKEN"   # against a running service
    python -m bench.soak --smoke           # 10 s, results in a temporary folder

Writes ``soak.json`` and ``soak.md`` (default ``bench/results``). Replica memory is the RSS of the
``ServeReplica:mnist:MNISTClassifier`` processes on this machine (only those of the Ray started here, or of
``--ray-tmpdir``). Exit status 1 if any request failed.
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
import psutil

from bench.serve_bench import wrk
from tests.serving import ROOT, running_serve_app

REPLICA = "ServeReplica:mnist:MNISTClassifier"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--smoke`` shortens the run and writes to a temporary folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="", help="a running service (default: start `serve run` here)")
    p.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR", str(ROOT / "model")), help="env MODEL_DIR"
    )
    p.add_argument("--token", default=os.environ.get("PREDICT_TOKEN", ""), help="env PREDICT_TOKEN")
    p.add_argument(
        "--ray-tmpdir", default="", help="with --url: only replicas of the Ray using this RAY_TMPDIR"
    )
    p.add_argument("--duration", type=float, default=300, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--window", type=float, default=30, help="seconds per reporting window")
    p.add_argument(
        "--sample", default=str(ROOT / "samples" / "zero.png"), help="the image every request sends"
    )
    p.add_argument("--out", default="", help="results folder (default bench/results; smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="10 s in 5 s windows")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.window = 10, 5
    args.out = args.out or (
        tempfile.mkdtemp(prefix="soak-") if args.smoke else str(ROOT / "bench" / "results")
    )
    return args


def replicas(ray_tmpdir: str) -> list[psutil.Process]:
    """The MNIST Serve replica processes (of the Ray using ``ray_tmpdir``, if given)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if REPLICA not in " ".join(proc.info["cmdline"] or []):
                continue
            if ray_tmpdir and proc.environ().get("RAY_TMPDIR") != ray_tmpdir:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found.append(proc)
    return found


def rss_mb(procs: list[psutil.Process]) -> dict[str, float]:
    """Resident memory per replica PID in MB (processes that vanished are left out)."""
    out = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out[str(proc.pid)] = round(proc.memory_info().rss / 2**20, 1)
    return out


def soak(url: str, args: argparse.Namespace, ray_tmpdir: str) -> tuple[list[dict], list[dict[str, Any]]]:
    """Back-to-back ``wrk`` windows on ``/predict`` while a thread samples replica memory; return both."""
    memory: list[dict[str, Any]] = []
    stop = threading.Event()
    start = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            memory.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(replicas(ray_tmpdir))})
            stop.wait(min(5.0, args.window / 2))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    windows = []
    try:
        for i in range(max(1, round(args.duration / args.window))):
            result = wrk(f"{url}/predict", args.concurrency, args.window, Path(args.sample), token=args.token)
            windows.append({"start_s": round(i * args.window, 1), **result})
    finally:
        stop.set()
        thread.join()
    return windows, memory


def summarize(windows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, per-window latency and throughput, and replica memory growth."""
    first, last = (memory[0]["rss_mb"], memory[-1]["rss_mb"]) if memory else ({}, {})
    growth = {
        pid: round(100 * (last[pid] - first[pid]) / first[pid], 1)
        for pid in first
        if pid in last and first[pid]
    }
    p99s = [w["p99_ms"] for w in windows]
    return {
        "requests": sum(w["requests"] for w in windows),
        "errors": sum(w["non_2xx"] + w["socket_errors"] for w in windows),
        "rps": round(statistics.mean(w["rps"] for w in windows), 1),
        "p50_ms_median_window": round(statistics.median(w["p50_ms"] for w in windows), 1),
        "p99_ms_range": [round(min(p99s), 1), round(max(p99s), 1)],
        "p99_spread": round(max(p99s) / statistics.median(p99s), 2),
        "windows": windows,
        "memory": memory,
        "rss_growth_pct": growth,
    }


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report."""
    s = result["summary"]
    pids = list(s["memory"][0]["rss_mb"]) if s["memory"] else []
    lines = [
        "# Soak test",
        "",
        f"{result['duration_s']:g} s of `wrk` at concurrency {result['concurrency']} on {result['url']}/predict in "
        f"{result['window_s']:g} s windows ({result['date']}, load average {result['load_average_start']} → "
        f"{result['load_average_end']}, {result['cpus']} CPUs). Requests: {s['requests']}, errors (non-2xx + "
        f"socket): {s['errors']}; {s['rps']} req/s; median window p50 {s['p50_ms_median_window']} ms; window "
        f"p99 {s['p99_ms_range'][0]}–{s['p99_ms_range'][1]} ms (max / median = {s['p99_spread']}).",
        "",
        "| window start (s) | requests | errors | req/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {w['start_s']:g} | {w['requests']} | {w['non_2xx'] + w['socket_errors']} | {w['rps']} "
            f"| {w['p50_ms']:.1f} | {w['p99_ms']:.1f} |"
            for w in s["windows"]
        ),
        "",
        "Replica RSS (MB) over time:",
        "",
        "| t (s) | " + " | ".join(f"pid {pid}" for pid in pids) + " |",
        "|---:|" + "---:|" * len(pids),
        *(
            f"| {m['t_s']} | " + " | ".join(str(m["rss_mb"].get(p, "")) for p in pids) + " |"
            for m in s["memory"]
        ),
        "",
        f"RSS growth first → last sample (%): {s['rss_growth_pct']}",
        "",
    ]
    return "\n".join(lines)


def run(url: str, args: argparse.Namespace, ray_tmpdir: str) -> dict[str, Any]:
    """Warm up, soak, summarize."""
    data = Path(args.sample).read_bytes()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    warm = httpx.post(f"{url}/predict", files={"file": ("digit.png", data)}, headers=headers, timeout=60)
    if warm.status_code != 200:
        raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text[:300]}")
    load_start = round(os.getloadavg()[0], 2)
    windows, memory = soak(url, args, ray_tmpdir)
    return {
        "url": url,
        "duration_s": args.duration,
        "window_s": args.window,
        "concurrency": args.concurrency,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_start": load_start,
        "load_average_end": round(os.getloadavg()[0], 2),
        "summary": summarize(windows, memory),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        result = run(args.url.rstrip("/"), args, args.ray_tmpdir)
    else:
        with running_serve_app(Path(args.model_dir).resolve()) as served:
            result = run(served.url, args, str(served.log.parent))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results: {out / 'soak.json'}, {out / 'soak.md'}")
    return 1 if result["summary"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
