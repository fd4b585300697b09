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
    require(shutil.which("wrk") is not None, "wrk is not installed", "apt-get install -y wrk")
    done = run_bench(
        "serve_bench.py", "--model-dir", str(trained_model_dir), "--out", str(tmp_path), timeout=1400
    )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "serve.json").read_text())
    assert results["machine"]["cpus"] == len(os.sched_getaffinity(0)) and results["machine"]["cpu_model"]
    for system in ("baseline", "ray_serve"):
        levels = results[system]["levels"]
        assert [r["concurrency"] for r in levels] == [1, 16]
        assert sum(r["requests"] for r in levels) > 0 and all(r["non_2xx"] == 0 for r in levels), levels
        assert all(0 <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] for r in levels), levels
        assert results[system]["prediction"] == 0  # both classify the default sample, samples/zero.png
    batch = results["ray_serve"]["batch"]
    assert batch["non_2xx"] == 0
    assert batch["images_per_request"] == 8 and batch["requests"] > 0  # --smoke sends 8 images per request
    assert all(r["images_per_s"] > 0 for r in results["raw_forward"])
    assert [r["concurrency"] for r in results["ratios"]] == [1, 16]
    assert {t["target"] for t in results["targets"]} >= {"c=16: req/s >= 2.0x baseline", "c=1: p50 <= 3 ms"}

    table = (tmp_path / "serve.md").read_text()
    assert table.startswith("# Serving benchmark") and "| 16 |" in table
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG_MAGIC
    assert port_free(8100), "the baseline server is still running"


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
