"""Serving benchmark: this project's Ray Serve app against a reproduction of the seed's server, driven by wrk.

    python -m bench.serve_bench            # full run (about 4 min): bench/results/serve.{json,md,png}
    python -m bench.serve_bench --smoke    # a few seconds per level, results in a temporary folder

One server at a time on the same cores, the same model (``MODEL_DIR``, default ``./model``), the same sample
PNG and the same load (``wrk`` + ``bench/predict.lua``) at each concurrency after a warm-up:

* baseline: ``bench/seed_server.py`` (one uvicorn process, FastAPI, the seed's torchvision transform);
* Ray Serve: ``serve run ray_app/serve_config.yaml`` on a Ray of its own, with the HAProxy ingress
  (``RAY_SERVE_ENABLE_HA_PROXY=1``) as ``make serve`` runs it on Linux (``--ingress proxy`` for Serve's default
  Python proxy).

Then ``/predict/batch`` with many images per request (images/s) against the served network's bare batched
forward-pass rate measured in this process with torch on all CPUs. Every process started here is stopped on exit,
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import torch
import yaml

from ray_app.inference import LoadedModel
from ray_app.model import load_artifact
from tests.serving import (
    DEFAULT_INGRESS,
    SERVE_CONFIG,
    dashboard_address,
    launched,
    port_free,
    running_serve_app,
)
from tests.serving import progress as log

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "predict.lua"
SEED_SERVER = ROOT / "bench" / "seed_server.py"
BASELINE, OURS = "baseline", "ray_serve"
LABELS = {BASELINE: "seed-style FastAPI + uvicorn", OURS: "Ray Serve (this project)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--smoke`` shortens everything and writes to a temporary folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR", str(ROOT / "model")), help="env MODEL_DIR"
    )
    p.add_argument("--out", default="", help="results folder (default bench/results; smoke: a temp folder)")
    p.add_argument("--duration", type=float, default=15, help="seconds of load per concurrency level")
    p.add_argument("--warmup", type=float, default=5, help="seconds of load before measuring each server")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--sample", default=str(ROOT / "samples" / "zero.png"), help="the PNG every request sends")
    p.add_argument("--batch-images", type=int, default=64, help="images per /predict/batch request")
    p.add_argument("--batch-concurrency", type=int, default=4, help="connections for /predict/batch")
    p.add_argument("--baseline-port", type=int, default=8100)
    p.add_argument(
        "--baseline-threads", type=int, default=0, help="baseline's torch threads (0: as the seed)"
    )
    p.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default=DEFAULT_INGRESS,
        help="Ray Serve ingress: HAProxy (as `make serve` on Linux, the default there) or Serve's Python proxy",
    )
    p.add_argument("--port-wait", type=float, default=600, help="seconds to wait for Serve's port to be free")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds allowed for a server to start")
    p.add_argument("--smoke", action="store_true", help="1-2 s per level, to check that the benchmark works")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.concurrency, args.batch_images = 2, 1, "1,16", 8
    args.levels = [int(c) for c in args.concurrency.split(",")]
    default_out = (
        Path(tempfile.gettempdir()) / "mnist-bench-smoke" if args.smoke else ROOT / "bench" / "results"
    )
    args.out = Path(args.out) if args.out else default_out
    return args


def machine() -> dict[str, Any]:
    """CPU model and count, load average, versions and date: what a reader needs to weigh the numbers."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpu_model": model,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


