"""Soak test: sustained ``/predict`` load, reporting errors, p50/p99 per window and replica memory over time.

    python bench/soak.py                   # 5 min at concurrency 32 against a `serve run` it starts (MODEL_DIR)
    python bench/soak.py --url http://host:8000 --token "$PREDICT_TOKEN"   # against a running service
    python bench/soak.py --smoke           # 10 s, results in a temporary folder

Writes ``soak.json`` and ``soak.md`` (default ``bench/results``). Replica memory is the RSS of the
``ServeReplica:mnist:MNISTClassifier`` processes on this machine (only those of the Ray started here, or of
``--ray-tmpdir``). Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
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


async def soak(
    url: str, args: argparse.Namespace, data: bytes, ray_tmpdir: str
) -> tuple[list[tuple[float, float, str]], list[dict[str, Any]]]:
    """Run the load; return (seconds since start, latency s, status or error) per request and memory samples."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    records: list[tuple[float, float, str]] = []
    memory: list[dict[str, Any]] = []
    start = time.monotonic()
    deadline = start + args.duration
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as http:

        async def worker() -> None:
            while time.monotonic() < deadline:
                began = time.monotonic()
                try:
                    response = await http.post("/predict", files={"file": ("digit.png", data)})
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                records.append((began - start, time.monotonic() - began, outcome))

        async def sampler() -> None:
            while time.monotonic() < deadline:
                procs = await asyncio.to_thread(replicas, ray_tmpdir)
                memory.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(procs)})
                await asyncio.sleep(min(5.0, args.window / 2))

        await asyncio.gather(sampler(), *(worker() for _ in range(args.concurrency)))
    return records, memory


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` in ms (nearest rank)."""
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def summarize(records: list[tuple[float, float, str]], memory: list[dict[str, Any]], window: float) -> dict:
    """Totals, per-window latency and throughput, and replica memory growth."""
    windows = []
    count = max(1, int(max((t for t, _, _ in records), default=0) // window) + 1)
    for i in range(count):
        inside = [(lat, outcome) for t, lat, outcome in records if i * window <= t < (i + 1) * window]
        ok = [lat for lat, outcome in inside if outcome == "200"]
        windows.append(
            {
                "start_s": i * window,
                "requests": len(inside),
                "errors": len(inside) - len(ok),
                "rps": round(len(inside) / window, 1),
                "p50_ms": percentile(ok, 0.5) if ok else None,
                "p99_ms": percentile(ok, 0.99) if ok else None,
            }
        )
    outcomes: dict[str, int] = {}
    for _, _, outcome in records:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    first, last = (memory[0]["rss_mb"], memory[-1]["rss_mb"]) if memory else ({}, {})
    growth = {
        pid: round(100 * (last[pid] - first[pid]) / first[pid], 1)
        for pid in first
        if pid in last and first[pid]
    }
    latencies = [lat for _, lat, outcome in records if outcome == "200"]
    p99s = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    return {
        "requests": len(records),
        "errors": len(records) - outcomes.get("200", 0),
        "outcomes": outcomes,
        "p50_ms": percentile(latencies, 0.5) if latencies else None,
        "p99_ms": percentile(latencies, 0.99) if latencies else None,
        "p99_spread": round(max(p99s) / statistics.median(p99s), 2) if p99s else None,
        "windows": windows,
        "memory": memory,
        "rss_growth_pct": growth,
    }


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report."""
    s = result["summary"]
    lines = [
        "# Soak test",
        "",
        f"{result['duration_s']:g} s at concurrency {result['concurrency']} against {result['url']} "
        f"({result['date']}, load average {result['load_average_start']} → {result['load_average_end']}, "
        f"{result['cpus']} CPUs). Requests: {s['requests']}, errors: {s['errors']} {s['outcomes']}; "
        f"overall p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms; max window p99 / median window p99 = "
        f"{s['p99_spread']}.",
        "",
        "| window start (s) | requests | errors | req/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {w['start_s']:g} | {w['requests']} | {w['errors']} | {w['rps']} | {w['p50_ms']} | {w['p99_ms']} |"
            for w in s["windows"]
        ),
        "",
        "Replica RSS (MB) over time:",
        "",
        "| t (s) | "
        + " | ".join(f"pid {pid}" for pid in (s["memory"][0]["rss_mb"] if s["memory"] else {}))
        + " |",
    ]
    pids = list(s["memory"][0]["rss_mb"]) if s["memory"] else []
    lines.append("|---:|" + "---:|" * len(pids))
    for sample in s["memory"]:
        lines.append(
            f"| {sample['t_s']} | " + " | ".join(str(sample["rss_mb"].get(p, "")) for p in pids) + " |"
        )
    lines += ["", f"RSS growth first → last sample (%): {s['rss_growth_pct']}", ""]
    return "\n".join(lines)


def run(url: str, args: argparse.Namespace, ray_tmpdir: str) -> dict[str, Any]:
    """Warm up, soak, summarize."""
    data = Path(args.sample).read_bytes()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    warm = httpx.post(f"{url}/predict", files={"file": ("digit.png", data)}, headers=headers, timeout=60)
    if warm.status_code != 200:
        raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text[:300]}")
    load_start = round(os.getloadavg()[0], 2)
    records, memory = asyncio.run(soak(url, args, data, ray_tmpdir))
    return {
        "url": url,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_start": load_start,
        "load_average_end": round(os.getloadavg()[0], 2),
        "summary": summarize(records, memory, args.window),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        result = run(args.url.rstrip("/"), args, args.ray_tmpdir)
    else:
        sys.path.insert(0, str(ROOT))
        from tests.test_serve import running_serve_app  # the tests' `serve run` lifecycle (starts and stops)

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
