"""Training: the CLI, the accuracy gate, and real Ray Train runs (2 workers, a failure, a crash)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
import ray.train
import torch

from ray_app import data
from ray_app.model import ModelConfig, Net, load_artifact
from ray_app.train import (
    EXIT_PUBLISHED,
    EXIT_WORSE_THAN_CHAMPION,
    Trainer,
    _champion_accuracy,
    augment,
    champion_decision,
    parse_args,
    publish,
    read_publish_inputs,
)
from tests.conftest import ROOT, private_ray_env, run_train
from tests.helpers import recorded_epoch


def _accuracy(model: Net, mnist_dir: Path) -> float:
    images, labels = data.load_mnist(mnist_dir, train=False)
    with torch.inference_mode():
        return (model.eval()(data.normalize(images)).argmax(1) == labels).float().mean().item()


def test_help_states_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option's entry in --help names its env variable and states the default the parser really uses."""
    names = set(re.findall(r'_env\("(\w+)"', (ROOT / "ray_app" / "train.py").read_text()))
    env = {k: v for k, v in os.environ.items() if k not in names}  # as without make's exports
    done = subprocess.run(
        [sys.executable, "-m", "ray_app.train", "--help"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 0
    entries = {  # first long flag -> its entry on one line
        re.search(r"--[\w-]+", block).group(0): " ".join(block.split())
        for block in re.split(r"\n(?=  -)", done.stdout.split("options:", 1)[1])
        if block.strip()
    }
    for name in names:
        monkeypatch.delenv(name, raising=False)
    defaults = vars(parse_args([]))
    assert {flag[2:].replace("-", "_") for flag in entries} - {"help"} == set(defaults)
    described = {  # defaults computed from other options, stated in words
        "--storage-path": ("<model-dir>/ray_results", defaults["storage_path"] == "/mnt/model/ray_results"),
        "--run-name": ("a new unique name", defaults["run_name"].startswith("mnist-")),
        "--cpus-per-worker": (
            "this machine's CPUs / --num-workers",
            defaults["cpus_per_worker"] == max(1, len(os.sched_getaffinity(0)) // defaults["num_workers"]),
        ),
    }
    for flag, entry in entries.items():
        if flag == "--help":
            continue
        stated = re.findall(r"\(default: (.*?)\)", entry)
        assert len(stated) == 1, entry
        text, holds = described.get(flag, (str(defaults[flag[2:].replace("-", "_")]), True))
        assert stated[0] == text and holds, (flag, stated[0], text)
        if flag == "--smoke":
            continue
        (variable,) = re.findall(r"\(env (\w+)\)", entry)  # and that variable sets this option
        dest = flag[2:].replace("-", "_")
        value = "off" if flag == "--champion-gate" else "/tmp/x" if isinstance(defaults[dest], str) else "7"
        monkeypatch.setenv(variable, value)
        assert vars(parse_args([]))[dest] == type(defaults[dest])(value), (flag, variable)
        monkeypatch.delenv(variable)


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", "/tmp/m")
    monkeypatch.setenv("NUM_WORKERS", "3")
    monkeypatch.setenv("TRAIN_LIMIT", "500")
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    args = parse_args([])
    assert (args.model_dir, args.num_workers, args.train_limit) == ("/tmp/m", 3, 500)
    assert args.data_dir == "/tmp/m/data" and args.storage_path == "/tmp/m/ray_results"
    assert parse_args(["--num-workers", "1"]).num_workers == 1  # the command line wins
    assert (
        parse_args([]).run_name != parse_args([]).run_name
    )  # a new run never resumes an old one by accident


def test_smoke_flag() -> None:
    args = parse_args(["--smoke"])
    assert (args.train_limit, args.epochs, args.min_accuracy) == (2000, 1, 0.0)


def test_augment_keeps_shape_and_background() -> None:
    blank = data.normalize(torch.zeros(4, 28, 28, dtype=torch.uint8))
    out = augment(blank, torch.Generator().manual_seed(0))
    assert out.shape == blank.shape
    assert torch.allclose(out, blank, atol=1e-5)  # shifting empty paper adds no ink
    digit = data.normalize(torch.full((2, 28, 28), 255, dtype=torch.uint8) * (torch.rand(2, 28, 28) > 0.5))
    assert not torch.equal(augment(digit, torch.Generator().manual_seed(0)), digit)


def _state(accuracy: float) -> dict:
    confusion = torch.eye(10, dtype=torch.long) * 100
    epoch = {"epoch": 1, "loss": 0.5, "train_accuracy": 0.9, "test_loss": 0.1, "test_accuracy": accuracy}
    return {
        "model": Net().state_dict(),
        "history": [epoch],
        "confusion": confusion,
        "resumed": [],
    }


def test_accuracy_gate(tmp_path: Path, mnist_dir: Path) -> None:
    args = parse_args(["--model-dir", str(tmp_path), "--data-dir", str(mnist_dir), "--min-accuracy", "0.99"])
    assert publish(args, _state(0.98), 1.0) == 2
    assert not (tmp_path / "model.json").exists()
    assert publish(args, _state(0.995), 1.0) == 0
    meta = load_artifact(tmp_path).meta
    assert meta["test_accuracy"] == 0.995 and meta["per_digit_accuracy"] == [1.0] * 10
    assert meta["normalization"] == {"mean": data.MEAN, "std": data.STD}
    assert meta["data_sha256"] == data.checksum(mnist_dir)
    for name in ("training_curves.png", "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert meta["champion_gate"]["champion_accuracy"] is None  # an empty folder has no champion
    assert meta["calibration"]["temperature"] > 0 and meta["train_images"] == 55000


def test_champion_decision(tmp_path: Path) -> None:
    images, labels = torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    assert _champion_accuracy(str(tmp_path), images, labels) is None  # no model yet
    (tmp_path / "model.json").write_text("{not json")
    assert _champion_accuracy(str(tmp_path), images, labels) is None  # a broken one is no champion
    assert champion_decision(0.99, None, 0.001)  # nothing served yet
    assert champion_decision(0.995, 0.99, 0.0)  # better
    assert champion_decision(0.99, 0.99, 0.0)  # equal
    assert champion_decision(0.9895, 0.99, 0.001)  # worse, but within the tolerance
    assert not champion_decision(0.9885, 0.99, 0.001)  # worse
    assert not champion_decision(0.9899, 0.99, 0.0)


def _trained_state(model_dir: Path) -> dict:
    """A finished run's state holding the weights and history published in ``model_dir``."""
    meta = json.loads((model_dir / "model.json").read_text())
    return {
        "model": torch.load(model_dir / "model.pth", weights_only=True),
        "history": meta["history"],
        "confusion": torch.tensor(meta["confusion_matrix"]),
        "resumed": [],
    }


def _files(model_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file() and "ray_results" not in p.parts}


def _publish_flags(model_dir: Path, mnist_dir: Path) -> list[str]:
    """Flags for calling publish directly: no accuracy floor, no calibration holdout."""
    return [
        "--model-dir",
        str(model_dir),
        "--data-dir",
        str(mnist_dir),
        "--min-accuracy",
        "0",
        "--val-size",
        "0",
    ]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_champion_gate_off_better_and_equal(trained_model_dir: Path, tmp_path: Path, mnist_dir: Path) -> None:
    """The publish path with real test-set evaluations (worse → exit 3 runs the CLI, below; the tolerance
    arithmetic is unit-tested above)."""
    trained = _trained_state(trained_model_dir)
    untrained = _state(0.995)  # an untrained network whose run claims 99.5 %: the gate measures, not trusts
    served = tmp_path / "served"
    shutil.copytree(trained_model_dir, served, ignore=shutil.ignore_patterns("ray_results"))
    common = _publish_flags(served, mnist_dir)

    # Worse, with the gate off: published.
    assert publish(parse_args([*common, "--champion-gate", "off"]), untrained, 1.0) == EXIT_PUBLISHED
    assert load_artifact(served).meta["champion_gate"] == {"gate": "off"}
    # Better than the served (now untrained) model: published, the comparison recorded.
    assert publish(parse_args(common), trained, 1.0) == EXIT_PUBLISHED
    gate = load_artifact(served).meta["champion_gate"]
    assert gate["gate"] == "on" and gate["tolerance"] == 0.001
    assert gate["champion_accuracy"] < 0.5 < 0.9 < gate["challenger_accuracy"]
    # Equal (the same weights again), with no tolerance at all: published.
    assert publish(parse_args([*common, "--champion-tolerance", "0"]), trained, 1.0) == EXIT_PUBLISHED
    gate = load_artifact(served).meta["champion_gate"]
    assert gate["challenger_accuracy"] == gate["champion_accuracy"] > 0.9


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_champion_gate_measures_a_model_published_during_the_run(
    trained_model_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    """The current model is measured while the workers start; one published after that is measured again."""
    served = tmp_path / "served"
    common = _publish_flags(served, mnist_dir)
    untrained = _state(0.995)
    assert publish(parse_args([*common, "--champion-gate", "off"]), untrained, 1.0) == EXIT_PUBLISHED
    args = parse_args(common)
    inputs = read_publish_inputs(args)  # as main() does while the run trains
    assert inputs.champion is not None and inputs.champion[0] < 0.5
    # Another run publishes a trained model meanwhile: the untrained one is now worse than the current model.
    trained = _trained_state(trained_model_dir)
    assert publish(parse_args([*common, "--champion-gate", "off"]), trained, 1.0) == EXIT_PUBLISHED
    before = _files(served)
    assert publish(args, untrained, 1.0, inputs) == EXIT_WORSE_THAN_CHAMPION
    assert _files(served) == before


def test_trainer_leaves_out_the_helper_actors_a_local_run_does_not_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No dataset manager (no Ray Data datasets); the placement-group cleaner only on a cluster (RAY_ADDRESS)."""
    for address, cleaner in (("", False), ("ray://head:10001", True)):
        monkeypatch.setenv("RAY_ADDRESS", address)
        trainer = Trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
        names = {type(cb).__name__ for cb in trainer._create_default_callbacks()}
        assert "BackendSetupCallback" in names and "DatasetsCallback" not in names
        assert ("PlacementGroupCleanerCallback" in names) == cleaner


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_worse_run_exits_3_and_publishes_nothing(
    trained_model_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("ray_results"))
    before = _files(model_dir)
    # --smoke: 2,000 images and 1 epoch, far below the session model; its accuracy gate is off, this one is not.
    done = run_train("--model-dir", str(model_dir), "--data-dir", str(mnist_dir), "--smoke")
    assert done.returncode == EXIT_WORSE_THAN_CHAMPION, done.stderr[-3000:]
    assert "worse than the current model" in done.stderr and "model not published" in done.stderr
    assert _files(model_dir) == before


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_default_run_writes_a_plain_torch_model(trained_model_dir: Path, mnist_dir: Path) -> None:
    model = Net(**asdict(ModelConfig()))
    model.load_state_dict(torch.load(trained_model_dir / "model.pth", weights_only=True))
    accuracy = _accuracy(model, mnist_dir)
    assert accuracy > 0.9  # chance is 0.1
    meta = json.loads((trained_model_dir / "model.json").read_text())
    assert abs(meta["test_accuracy"] - accuracy) < 0.003
    default = parse_args(["--model-dir", "unused"])
    assert (meta["num_workers"], meta["cpus_per_worker"]) == (default.num_workers, default.cpus_per_worker)
    assert meta["train_images"] == 12000 and len(meta["history"]) == 2
    assert len(meta["per_digit_accuracy"]) == 10 and min(meta["per_digit_accuracy"]) > 0.7
    assert meta["ray_version"] == "2.60.0" and meta["torch_version"].startswith("2.14.1")
    for key in ("version", "sha256", "created_at", "wall_time_s", "data_sha256", "batch_size", "epochs"):
        assert meta[key]
    assert (trained_model_dir / "versions" / meta["version"] / "model.pth").is_file()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_failed_run_keeps_the_previous_model(
    trained_model_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file() and "ray_results" not in p.parts}
    # 100 images cannot fill one batch of 128: every worker raises, and with no retries the run fails.
    done = run_train(
        "--model-dir", str(model_dir), "--data-dir", str(mnist_dir), "--train-limit", "100", "--max-failures", "0"
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "training failed; the model in" in done.stderr
    after = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file() and "ray_results" not in p.parts}
    assert after == before


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for proc in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path: Path, mnist_dir: Path) -> None:
    cmd = [sys.executable, "-m", "ray_app.train", "--model-dir", str(tmp_path), "--data-dir", str(mnist_dir)]
    cmd += ["--train-limit", "20000", "--epochs", "3", "--min-accuracy", "0", "--max-failures", "2"]
    cmd += ["--num-workers", "2"]  # a real 2-worker DDP run (the default is one worker with all CPUs)
    with private_ray_env() as env:  # a Ray of its own
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            # The controller records a checkpoint in this snapshot a moment after the workers report it.
            while (recorded := recorded_epoch(tmp_path)) is None:
                assert proc.poll() is None, "".join(lines[-40:])
                time.sleep(0.2)
            workers = _train_workers(psutil.Process(proc.pid))
            assert len(workers) == 2, "".join(lines[-40:])
            workers[-1].send_signal(signal.SIGKILL)  # during epoch 2: its part of the work dies with it
            assert proc.wait(timeout=600) == 0, "".join(lines[-60:])
        finally:
            if proc.poll() is None:
                proc.kill()
    reader.join(timeout=10)
    progress = "".join(line for line in lines if any(k in line for k in ("epoch", "rror", "esum", "ailure")))
    assert "resuming from the checkpoint of epoch" in progress, progress
    meta = load_artifact(tmp_path).meta
    assert meta["resumed_from_epochs"] == [recorded]  # the checkpoint recorded when the worker died
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["test_accuracy"] > 0.9