# ---- HTTP and load
def post_image(url: str, sample: Path, field: str = "file") -> tuple[int, dict[str, Any]]:
    """One multipart POST; (status, JSON body) or (0, {}) when nothing answered."""
    boundary = "bench-3f9a1c"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{sample.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + sample.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wrk(
    url: str, connections: int, seconds: float, sample: Path, count: int = 1, token: str = ""
) -> dict[str, Any]:
    """Run wrk with ``bench/predict.lua`` and return its JSON summary (req/s, latency percentiles, errors);
    ``token`` is sent as a bearer token."""
    cmd = [
        "wrk",
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(sample),
        str(count),
    ]
    env = {**os.environ, "PREDICT_TOKEN": token}
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {"concurrency": connections, **summary}


def forward_rate(model_dir: str, batch: int, seconds: float) -> float:
    """Images/s of the served network's bare batched forward pass (the replicas' inference copy: BatchNorm
    folded, channels_last) in this process, torch threads = CPUs: the ceiling for images per request."""
    model = LoadedModel.from_artifact(load_artifact(model_dir)).model
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            model(x)
            runs += 1
    return batch * runs / elapsed


def load_levels(name: str, url: str, args: argparse.Namespace, sample: Path) -> list[dict[str, Any]]:
    """Warm-up, then one wrk run per concurrency level."""
    log(f"{name}: warm-up {args.warmup:g} s")
    wrk(url, max(args.levels), args.warmup, sample)
    levels = []
    for connections in args.levels:
        result = wrk(url, connections, args.duration, sample)
        log(f"{name}: c={connections} {result['rps']:.0f} req/s p99 {result['p99_ms']:.1f} ms")
        levels.append(result)
    return levels


# ---- the two servers
def run_baseline(args: argparse.Namespace, sample: Path, tmp: Path) -> dict[str, Any]:
    """Start the seed-style server, load it, stop it."""
    url = f"http://127.0.0.1:{args.baseline_port}/predict"
    if not port_free(args.baseline_port):
        raise RuntimeError(f"port {args.baseline_port} is busy; pass --baseline-port")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, str(SEED_SERVER), "--model-dir", args.model_dir, "--port", str(args.baseline_port)]
    cmd += ["--threads", str(args.baseline_threads)]

    def ready() -> bool:
        return post_image(url, sample)[0] == 200

    with launched(
        "baseline", cmd, env, tmp / "baseline.log", args.baseline_port, ready, args.startup_timeout
    ):
        prediction = post_image(url, sample)[1].get("prediction")
        return {
            "label": LABELS[BASELINE],
            "torch_threads": args.baseline_threads or "torch default",
            "prediction": prediction,
            "levels": load_levels(BASELINE, url, args, sample),
        }


def app_running(log_path: Path, env: dict[str, str]) -> bool:
    """True once ``serve status`` (asked on the dashboard address ``serve run`` logged) says RUNNING."""
    address = dashboard_address(log_path)
    if not address:
        return False
    cmd = [sys.executable, "-m", "ray.serve.scripts", "status", "--address", address]
    # Ray's token auth: the CLI sends ~/.ray/auth_token only when told the cluster uses it.
    done = subprocess.run(
        cmd, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60
    )
    try:
        apps = (yaml.safe_load(done.stdout) or {}).get("applications") or {}
    except yaml.YAMLError:
        return False
    return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())


