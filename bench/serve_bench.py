"""Serving benchmark: this project's Ray Serve app against the servers a user would pick instead, driven by wrk.

    python -m bench.serve_bench            # full run (about 9 min): bench/results/serve.{json,md,png}
    python -m bench.serve_bench --smoke    # one short round, results in a temporary folder
    python -m bench.serve_bench --smoke --servers ray_serve,baseline   # without the peers' virtualenvs
    python -m bench.serve_bench --render   # serve.md/png again from serve.json, with bench/results/serve-notes.md

Four servers, each serving the same network and weights (``MODEL_DIR``, default ``./model``), one at a time on the
same cores, alternated over ``--rounds`` rounds (the order reversed every other round):

* ``ray_serve``: ``serve run ray_app/serve_config.yaml`` on a Ray of its own with the HAProxy ingress
  (``RAY_SERVE_ENABLE_HA_PROXY=1``), as ``make serve`` runs it on Linux; the project's full upload recipe;
* ``baseline``: ``bench/seed_server.py``, the seed's server reproduced (one uvicorn process, FastAPI, the seed's
  torchvision transform);
* ``litserve`` and ``bentoml``: ``bench/peers/``, the seed's preprocessing, dynamic batching on, 2 workers, each in a
  virtualenv of its own (``bench/peers/venvs.py`` creates them on first use: a few minutes).

Torch runs one thread per worker process in every server (Serve: ``num_cpus: 1`` per replica). Per server and
round: cold start (process start → first good ``/predict``), idle memory of each worker (replica) and of all the
server's processes, then ``wrk -t1`` + ``bench/predict.lua`` with the same PNG at each concurrency after a warm-up
(req/s, p50/p90/p99, non-2xx and socket errors). For ``ray_serve`` also ``/predict/batch`` with many images per
request (images/s) and, on a running Ray (``ray start``, its head ready as KubeRay's probe sees it), ``serve
deploy`` → first good ``/predict``. The targets are marked met or not from these figures. Every process started
here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
import yaml
from filelock import FileLock

from bench.peers import venvs
from ray_app.inference import LoadedModel
from ray_app.model import load_artifact
from tests.serving import (
    DEFAULT_INGRESS,
    PORT,
    PORT_LOCK,
    SERVE_CONFIG,
    dashboard_address,
    free_port,
    launched,
    port_free,
    running_serve_app,
    serve_env,
    stop_session,
)
from tests.serving import progress as log

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "predict.lua"
SEED_SERVER = ROOT / "bench" / "seed_server.py"
OURS, BASELINE, LITSERVE, BENTOML = "ray_serve", "baseline", "litserve", "bentoml"
SERVERS = (OURS, BASELINE, LITSERVE, BENTOML)
PEERS = (BASELINE, LITSERVE, BENTOML)
LABELS = {
    OURS: "this project (Ray Serve config, HAProxy)",
    BASELINE: "seed-style FastAPI + uvicorn",
    LITSERVE: "LitServe",
    BENTOML: "BentoML",
}
REPLICA = "ServeReplica:mnist:MNISTClassifier"
MARKER = "SERVE_BENCH_RUN"  # set in every server's environment: finds its processes
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--smoke`` shortens everything and writes to a temporary folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR", str(ROOT / "model")), help="env MODEL_DIR"
    )
    p.add_argument("--out", default="", help="results folder (default bench/results; smoke: a temp folder)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds over all servers (order reversed each round)"
    )
    p.add_argument("--duration", type=float, default=6, help="seconds of load per concurrency level")
    p.add_argument("--warmup", type=float, default=3, help="seconds of load before measuring each server")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--sample", default=str(ROOT / "samples" / "zero.png"), help="the PNG every request sends")
    p.add_argument("--batch-images", type=int, default=64, help="images per /predict/batch request")
    p.add_argument("--batch-concurrency", type=int, default=4, help="connections for /predict/batch")
    p.add_argument("--baseline-port", type=int, default=8100)
    p.add_argument("--litserve-port", type=int, default=8101)
    p.add_argument("--bentoml-port", type=int, default=8102)
    p.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default=DEFAULT_INGRESS,
        help="Ray Serve ingress: HAProxy (as `make serve` on Linux, the default there) or Serve's Python proxy",
    )
    p.add_argument("--no-deploy", action="store_true", help="skip `serve deploy` on a running Ray")
    p.add_argument(
        "--notes",
        default=str(ROOT / "bench" / "results" / "serve-notes.md"),
        help="Markdown appended to serve.md (where the time goes, what was tried), if the file exists",
    )
    p.add_argument("--port-wait", type=float, default=600, help="seconds to wait for Serve's port to be free")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds allowed for a server to start")
    p.add_argument("--smoke", action="store_true", help="one round, 1-2 s per level: check that it all works")
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite serve.md and serve.png from serve.json (and --notes)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.concurrency, args.batch_images = 1, 2, 1, "1,16", 8
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(args.servers) - set(SERVERS):
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
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
def post_image(url: str, sample: Path, field: str = "file", timeout: float = 10) -> tuple[int, Any]:
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
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def prediction(body: Any) -> int | None:
    """The digit in a ``/predict`` answer (BentoML's batchable API wraps it in a one-element list)."""
    if isinstance(body, list) and body:
        body = body[0]
    return body.get("prediction") if isinstance(body, dict) else None


def wrk(
    url: str, connections: int, seconds: float, sample: Path, count: int = 1, token: str = ""
) -> dict[str, Any]:
    """Run ``wrk -t1`` with ``bench/predict.lua`` and return its JSON summary (req/s, latency percentiles,
    errors); ``token`` is sent as a bearer token. One wrk thread leaves the most CPU to the server."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    cmd += ["-s", str(LUA), url, "--", str(sample), str(count)]
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
        log(
            f"{name}: c={connections} {result['rps']:.0f} req/s p50 {result['p50_ms']:.1f} ms "
            f"p99 {result['p99_ms']:.1f} ms errors {result['non_2xx'] + result['socket_errors']}"
        )
        levels.append(result)
    return levels


# ---- processes: cold start and memory
def marked(token: str) -> list[psutil.Process]:
    """The processes whose environment carries ``SERVE_BENCH_RUN=token``: one server and all it started."""
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get(MARKER) == token:
                found.append(proc)
    return found


class FirstAnswer:
    """Polls ``/predict`` 20 times a second from a thread and records when it first answered 200 while a process
    of the server (``token``) existed: the end of a cold start. Its call is the ``ready`` check of a launch."""

    def __init__(self, url: str, sample: Path, token: str, timeout_s: float) -> None:
        self.url, self.sample, self.token = url, sample, token
        self.at: float | None = None  # time.time() of the first good answer
        self.body: Any = None
        self.stop = threading.Event()
        self.deadline = time.monotonic() + timeout_s
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            status, body = post_image(self.url, self.sample, timeout=5)
            if status == 200 and marked(self.token):  # not another program's answer on the same port
                self.at, self.body = time.time(), body
                return
            time.sleep(0.05)

    def __call__(self, *_: Any) -> bool:
        return self.at is not None

    def close(self) -> None:
        """Stop polling (a launch that failed)."""
        self.stop.set()


def started_at(token: str) -> float:
    """When the server's first process started (``time.time()`` scale, 10 ms resolution)."""
    return min(proc.create_time() for proc in marked(token))


def memory(token: str, workers: Callable[[psutil.Process], bool]) -> dict[str, Any]:
    """Idle memory: RSS, USS and PSS (MB) of each worker process (those ``workers`` picks) and the PSS of all
    the server's processes (shared pages counted once)."""
    rows, total_pss, count = [], 0.0, 0
    for proc in marked(token):
        with suppress(psutil.Error):
            info = proc.memory_full_info()
            total_pss += info.pss / MB
            count += 1
            if workers(proc):
                rows.append(
                    {
                        "pid": proc.pid,
                        "rss_mb": round(info.rss / MB, 1),
                        "uss_mb": round(info.uss / MB, 1),
                        "pss_mb": round(info.pss / MB, 1),
                    }
                )
    return {"workers": rows, "processes": count, "server_pss_mb": round(total_pss, 1)}


def is_replica(proc: psutil.Process) -> bool:
    """A Serve replica of the MNIST app."""
    return REPLICA in " ".join(proc.cmdline())


def loaded_model(pid_dir: Path) -> Callable[[psutil.Process], bool]:
    """Picks the peer processes that loaded the model (each left its PID in ``pid_dir``)."""
    return lambda proc: (pid_dir / str(proc.pid)).exists()


def settle(seconds: float = 2) -> None:
    """Let a server that just answered its first request go idle before its memory is read."""
    time.sleep(seconds)


# ---- the servers
def peer_command(name: str, port: int) -> list[str]:
    """How each peer is started (in its own virtualenv, except the seed-style server: this project's)."""
    if name == BASELINE:
        return [sys.executable, str(SEED_SERVER), "--port", str(port), "--threads", "1"]
    py = str(venvs.ensure(name))
    if name == LITSERVE:
        return [py, str(ROOT / "bench" / "peers" / "litserve_app.py"), "--port", str(port)]
    service = "bench.peers.bentoml_service:MNISTService"
    return [py, "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)]


def run_peer(name: str, port: int, args: argparse.Namespace, sample: Path, tmp: Path) -> dict[str, Any]:
    """Start a peer, measure its cold start and idle memory, load it, stop it."""
    url = f"http://127.0.0.1:{port}/predict"
    if not port_free(port):
        raise RuntimeError(f"port {port} is busy; pass --{name}-port")
    token, pid_dir = secrets.token_hex(8), tmp / f"{name}-pids"
    shutil.rmtree(pid_dir, ignore_errors=True)
    pid_dir.mkdir()
    cmd = peer_command(name, port)
    if name == BASELINE:
        cmd += ["--model-dir", args.model_dir]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MODEL_DIR": str(Path(args.model_dir).resolve()),
        "OMP_NUM_THREADS": "1",
        "TORCH_THREADS": "1",
        "PEER_PID_DIR": str(pid_dir),
        "BENTOML_HOME": str(tmp / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        MARKER: token,
    }
    first = FirstAnswer(url, sample, token, args.startup_timeout)
    try:
        with launched(name, cmd, env, tmp / f"{name}.log", port, first, args.startup_timeout) as proc:
            cold = first.at - started_at(token)
            settle()
            workers = (lambda p: p.pid == proc.pid) if name == BASELINE else loaded_model(pid_dir)
            idle = memory(token, workers)
            log(f"{name}: cold start {cold:.1f} s, idle {idle}")
            return {
                "cold_start_s": round(cold, 2),
                "memory": idle,
                "prediction": prediction(first.body),
                "levels": load_levels(name, url, args, sample),
            }
    finally:
        first.close()


def run_ours(args: argparse.Namespace, sample: Path) -> dict[str, Any]:
    """``serve run`` the Serve config: cold start, idle memory, load (single images, then many per request)."""
    base = f"http://127.0.0.1:{PORT}"
    token = secrets.token_hex(8)
    first = FirstAnswer(f"{base}/predict", sample, token, args.port_wait + args.startup_timeout)

    def ready(log_path: Path, env: dict[str, str]) -> bool:
        return first() and app_running(log_path, env)

    try:
        with running_serve_app(
            Path(args.model_dir).resolve(),
            timeout_s=args.startup_timeout,
            env={MARKER: token},
            lock_timeout_s=args.port_wait,
            ingress=args.ingress,
            ready=ready,
            port_wait_s=args.port_wait,
        ):
            cold = first.at - started_at(token)
            settle()
            idle = memory(token, is_replica)
            log(f"{OURS}: cold start {cold:.1f} s, idle {idle}")
            levels = load_levels(OURS, f"{base}/predict", args, sample)
            log(f"{OURS}: /predict/batch, {args.batch_images} images/request, c={args.batch_concurrency}")
            batch_url = f"{base}/predict/batch"
            wrk(batch_url, args.batch_concurrency, args.warmup, sample, args.batch_images)
            batch = wrk(batch_url, args.batch_concurrency, args.duration, sample, args.batch_images)
    finally:
        first.close()
    batch |= {
        "images_per_request": args.batch_images,
        "images_per_s": round(batch["rps"] * args.batch_images),
    }
    log(f"{OURS}: /predict/batch {batch['images_per_s']:,} images/s")
    return {
        "cold_start_s": round(cold, 2),
        "memory": idle,
        "prediction": prediction(first.body),
        "levels": levels,
        "batch": batch,
    }


def app_running(log_path: Path, env: dict[str, str]) -> bool:
    """True once ``serve status`` (asked on the dashboard address ``serve run`` logged) says RUNNING."""
    address = dashboard_address(log_path)
    return bool(address) and serve_status(address, {**env, "RAY_AUTH_MODE": "token"})


def serve_status(address: str, env: dict[str, str]) -> bool:
    """True when every application on the Ray at dashboard ``address`` is RUNNING."""
    cmd = [sys.executable, "-m", "ray.serve.scripts", "status", "--address", address]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    try:
        apps = (yaml.safe_load(done.stdout) or {}).get("applications") or {}
    except yaml.YAMLError:
        return False
    return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())


@contextmanager
def running_ray(args: argparse.Namespace, token: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``ray start --head --block`` on private ports and a private ``RAY_TMPDIR``, with the environment Serve's
    ingress needs and ``MODEL_DIR`` (what the replicas read), holding Serve's port lock; yields the dashboard
    address and the environment for the ``serve`` CLI once the head is ready as KubeRay's readiness probe sees
    it. Stopped with everything it started on exit."""
    with FileLock(PORT_LOCK, timeout=args.port_wait):
        deadline = time.monotonic() + args.port_wait
        while not port_free(PORT):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {PORT} is busy; stop whatever serves there first")
            time.sleep(2)
        ray_tmp = tempfile.mkdtemp(prefix="rd-", dir="/tmp")  # short: socket paths must fit in 107 bytes
        env = {
            **serve_env(ray_tmp, args.ingress),
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
            "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
            "RAY_AUTH_MODE": "disabled",
            "MODEL_DIR": str(Path(args.model_dir).resolve()),
            MARKER: token,
        }
        dashboard = free_port()
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
        ]
        cmd += [f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1"]
        agent = free_port()
        cmd.append(f"--dashboard-agent-listen-port={agent}")
        for side in ("ray-client-server", "dashboard-agent-grpc", "metrics-export"):
            cmd.append(f"--{side}-port={free_port()}")
        cmd.append(f"--runtime-env-agent-port={free_port()}")
        address = f"http://127.0.0.1:{dashboard}"
        log_path = Path(ray_tmp) / "ray_start.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        try:
            started = time.monotonic()
            while not head_ready(address, f"http://127.0.0.1:{agent}"):
                if proc.poll() is not None or time.monotonic() - started > args.startup_timeout:
                    raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            log(f"ray start: head ready after {time.monotonic() - started:.1f} s")
            yield address, env
        finally:
            stop_session(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            log("ray start: stopped")


def head_ready(dashboard: str, agent: str) -> bool:
    """KubeRay's readiness probe of a head pod passes: the dashboard agent reports the raylet healthy and the
    dashboard the GCS (a RayService sends its Serve config once its head pod is Ready)."""
    for url in (f"{agent}/api/local_raylet_healthz", f"{dashboard}/api/gcs_healthz"):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b"success" not in response.read():
                    return False
        except (OSError, ValueError):
            return False
    return True


def run_deploy(args: argparse.Namespace, sample: Path) -> dict[str, Any]:
    """On a running Ray: ``serve deploy`` of the Serve config → first good ``/predict`` (what a RayService's
    config update or a first deploy on a long-lived cluster costs)."""
    token = secrets.token_hex(8)
    with running_ray(args, token) as (address, env):
        started = time.time()
        cmd = [sys.executable, "-m", "ray.serve.scripts", "deploy", str(SERVE_CONFIG), "--address", address]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        cli = time.time() - started
        if done.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{done.stderr[-3000:]}")
        first = FirstAnswer(f"http://127.0.0.1:{PORT}/predict", sample, token, args.startup_timeout)
        first.thread.join()
        if first.at is None:
            raise RuntimeError(f"no good /predict within {args.startup_timeout:g} s of serve deploy")
        result = {"serve_deploy_cli_s": round(cli, 2), "first_predict_s": round(first.at - started, 2)}
        result["running"] = serve_status(address, env)
        logs = Path(env["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" / "serve"
        result["timeline_s"] = deploy_timeline(logs, started)
    log(f"serve deploy on a running Ray: {result}")
    return result


# Serve log messages that mark the steps of a deploy (the first of each counts), in the order they happen
DEPLOY_STEPS = {
    "controller_up": ("controller_", ""),  # Serve's controller logged its first line
    "app_build_started": ("controller_", "Deploying new app"),  # a fresh worker imports ray_app.serve
    "app_built": ("controller_", "Deploying new version of Deployment"),
    "replica_init_started": ("replica_", "Started initializing replica"),
    "replica_ready": ("controller_", "started successfully"),
}
DEPLOY_STEP_LABELS = {
    "controller_up": "Serve's controller logs its first line (the deploy starts Serve: it was not running yet)",
    "app_build_started": "controller and proxies (HAProxy) up: the app's build starts (a fresh worker imports `ray_app.serve`)",
    "app_built": "app built: the controller starts the replicas",
    "replica_init_started": "first replica logs that it starts initialising (its worker process is up)",
    "replica_ready": "first replica ready (the controller logs it started successfully)",
}


def deploy_timeline(log_dir: Path, started: float) -> dict[str, float]:
    """Seconds after ``started`` (``time.time()``) at which each step of ``DEPLOY_STEPS`` was first logged in
    Serve's JSON log files in ``log_dir`` (steps not logged are left out)."""
    found: dict[str, float] = {}
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            with suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                at = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
                for step, (prefix, text) in DEPLOY_STEPS.items():
                    if path.name.startswith(prefix) and text in record["message"]:
                        found[step] = min(found.get(step, at), at)
    return {step: round(found[step], 2) for step in DEPLOY_STEPS if step in found}


def versions(servers: list[str]) -> dict[str, str]:
    """The peers' package versions, from their own virtualenvs."""
    found = {}
    for name, package in ((LITSERVE, "litserve"), (BENTOML, "bentoml")):
        if name in servers:
            code = f"import importlib.metadata as m; print(m.version({package!r}))"
            found[name] = subprocess.run(
                [str(venvs.ensure(name)), "-c", code], capture_output=True, text=True, check=True
            ).stdout.strip()
    return found


# ---- results
def level(result: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    """A server's wrk result at ``concurrency`` (None if that level was not run)."""
    return next((r for r in result["levels"] if r["concurrency"] == concurrency), None)


def errors(r: dict[str, Any]) -> int:
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    return r["non_2xx"] + r["socket_errors"]


def summarize(results: dict[str, Any]) -> None:
    """The serving targets, each judged in every round (met only if met in all rounds); nothing asserts them."""
    rounds = [r["results"] for r in results["rounds"]]
    targets: list[dict[str, Any]] = []

    def add(target: str, values: list[Any], met: list[bool]) -> None:
        if values:
            targets.append({"target": target, "values": values, "met": all(met)})

    if OURS in rounds[0]:
        ours16 = [level(r[OURS], 16) for r in rounds]
        if all(ours16):
            best = [
                max(((p, level(r[p], 16)["rps"]) for p in PEERS if p in r), key=lambda x: x[1], default=None)
                for r in rounds
            ]
            if all(best):
                ratios = [
                    round(o["rps"] / b[1], 2) if b[1] else None for o, b in zip(ours16, best, strict=True)
                ]
                add(
                    "c=16: req/s ≥ 1.2× the best peer",
                    [f"{x}× ({LABELS[b[0]]})" for x, b in zip(ratios, best, strict=True)],
                    [(x or 0) >= 1.2 for x in ratios],
                )
            add("c=16: zero errors", [errors(o) for o in ours16], [errors(o) == 0 for o in ours16])
            add("c=16: p99 ≤ 50 ms", [o["p99_ms"] for o in ours16], [o["p99_ms"] <= 50 for o in ours16])
        ours1 = [level(r[OURS], 1) for r in rounds]
        if all(ours1):
            add("c=1: p50 ≤ 3 ms", [o["p50_ms"] for o in ours1], [o["p50_ms"] <= 3 for o in ours1])
        images = [r[OURS]["batch"]["images_per_s"] for r in rounds]
        add("/predict/batch ≥ 5,000 images/s", images, [x >= 5000 for x in images])
    deploys = [r["deploy"]["first_predict_s"] for r in results["rounds"] if r.get("deploy")]
    add(
        "cold start on a running Ray (serve deploy → first good /predict) ≤ 15 s",
        deploys,
        [x <= 15 for x in deploys],
    )
    results["targets"] = targets


def joined(values: list[Any], fmt: str = "{:,.0f}") -> str:
    """Per-round values as ``a / b``."""
    return " / ".join("—" if v is None else fmt.format(v) for v in values)


def shown(value: Any) -> str:
    """A target's value for the table: thousands separated, one decimal."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def describe(name: str, results: dict[str, Any]) -> str:
    """One bullet: what the server is and how it was set up."""
    s = results["servers"][name]
    if name == OURS:
        c = s["settings"]
        ingress = "HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`)" if s["ingress"] == "haproxy" else "Serve's proxy"
        return (
            f"**{LABELS[name]}**: `serve run ray_app/serve_config.yaml`: {c['num_replicas']} replicas × "
            f"{c['num_cpus']} CPU (so 1 torch thread each), `max_ongoing_requests` {c['max_ongoing_requests']}, "
            f"`max_batch_size` {c['max_batch_size']}, `batch_wait_timeout_s` {c['batch_wait_timeout_s']}; "
            f"ingress {ingress}; the full upload recipe (bounded decode, MNIST-style centring, calibration)."
        )
    if name == BASELINE:
        return (
            f"**{LABELS[name]}** (`bench/seed_server.py`): one process, one image per request, no batching, "
            "torchvision `Resize((28, 28))` + `ToTensor` + `Normalize`, torch threads 1."
        )
    if name == LITSERVE:
        return (
            f"**{LABELS[name]} {s['version']}** (`bench/peers/litserve_app.py`): 2 inference workers + 2 API "
            "server processes linked by ZeroMQ (`fast_queue`), batching `max_batch_size` 16 / `batch_timeout` 5 ms "
            "(the best of 1, 2 and 5 ms with and without `fast_queue` at c=16), the seed's transform, torch threads "
            "1 per worker."
        )
    return (
        f"**{LABELS[name]} {s['version']}** (`bench/peers/bentoml_service.py`): 2 workers, adaptive batching "
        "`max_batch_size` 16 / `max_latency_ms` 1000, the seed's transform (BentoML decodes the upload into a "
        "Pillow image), torch threads 1 per worker, access log off."
    )


def markdown(results: dict[str, Any], notes: str = "") -> str:
    """The report: setup, load table, start-up and memory, many images per request, targets."""
    m, s = results["machine"], results["settings"]
    names = [n for n in SERVERS if n in results["servers"]]
    rounds = [r["results"] for r in results["rounds"]]
    n = len(rounds)
    orders = "; ".join(f"round {i + 1}: " + ", ".join(r["order"]) for i, r in enumerate(results["rounds"]))
    lines = [
        "# Serving benchmark",
        "",
        f"{m['date']} · {m['cpu_model']}, {m['cpus']} CPUs · load average (1 min) {m['load_average_1m']} before, "
        f"{results['load_average_after']} after · Ray {m['ray']}, torch {m['torch']}, Python {m['python']}",
        "",
        f"Every server serves the same network and weights (`{s['model_version']}`). `{s['load_generator']}` "
        f"with one thread (`-t1`) + `bench/predict.lua`, `{s['sample']}` ({s['sample_bytes']} bytes) in every "
        f"request, {s['duration_s']:g} s per level after a {s['warmup_s']:g} s warm-up; one server at a time on "
        f"the same cores (wrk runs on them too), {n} round{'s' if n > 1 else ''} ({orders}). Torch gets one "
        "thread per worker process in every server, the setting that serves best on 2 cores. "
        + ("Each cell: " + " / ".join(f"round {i + 1}" for i in range(n)) + "." if n > 1 else ""),
        "",
        *(f"- {describe(name, results)}" for name in names),
        "",
        "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors (non-2xx + socket) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        for c in s["concurrency"]:
            rs = [level(r[name], c) for r in rounds]
            lines.append(
                f"| {LABELS[name]} | {c} | {joined([r['rps'] for r in rs])} "
                f"| {joined([r['p50_ms'] for r in rs], '{:.1f}')} | {joined([r['p90_ms'] for r in rs], '{:.1f}')} "
                f"| {joined([r['p99_ms'] for r in rs], '{:.1f}')} | {joined([errors(r) for r in rs], '{}')} |"
            )
    lines += [
        "",
        "Cold start: the server's first process started → first good `/predict` (for this project: `serve run`, "
        "which starts Ray too). Idle memory, a few seconds after that first answer: each worker process "
        "(Serve replica; peer process holding the model) as RSS / USS (its own pages) in MB, and the PSS of all "
        "the server's processes (Ray's GCS, raylet, dashboard, controller and proxy included for this project).",
        "",
        "| server | cold start s | processes | per worker RSS / USS MB | all processes PSS MB |",
        "|---|---:|---:|---|---:|",
    ]
    for name in names:
        mems = [r[name]["memory"] for r in rounds]
        per_worker = "; ".join(
            ", ".join(f"{w['rss_mb']:.0f} / {w['uss_mb']:.0f}" for w in mem["workers"]) for mem in mems
        )
        lines.append(
            f"| {LABELS[name]} | {joined([r[name]['cold_start_s'] for r in rounds], '{:.1f}')} "
            f"| {joined([mem['processes'] for mem in mems], '{}')} | {per_worker} "
            f"| {joined([mem['server_pss_mb'] for mem in mems])} |"
        )
    if OURS in names:
        batches = [r[OURS]["batch"] for r in rounds]
        b0 = batches[0]
        raw = ", ".join(f"batch {r['batch']}: {r['images_per_s']:,.0f}" for r in results["raw_forward"])
        lines += [
            "",
            f"Many images per request (`POST /predict/batch`, {b0['images_per_request']} `files` parts, "
            f"{b0['concurrency']} connections): **{joined([b['images_per_s'] for b in batches])} images/s** "
            f"(p99 {joined([b['p99_ms'] for b in batches])} ms, {joined([errors(b) for b in batches], '{}')} "
            f"errors). The served network's bare forward pass in one process on all {m['cpus']} CPUs "
            f"(images/s): {raw}.",
        ]
    deploys = [r["deploy"] for r in results["rounds"] if r.get("deploy")]
    if deploys:
        lines += [
            "",
            "On a running Ray (`ray start --head`; once the head passes KubeRay's readiness probe, raylet and GCS "
            "healthy, `serve deploy ray_app/serve_config.yaml`, as a RayService sends its config): first good "
            f"`/predict` **{joined([d['first_predict_s'] for d in deploys], '{:.1f}')} s** after the command "
            f"(the `serve deploy` CLI itself returned after {joined([d['serve_deploy_cli_s'] for d in deploys], '{:.1f}')} s).",
        ]
        steps = [step for step in DEPLOY_STEPS if all(step in d.get("timeline_s", {}) for d in deploys)]
        if steps:
            lines += [
                "",
                "Where that time went, from Serve's logs (seconds after the command; `/` between rounds):",
                "",
                "| step | s |",
                "|---|---:|",
                *(
                    f"| {DEPLOY_STEP_LABELS[step]} | {joined([d['timeline_s'][step] for d in deploys], '{:.1f}')} |"
                    for step in steps
                ),
                f"| first good `/predict` | {joined([d['first_predict_s'] for d in deploys], '{:.1f}')} |",
            ]
    lines += [
        "",
        "| target | value" + (" (per round)" if n > 1 else "") + " | met |",
        "|---|---:|:-:|",
        *(
            f"| {t['target']} | {' / '.join(shown(v) for v in t['values'])} | {'yes' if t['met'] else '**no**'} |"
            for t in results["targets"]
        ),
        "",
        "![req/s and p99 latency vs concurrency](serve.png)",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """req/s and p99 latency against concurrency, every server: the mean over rounds, min–max as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rounds = [r["results"] for r in results["rounds"]]
    xs = results["settings"]["concurrency"]
    for name, marker in zip(SERVERS, "sovD", strict=True):
        if name not in results["servers"]:
            continue
        for ax, key in ((left, "rps"), (right, "p99_ms")):
            per_level = [[level(r[name], c)[key] for r in rounds] for c in xs]
            mean = [statistics.fmean(v) for v in per_level]
            spread = [[m - min(v) for m, v in zip(mean, per_level, strict=True)]]
            spread.append([max(v) - m for m, v in zip(mean, per_level, strict=True)])
            ax.errorbar(xs, mean, yerr=spread, marker=marker, capsize=3, label=LABELS[name])
    for ax, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms, log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(c) for c in xs])
        ax.set_xlabel("concurrent connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.set_ylim(bottom=0)
    right.set_yscale("log")  # one server's p99 in seconds next to the others' in milliseconds
    left.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"POST /predict, one PNG per request · {m['cpu_model']}, {m['cpus']} CPUs · {m['date'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def write(results: dict[str, Any], out: Path, notes: Path) -> None:
    """``serve.json``, ``serve.md`` and ``serve.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summarize(results)
    (out / "serve.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = notes.read_text() if notes.is_file() else ""
    (out / "serve.md").write_text(markdown(results, text))
    plot(results, out / "serve.png")
    log(f"wrote {out}/serve.{{json,md,png}}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``serve.json``, ``serve.md`` and ``serve.png``."""
    args = parse_args(argv)
    if args.render:
        write(json.loads((args.out / "serve.json").read_text()), args.out, Path(args.notes))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on `kill` too
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    sample = Path(args.sample).resolve()
    artifact = load_artifact(
        args.model_dir
    )  # fail early, with the artifact's own message, if there is no model
    peer_versions = versions(args.servers)  # creates the peers' virtualenvs first if needed (minutes)
    servers: dict[str, Any] = {name: {"label": LABELS[name]} for name in args.servers}
    for name, version in peer_versions.items():
        servers[name]["version"] = version
    if OURS in servers:
        servers[OURS] |= {"ingress": args.ingress, "settings": serve_settings()}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "sample": str(sample.relative_to(ROOT)) if sample.is_relative_to(ROOT) else str(sample),
            "sample_bytes": sample.stat().st_size,
            "model_version": artifact.meta["version"],
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.levels,
            "rounds": args.rounds,
            "smoke": args.smoke,
            "torch_threads_per_worker": 1,
            "load_generator": subprocess.run(
                ["wrk", "--version"], capture_output=True, text=True
            ).stdout.split(" Copyright")[0],
        },
        "servers": servers,
        "rounds": [],
    }
    log(f"machine: {results['machine']}")
    torch.set_num_threads(results["machine"]["cpus"])
    seconds = 0.5 if args.smoke else 3
    results["raw_forward"] = [
        {"batch": b, "images_per_s": round(forward_rate(args.model_dir, b, seconds))}
        for b in sorted({serve_settings()["max_batch_size"], args.batch_images})
    ]
    log(f"raw forward pass: {results['raw_forward']}")
    ports = {BASELINE: args.baseline_port, LITSERVE: args.litserve_port, BENTOML: args.bentoml_port}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for index in range(args.rounds):
            order = args.servers if index % 2 == 0 else args.servers[::-1]
            log(f"round {index + 1}/{args.rounds}: {', '.join(order)}")
            round_: dict[str, Any] = {"order": order, "results": {}}
            for name in order:
                if name == OURS:
                    round_["results"][name] = run_ours(args, sample)
                    if not args.no_deploy:
                        round_["deploy"] = run_deploy(args, sample)
                else:
                    round_["results"][name] = run_peer(name, ports[name], args, sample, Path(tmp))
            results["rounds"].append(round_)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    write(results, args.out, Path(args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
