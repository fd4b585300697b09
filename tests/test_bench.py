"""Smoke runs of the benchmarks in ``bench/``: they start everything, measure, stop everything and write
well-formed results. Nothing here asserts speed; the numbers come from ``make bench``.

    pytest tests/test_bench.py -m integration      (starts Ray Serve on port 8000 and three trainings; minutes)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require
from tests.serving import port_free

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m bench.<script> --smoke ...`` from the project root."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_serve_bench_smoke(trained_model_dir: Path, tmp_path: Path) -> None:
    """The harness on this project's app and the seed-style server (the LitServe and BentoML peers need their own
    virtualenvs, minutes to build: ``make bench`` runs them; their report rows are checked below without them)."""
    require(shutil.which("wrk") is not None, "wrk is not installed", "apt-get install -y wrk")
    done = run_bench(
        "serve_bench.py",
        *("--servers", "ray_serve,baseline", "--model-dir", str(trained_model_dir), "--out", str(tmp_path)),
        timeout=1400,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "serve.json").read_text())
    assert results["machine"]["cpus"] == len(os.sched_getaffinity(0)) and results["machine"]["cpu_model"]
    (round_,) = results["rounds"]  # the smoke: one round
    assert round_["order"] == ["ray_serve", "baseline"]
    for system in ("baseline", "ray_serve"):
        result = round_["results"][system]
        levels = result["levels"]
        assert [r["concurrency"] for r in levels] == [1, 16]
        assert sum(r["requests"] for r in levels) > 0 and all(r["non_2xx"] == 0 for r in levels), levels
        assert all(0 <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] for r in levels), levels
        assert result["prediction"] == 0  # both classify the default sample, samples/zero.png
        assert 0 < result["cold_start_s"] < 600
        memory = result["memory"]
        assert len(memory["workers"]) == (2 if system == "ray_serve" else 1), memory  # replicas; one process
        assert all(0 < w["uss_mb"] <= w["rss_mb"] for w in memory["workers"]), memory
        assert memory["server_pss_mb"] >= sum(w["uss_mb"] for w in memory["workers"]), memory
    assert round_["results"]["ray_serve"]["memory"]["processes"] > 2  # Ray's own processes are counted too
    batch = round_["results"]["ray_serve"]["batch"]
    assert batch["non_2xx"] == 0
    assert batch["images_per_request"] == 8 and batch["requests"] > 0  # --smoke sends 8 images per request
    deploy = round_["deploy"]  # serve deploy on a running Ray
    assert deploy["running"] and 0 < deploy["serve_deploy_cli_s"] < deploy["first_predict_s"] < 600
    assert all(r["images_per_s"] > 0 for r in results["raw_forward"])
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["c=16: req/s ≥ 1.2× the best peer"]["values"][0].endswith("(seed-style FastAPI + uvicorn)")
    assert targets["c=1: p50 ≤ 3 ms"]["values"] == [round_["results"]["ray_serve"]["levels"][0]["p50_ms"]]

    table = (tmp_path / "serve.md").read_text()
    assert table.startswith("# Serving benchmark") and "| seed-style FastAPI + uvicorn | 16 |" in table
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG_MAGIC
    assert port_free(8100), "the baseline server is still running"


def fake_serve_results(rounds: int) -> dict:
    """serve_bench results as the four servers would leave them, with made-up figures."""

    def server(rps16: float, p50: float, memory_workers: int) -> dict:
        levels = [
            {
                "concurrency": c,
                "requests": 100,
                "duration_s": 10,
                "rps": rps,
                "p50_ms": p50 * c,
                "p90_ms": p50 * c * 2,
                "p99_ms": p50 * c * 3,
                "max_ms": p50 * c * 4,
                "non_2xx": 0,
                "socket_errors": 0,
            }
            for c, rps in ((1, rps16 / 3), (16, rps16), (64, rps16))
        ]
        workers = [{"pid": 1, "rss_mb": 500.0, "uss_mb": 300.0, "pss_mb": 350.0}] * memory_workers
        memory = {"workers": workers, "processes": 4, "server_pss_mb": 900.0}
        return {"cold_start_s": 9.5, "memory": memory, "prediction": 0, "levels": levels}

    one = {
        "ray_serve": server(1300, 2.5, 2)
        | {
            "batch": {
                "concurrency": 4,
                "images_per_request": 64,
                "rps": 90.0,
                "images_per_s": 5760,
                "p99_ms": 80.0,
                "non_2xx": 0,
                "socket_errors": 0,
            }
        },
        "baseline": server(600, 1.7, 1),
        "litserve": server(1000, 4.0, 2),
        "bentoml": server(800, 5.0, 2),
    }
    one["bentoml"]["levels"][2]["non_2xx"] = 7  # BentoML refusing at c=64
    servers = {name: {"label": name} for name in one}
    servers["ray_serve"] |= {
        "ingress": "haproxy",
        "settings": {
            "port": 8000,
            "num_replicas": 2,
            "num_cpus": 1,
            "max_ongoing_requests": 64,
            "max_batch_size": 16,
            "batch_wait_timeout_s": 0.0,
        },
    }
    servers["litserve"]["version"], servers["bentoml"]["version"] = "0.2.19", "1.4.40"
    return {
        "machine": {
            "cpu_model": "test CPU",
            "cpus": 2,
            "load_average_1m": 0.1,
            "date": "2026-12-04T00:00:00+00:00",
            "python": "3.11",
            "ray": "2.60.0",
            "torch": "2.14.1",
        },
        "settings": {
            "sample": "samples/zero.png",
            "sample_bytes": 299,
            "model_version": "v1",
            "duration_s": 10,
            "warmup_s": 5,
            "concurrency": [1, 16, 64],
            "rounds": rounds,
            "smoke": False,
            "torch_threads_per_worker": 1,
            "load_generator": "wrk 4.2.0",
        },
        "servers": servers,
        "rounds": [
            {
                "order": list(one),
                "results": json.loads(json.dumps(one)),
                "deploy": {"serve_deploy_cli_s": 3.0, "first_predict_s": 12.0 + i * 5, "running": True},
            }
            for i in range(rounds)
        ],
        "raw_forward": [{"batch": 16, "images_per_s": 9000}, {"batch": 64, "images_per_s": 10000}],
        "load_average_after": 0.2,
    }


def test_serve_bench_report_of_four_servers(tmp_path: Path) -> None:
    """The report of a two-round run of all four servers (made-up figures; no server runs): each target judged
    in every round against the best peer of that round, the tables, the plot."""
    from bench import serve_bench

    results = fake_serve_results(rounds=2)
    notes = tmp_path / "notes.md"
    notes.write_text("## Where the time goes\n\nmeasured.\n")
    serve_bench.write(results, tmp_path, notes)

    targets = {t["target"]: t for t in results["targets"]}
    assert targets["c=16: req/s ≥ 1.2× the best peer"] == {
        "target": "c=16: req/s ≥ 1.2× the best peer",
        "values": ["1.3× (LitServe)"] * 2,
        "met": True,
    }
    assert (
        targets["c=16: p99 ≤ 50 ms"]["values"] == [120.0, 120.0] and not targets["c=16: p99 ≤ 50 ms"]["met"]
    )
    assert targets["c=1: p50 ≤ 3 ms"]["met"] and targets["/predict/batch ≥ 5,000 images/s"]["met"]
    deploy = next(t for t in results["targets"] if t["target"].startswith("cold start on a running Ray"))
    assert deploy["values"] == [12.0, 17.0] and not deploy["met"]  # met only if met in every round

    table = (tmp_path / "serve.md").read_text()
    assert "| BentoML | 64 | 800 / 800 | 320.0 / 320.0 | 640.0 / 640.0 | 960.0 / 960.0 | 7 / 7 |" in table
    assert "**LitServe 0.2.19**" in table and "**BentoML 1.4.40**" in table
    assert "| this project (Ray Serve config, HAProxy) | 9.5 / 9.5 | 4 / 4 | 500 / 300, 500 / 300; " in table
    assert "**5,760 / 5,760 images/s**" in table and "**12.0 / 17.0 s**" in table
    assert table.rstrip().endswith("measured.")
    assert json.loads((tmp_path / "serve.json").read_text())["targets"] == results["targets"]
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_train_bench_smoke(mnist_dir: Path, tmp_path: Path) -> None:
    done = run_bench("train_bench.py", "--data-dir", str(mnist_dir), "--out", str(tmp_path), timeout=1400)
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "train.json").read_text())
    (runs,) = results["rounds"]  # the quick mode: one round of 4,096 images, 1 epoch
    assert list(runs)[0] == "plain" and any(name.endswith("(default)") for name in runs)
    assert {(r["workers"], r["threads_per_worker"]) for r in runs.values()} >= {(2, 1), (1, 2)}
    for run in runs.values():
        assert len(run["history"]) == 1
        assert run["final_accuracy"] > 0.2, run  # learned something in 4,096 images: chance is 0.1
        phases = run["phases_s"]
        assert 0 < run["epochs_s"] == phases["epochs"] < run["wall_s"]
        assert sum(phases.values()) == pytest.approx(run["wall_s"], rel=1e-6)  # the phases add up to the wall
        assert min(phases.values()) > -0.5, phases  # stamps from different processes: only clock jitter
    ray_runs = [r for name, r in runs.items() if name != "plain"]
    assert all(r["phases_s"]["ray_init"] > 0 and r["phases_s"]["worker_group"] > 0 for r in ray_runs)
    rows = {r["name"]: r for r in results["summary"]}
    for name, run in runs.items():
        assert rows[name]["wall_ratio"]["median"] == pytest.approx(run["wall_s"] / runs["plain"]["wall_s"])
    assert (
        results["targets"][0]["value"]
        == next(r for n, r in rows.items() if n.endswith("(default)"))["wall_ratio"]["median"]
    )

    table = (tmp_path / "train.md").read_text()
    assert table.startswith("# Training benchmark") and "wall vs plain" in table and "Ray start" in table
    assert (tmp_path / "train.png").read_bytes()[:8] == PNG_MAGIC