def serve_settings() -> dict[str, Any]:
    """The deployment settings from the Serve config, for the report."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    deployment = config["applications"][0]["deployments"][0]
    return {
        "port": config["http_options"]["port"],
        "num_replicas": deployment.get("num_replicas"),
        "num_cpus": deployment.get("ray_actor_options", {}).get("num_cpus"),
        "max_ongoing_requests": deployment.get("max_ongoing_requests"),
        "max_batch_size": deployment.get("user_config", {}).get("max_batch_size"),
        "batch_wait_timeout_s": deployment.get("user_config", {}).get("batch_wait_timeout_s"),
    }


def run_ours(args: argparse.Namespace, sample: Path) -> dict[str, Any]:
    """``serve run`` the Serve config, load it (single images, then many per request), stop it."""
    settings = serve_settings()
    base = f"http://127.0.0.1:{settings['port']}"

    def ready(log_path: Path, env: dict[str, str]) -> bool:
        return post_image(f"{base}/predict", sample)[0] == 200 and app_running(log_path, env)

    with running_serve_app(
        Path(args.model_dir).resolve(),
        timeout_s=args.startup_timeout,
        lock_timeout_s=args.port_wait,
        ingress=args.ingress,
        ready=ready,
        port_wait_s=args.port_wait,
    ):
        prediction = post_image(f"{base}/predict", sample)[1].get("prediction")
        levels = load_levels(OURS, f"{base}/predict", args, sample)
        log(f"{OURS}: /predict/batch, {args.batch_images} images/request, c={args.batch_concurrency}")
        batch_url = f"{base}/predict/batch"
        wrk(batch_url, args.batch_concurrency, args.warmup, sample, args.batch_images)
        batch = wrk(batch_url, args.batch_concurrency, args.duration, sample, args.batch_images)
    batch |= {"images_per_request": args.batch_images, "images_per_s": batch["rps"] * args.batch_images}
    return {
        "label": LABELS[OURS],
        "ingress": args.ingress,
        "settings": settings,
        "prediction": prediction,
        "levels": levels,
        "batch": batch,
    }


# ---- results
def summarize(results: dict[str, Any]) -> None:
    """Add per-concurrency ratios ours/baseline and the issue's targets (informative; nothing asserts them)."""
    base = {r["concurrency"]: r for r in results[BASELINE]["levels"]}
    ours = {r["concurrency"]: r for r in results[OURS]["levels"]}
    results["ratios"] = [
        {
            "concurrency": c,
            "rps": round(ours[c]["rps"] / base[c]["rps"], 3) if base[c]["rps"] else None,
            "p99": round(ours[c]["p99_ms"] / base[c]["p99_ms"], 3) if base[c]["p99_ms"] else None,
        }
        for c in sorted(set(base) & set(ours))
    ]
    ratio = {r["concurrency"]: r["rps"] for r in results["ratios"]}
    targets = []
    if 16 in ours:
        clean = ours[16]["non_2xx"] == 0 and ours[16]["socket_errors"] == 0
        targets += [
            {
                "target": "c=16: req/s >= 2.0x baseline",
                "value": ratio.get(16),
                "met": (ratio.get(16) or 0) >= 2,
            },
            {"target": "c=16: p99 <= 50 ms", "value": ours[16]["p99_ms"], "met": ours[16]["p99_ms"] <= 50},
            {
                "target": "c=16: zero errors",
                "value": ours[16]["non_2xx"] + ours[16]["socket_errors"],
                "met": clean,
            },
        ]
    if 1 in ours:
        targets.append(
            {"target": "c=1: p50 <= 3 ms", "value": ours[1]["p50_ms"], "met": ours[1]["p50_ms"] <= 3}
        )
    images = round(results[OURS]["batch"]["images_per_s"])
    targets.append(
        {"target": "many images per request >= 5,000 images/s", "value": images, "met": images >= 5000}
    )
    results["targets"] = targets


def times(value: float | None) -> str:
    """A ratio as ``1.23×`` (``—`` when the baseline served nothing)."""
    return "—" if value is None else f"{value:.2f}×"


