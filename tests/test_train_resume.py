"""``python -m ray_app.train --run-name NAME`` resumes that run from its last recorded checkpoint.

A real training run is killed as a whole (driver, Ray and workers: a crashed machine or a deleted pod) once Ray
Train has recorded a checkpoint; the same command with the same ``--run-name`` then continues from the epoch
of the checkpoint recorded in the run's storage, not from epoch 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from ray_app.model import load_artifact
from tests.conftest import private_ray_env, run_train
from tests.helpers import ray_processes, recorded_epoch
from tests.serving import session_pids

ROOT = Path(__file__).resolve().parents[1]
RUN = "resume-check"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_name_resumes_from_the_last_recorded_checkpoint(tmp_path: Path, mnist_dir: Path) -> None:
    args = ["--model-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--run-name", RUN]
    args += ["--train-limit", "3000", "--epochs", "3", "--num-workers", "1", "--min-accuracy", "0"]
    with private_ray_env() as env:
        first = subprocess.Popen(
            [sys.executable, "-m", "ray_app.train", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while recorded_epoch(tmp_path) is None:  # written when the controller records a checkpoint
                assert first.poll() is None, "the first run ended before recording a checkpoint"
                assert time.monotonic() < deadline, "no checkpoint recorded in 600 s"
                time.sleep(0.2)
        finally:
            # the whole run at once: its session and anything else of its Ray
            for pid in set(session_pids(first.pid)) | ray_processes(env["RAY_TMPDIR"]):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            first.wait(30)
    epoch = recorded_epoch(tmp_path)
    assert epoch is not None and 1 <= epoch < 3, epoch
    assert not (tmp_path / "model.json").exists()  # killed mid-run: nothing published

    second = run_train(*args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert f"resuming from the checkpoint of epoch {epoch}" in output, output[-3000:]
    meta = load_artifact(tmp_path).meta
    assert meta["resumed_from_epochs"] == [epoch] and meta["run_name"] == RUN
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