def markdown(results: dict[str, Any]) -> str:
    """The tables for the README."""
    m, s, ours = results["machine"], results["settings"], results[OURS]
    cfg = ours["settings"]
    lines = [
        "# Serving benchmark",
        "",
        f"{m['date']} · {m['cpu_model']}, {m['cpus']} CPUs · load average (1 min) {m['load_average_1m']} before, "
        f"{results['load_average_after']} after · Ray {m['ray']}, torch {m['torch']}, Python {m['python']}",
        "",
        f"`wrk` + `bench/predict.lua`, `{s['sample']}` ({s['sample_bytes']} bytes) in every request, "
        f"{s['duration_s']:g} s per level after a {s['warmup_s']:g} s warm-up, one server at a time on the same "
        "cores (wrk runs on them too).",
        "",
        f"- **Baseline**: {LABELS[BASELINE]} (`bench/seed_server.py`): one process, one image per request, "
        "torchvision `Resize((28, 28))` + `ToTensor` + `Normalize`, the same weights, torch threads: "
        f"{results[BASELINE]['torch_threads']}.",
        f"- **Ray Serve**: `ray_app/serve_config.yaml`: {cfg['num_replicas']} replicas × {cfg['num_cpus']} CPU, "
        f"`max_ongoing_requests` {cfg['max_ongoing_requests']}, `max_batch_size` {cfg['max_batch_size']}, "
        f"`batch_wait_timeout_s` {cfg['batch_wait_timeout_s']}; ingress: "
        f"{'HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`)' if ours['ingress'] == 'haproxy' else 'Serve proxy'}.",
        "",
        "| concurrency | baseline req/s | Ray Serve req/s | ours / baseline | baseline p50 / p90 / p99 ms "
        "| Ray Serve p50 / p90 / p99 ms | non-2xx + socket errors (baseline / ours) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["concurrency"]: r for r in results[BASELINE]["levels"]}
    ratio = {r["concurrency"]: r["rps"] for r in results["ratios"]}

    def pct(r: dict[str, Any]) -> str:
        return f"{r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['p99_ms']:.1f}"

    for o in ours["levels"]:
        b = base[o["concurrency"]]
        lines.append(
            f"| {o['concurrency']} | {b['rps']:,.0f} | {o['rps']:,.0f} | {times(ratio[o['concurrency']])} "
            f"| {pct(b)} | {pct(o)} | {b['non_2xx'] + b['socket_errors']} / {o['non_2xx'] + o['socket_errors']} |"
        )
    batch = ours["batch"]
    raw = ", ".join(f"batch {r['batch']}: {r['images_per_s']:,.0f}" for r in results["raw_forward"])
    lines += [
        "",
        f"Many images per request (`POST /predict/batch`, {batch['images_per_request']} `files` parts, "
        f"{batch['concurrency']} connections): **{batch['images_per_s']:,.0f} images/s** "
        f"({batch['rps']:,.1f} req/s, p99 {batch['p99_ms']:.0f} ms, "
        f"{batch['non_2xx'] + batch['socket_errors']} errors). "
        f"The served network's bare forward pass in one process on all {m['cpus']} CPUs (images/s): {raw}.",
        "",
        "| target (issue) | value | met |",
        "|---|---:|:-:|",
        *(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]),
        "",
        "![req/s and p99 latency vs concurrency](serve.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """req/s and p99 latency against concurrency, both systems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, marker in ((BASELINE, "o"), (OURS, "s")):
        levels = results[key]["levels"]
        xs = [r["concurrency"] for r in levels]
        left.plot(xs, [r["rps"] for r in levels], marker=marker, label=LABELS[key])
        right.plot(
            xs,
            [r["p99_ms"] if r["requests"] else float("nan") for r in levels],
            marker=marker,
            label=LABELS[key],
        )
    for ax, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            results["settings"]["concurrency"], [str(c) for c in results["settings"]["concurrency"]]
        )
        ax.set_xlabel("concurrent connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    left.legend()
    m = results["machine"]
    fig.suptitle(
        f"POST /predict, one PNG per request · {m['cpu_model']}, {m['cpus']} CPUs · {m['date'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``serve.json``, ``serve.md`` and ``serve.png``."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on `kill` too
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    sample = Path(args.sample).resolve()
    load_artifact(args.model_dir)  # fail early, with the artifact's own message, if there is no model
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "sample": str(sample.relative_to(ROOT)) if sample.is_relative_to(ROOT) else str(sample),
            "sample_bytes": sample.stat().st_size,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.levels,
            "smoke": args.smoke,
            "load_generator": subprocess.run(
                ["wrk", "--version"], capture_output=True, text=True
            ).stdout.split(" Copyright")[0],
        },
    }
    log(f"machine: {results['machine']}")
    torch.set_num_threads(results["machine"]["cpus"])
    cfg_batch = serve_settings()["max_batch_size"]
    seconds = 0.5 if args.smoke else 3
    results["raw_forward"] = [
        {"batch": b, "images_per_s": round(forward_rate(args.model_dir, b, seconds))}
        for b in sorted({cfg_batch, args.batch_images})
    ]
    log(f"raw forward pass: {results['raw_forward']}")
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        results[BASELINE] = run_baseline(args, sample, Path(tmp))
    results[OURS] = run_ours(args, sample)  # takes the port lock Serve runs on this machine share
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    summarize(results)
    (args.out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown(results))
    plot(results, args.out / "serve.png")
    log(f"wrote {args.out}/serve.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
