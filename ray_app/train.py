"""Train the MNIST CNN with Ray Train on CPU workers and publish ``model.pth`` + ``model.json``.

Run ``python -m ray_app.train --help``. Connects to ``RAY_ADDRESS`` when set (a KubeRay head), otherwise
starts an embedded local Ray sized to the machine.
"""

# ruff: noqa: E402 -- `python -m ray_app.train` starts the embedded local Ray before torch and Ray Train
# import (see _start_ray_early): the imports after that call are deliberately not at the top.
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

# Settings for an embedded local Ray (no RAY_ADDRESS), unless the environment sets them. A one-off run on one
# machine needs none of what they turn off, and on a small machine every process it starts takes CPU from training.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no spot-preemption watcher process
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the controller polls every 0.2 s, not 2 s: sees the end sooner
    "RAY_TRAIN_METRICS_ENABLED": "0",  # no Ray Train metrics from the controller and the workers
    "RAY_enable_metrics_collection": "0",  # no metrics export from the raylet and the workers
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats report
    "RAY_prestart_worker_first_driver": "0",  # no idle task workers: Ray Train's actors start their own
    # Ray runs its workers at nice 15 so its own daemons come first; the training worker is the work here, so it
    # runs at the priority of a plain ``python train.py`` instead of yielding the CPUs to everything else.
    "RAY_worker_niceness": "0",
}


def start_ray() -> None:
    """Connect to ``RAY_ADDRESS`` when set (a KubeRay head); otherwise start an embedded local Ray with all of this
    machine's CPUs, without the dashboard (its web UI and its modules) and with :data:`LOCAL_RAY_ENV`."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(include_dashboard=False)
    _start_autoscaling_coordinator()


def _start_autoscaling_coordinator() -> None:
    """Start Ray Train's autoscaling coordinator (a named, detached actor of Ray's) on the fresh local Ray, without
    waiting for it.

    The Train controller gets or creates this actor once the controller itself has started, and waits for it:
    on a fresh Ray that is one more process start in a row before the workers start (about 2 s on two CPUs).
    Created here, it starts while the driver loads the data and the controller starts; the controller then finds
    it. If Ray moves it, the controller creates it as before.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        log.debug("Ray Train's autoscaling coordinator not found; the controller starts it")
        return
    get_or_create_autoscaling_coordinator()


class _EarlyStart:
    """:func:`start_ray` for an embedded local Ray on a thread, begun by ``python -m ray_app.train`` before torch
    and Ray Train import: Ray's processes start while the driver imports (about 2.4 s of imports after
    ``import ray``, about as long as ``ray.init``).

    The thread stays alive (a daemon: it never holds up the exit) because Ray's processes are bound to the thread
    that started them: Linux signals a child when its parent *thread* ends (``PR_SET_PDEATHSIG``), and Ray uses
    that so that its processes die with the driver.
    """

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._ready = threading.Event()
        # ray.init sets its SIGTERM handler (exit, so that Ray shuts down) only on the main thread: the same here.
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        logging.getLogger("ray._private.worker").addFilter(
            lambda record: not record.getMessage().startswith("SIGTERM handler is not set")
        )
        threading.Thread(target=self._run, name="ray-start", daemon=True).start()

    def _run(self) -> None:
        try:
            start_ray()
        except BaseException as exc:  # re-raised on the main thread by wait()
            self._error = exc
        self._ready.set()
        threading.Event().wait()  # until the process exits

    def wait(self) -> None:
        """Block until Ray is up; raise what ``ray.init`` raised."""
        self._ready.wait()
        if self._error is not None:
            raise self._error


def _start_ray_early(argv: list[str]) -> _EarlyStart | None:
    """Begin starting the embedded local Ray in the background; None (Ray starts in :func:`main` as before) when
    ``RAY_ADDRESS`` names a cluster or the command only asks for ``--help``."""
    if os.environ.get("RAY_ADDRESS") or {"-h", "--help"} & set(argv):
        return None
    return _EarlyStart()


_early_start = _start_ray_early(sys.argv[1:]) if __name__ == "__main__" else None

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from torch import nn

from ray_app import data
from ray_app.calibration import calibrate, holdout_split
from ray_app.model import (
    DEFAULT_MODEL_DIR,
    METADATA,
    ArtifactError,
    ModelConfig,
    Net,
    files_signature,
    load_artifact,
    save_artifact,
)
from ray_app.plots import load_pyplot, write_plots, write_reliability

STATE_FILE = "train_state.pt"
# Exit codes of the CLI: only EXIT_PUBLISHED changes --model-dir.
EXIT_PUBLISHED, EXIT_FAILED, EXIT_BELOW_MIN_ACCURACY, EXIT_WORSE_THAN_CHAMPION = 0, 1, 2, 3


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift of a normalised batch (N, 1, 28, 28)."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)  # ±2 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = (0 - data.MEAN) / data.STD
    return F.grid_sample(images - background, grid, align_corners=False) + background


def make_optimizer(
    model: nn.Module, lr: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle learning-rate schedule peaking at ``lr``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.25
    )
    return optimizer, scheduler


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One pass over ``batches`` (rows of indices into uint8 ``images`` (N, 28, 28), normalised a batch at a
    time): augmented steps; returns [loss sum, correct, seen]."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    for idx in batches:
        x = augment(data.normalize(images[idx]), generator).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
    return sums


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Summed cross-entropy and the 10×10 confusion matrix (rows: true digit) over a normalised set."""
    model.eval()
    loss, confusion = 0.0, torch.zeros(10, 10, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            x = images[start : start + 1000].contiguous(memory_format=torch.channels_last)
            y = labels[start : start + 1000]
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            confusion += torch.bincount(y * 10 + logits.argmax(1), minlength=100).reshape(10, 10)
    return loss, confusion


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all workers (no-op for a single worker)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm's running statistics); no-op for a single worker."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of every epoch, evaluation on its shard of the test set, a report."""
    timeline = {"loop_start": time.time()}  # wall-clock stamps, kept in the checkpoint for the driver's log
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    # [1] Data: the driver's arrays from the object store (zero-copy, shared by the workers of a node); each
    # epoch a shared permutation, split by rank.
    with warnings.catch_warnings():  # the arrays are read-only shared memory; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in ray.get(config["data"]))
    test_x, test_y = data.normalize(test_x[rank::world]), test_y[rank::world]
    timeline["data_ready"] = time.time()
    per_worker_batch = max(1, config["batch_size"] // world)
    steps = len(train_x) // world // per_worker_batch
    if steps * config["epochs"] < 5:  # the one-cycle schedule needs a few steps to rise and fall
        raise ValueError(
            f"{len(train_x)} images × {config['epochs']} epochs give {steps * config['epochs']} steps of "
            f"batch {config['batch_size']} on {world} workers; need at least 5: use more images or a smaller batch"
        )

    # [2] Model, optimizer, schedule; resumed from the latest checkpoint after a failure.
    model = Net(**config["model"]).to(memory_format=torch.channels_last)
    # DDP without a buffer broadcast at every step (one collective per step less); BatchNorm's running
    # statistics are made rank 0's once per epoch instead, before the evaluation and the checkpoint.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"forward_sync_buffers": False, "gradient_as_bucket_view": True}
    )
    optimizer, scheduler = make_optimizer(model, config["lr"], config["epochs"] * steps)
    start_epoch, history, resumed = 1, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, resumed = (
            state["epoch"] + 1,
            state["history"],
            state["resumed"] + [state["epoch"]],
        )
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    timeline["model_ready"], timeline["reports_s"] = time.time(), []

    # [3] Epochs: train, evaluate, report metrics with a checkpoint from rank 0 (every rank reports).
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    run_start = time.monotonic()
    for epoch in range(start_epoch, config["epochs"] + 1):
        started = time.monotonic()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(config["seed"] + epoch))
        batches = order[rank::world][: steps * per_worker_batch].view(steps, per_worker_batch)
        sums = train_epoch(model, optimizer, scheduler, train_x, train_y, batches, generator)
        train_time = time.monotonic() - started
        _broadcast_buffers(_unwrap(model))
        test_loss, confusion = evaluate(model, test_x, test_y)
        sums, confusion = _all_reduce(sums), _all_reduce(confusion)
        totals = _all_reduce(torch.tensor([test_loss, float(len(test_y))], dtype=torch.float64))
        metrics = {
            "epoch": epoch,
            "loss": sums[0].item() / sums[2].item(),
            "train_accuracy": sums[1].item() / sums[2].item(),
            "test_loss": totals[0].item() / totals[1].item(),
            "test_accuracy": confusion.diag().sum().item() / confusion.sum().item(),
            "images_per_s": sums[2].item() / train_time,
            "epoch_time_s": time.monotonic() - started,
        }
        history.append(metrics)
        if rank == 0:
            remaining = (
                (time.monotonic() - run_start) / (epoch - start_epoch + 1) * (config["epochs"] - epoch)
            )
            log.info(
                "epoch %d/%d  loss %.4f  train acc %.4f  test acc %.4f  %.0f img/s  eta %.0fs",
                epoch,
                config["epochs"],
                metrics["loss"],
                metrics["train_accuracy"],
                metrics["test_accuracy"],
                metrics["images_per_s"],
                remaining,
            )
        with tempfile.TemporaryDirectory() as d:
            report_checkpoint = None
            if rank == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "confusion": confusion,
                    "resumed": resumed,
                    "timeline": timeline,
                }
                torch.save(state, Path(d) / STATE_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(d)
            reported = time.time()
            ray.train.report(metrics, checkpoint=report_checkpoint)
            timeline["reports_s"].append(time.time() - reported)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _env(name: str, default: Any) -> Any:
    """A default that the environment may override (how the KubeRay manifests set options)."""
    value = os.environ.get(name)
    return default if value in (None, "") else type(default)(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option can also come from the environment variable named in its help."""
    p = argparse.ArgumentParser(
        prog="python -m ray_app.train",
        description="Train the MNIST CNN with Ray Train and publish model.pth + model.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model_dir = _env("MODEL_DIR", DEFAULT_MODEL_DIR)
    p.add_argument("--model-dir", default=model_dir, help="where model.pth/model.json go (env MODEL_DIR)")
    p.add_argument(
        "--data-dir",
        default=_env("MNIST_DATA_DIR", str(Path(model_dir) / "data")),
        help="MNIST folder (holds MNIST/raw), fetched there once if missing (env MNIST_DATA_DIR)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=_env("NUM_WORKERS", 1),
        help="Ray Train workers; one worker with all CPUs is the fastest layout on a small machine "
        "(env NUM_WORKERS)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=_env("CPUS_PER_WORKER", 0),
        help="CPUs and torch threads per worker; 0 = this machine's CPUs divided among the workers, 1 when "
        "RAY_ADDRESS names a cluster (env CPUS_PER_WORKER) (default: this machine's CPUs / --num-workers)"
        "%(default).0s",
    )
    p.add_argument("--epochs", type=int, default=_env("EPOCHS", 3), help="epochs (env EPOCHS)")
    p.add_argument(
        "--batch-size", type=int, default=_env("BATCH_SIZE", 128), help="global batch size (env BATCH_SIZE)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=_env("LR", 0.004),
        help="peak learning rate of the one-cycle schedule (env LR)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=_env("MAX_FAILURES", 3),
        help="worker-group restarts allowed (env MAX_FAILURES)",
    )
    p.add_argument("--seed", type=int, default=_env("SEED", 1), help="random seed (env SEED)")
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=_env("MIN_ACCURACY", 0.99),
        help="publish only if test accuracy reaches this (env MIN_ACCURACY)",
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=_env("VAL_SIZE", 5000),
        help="training images held out (seeded by --seed) to fit the probability calibration; 0 = no "
        "calibration (env VAL_SIZE)",
    )
    p.add_argument(
        "--champion-gate",
        choices=("on", "off"),
        default=_env("CHAMPION_GATE", "on"),
        help="publish only if the new model is not worse on the test set than the model already in "
        "--model-dir; exit code 3 when it is (env CHAMPION_GATE)",
    )
    p.add_argument(
        "--champion-tolerance",
        type=float,
        default=_env("CHAMPION_TOLERANCE", 0.001),
        help="how much lower the new model's test accuracy may be than the current model's and still be "
        "published (env CHAMPION_TOLERANCE)",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=_env("TRAIN_LIMIT", 0),
        help="use only the first N training images, 0 = all (env TRAIN_LIMIT)",
    )
    p.add_argument(
        "--storage-path",
        default=_env("STORAGE_PATH", ""),
        help="Ray Train run storage shared by all nodes (env STORAGE_PATH) (default: <model-dir>/ray_results)%(default)s",
    )
    p.add_argument(
        "--run-name",
        default=_env("RUN_NAME", ""),
        help="reuse a name to resume that run (env RUN_NAME) (default: a new unique name)%(default)s",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="quick check: 2000 images, 1 epoch, no --min-accuracy gate (the champion gate still applies)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.train_limit, args.epochs, args.min_accuracy = 2000, 1, 0.0
    # Workers run in other folders (and on other nodes): make local paths absolute; URIs stay as they are.
    if args.cpus_per_worker <= 0:
        local_cpus = 1 if os.environ.get("RAY_ADDRESS") else len(os.sched_getaffinity(0))
        args.cpus_per_worker = max(1, local_cpus // args.num_workers)
    args.model_dir, args.data_dir = os.path.abspath(args.model_dir), os.path.abspath(args.data_dir)
    args.storage_path = args.storage_path or str(Path(args.model_dir) / "ray_results")
    if "://" not in args.storage_path:
        args.storage_path = os.path.abspath(args.storage_path)
    args.run_name = args.run_name or f"mnist-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    return args


def load_training_data(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """Training images and labels (the calibration holdout removed, ``--train-limit`` applied), test images
    and labels: uint8 / int64 numpy arrays, read once by the driver."""
    train_x, train_y = data.load_arrays(args.data_dir, train=True)
    keep, _ = holdout_split(len(train_x), args.val_size, args.seed)  # validation images never train
    keep = keep[: args.train_limit or None].numpy()
    return (train_x[keep], train_y[keep], *data.load_arrays(args.data_dir, train=False))


class Trainer(ray.train.torch.TorchTrainer):
    """The TorchTrainer without the helper actors of Ray Train that this run does not use: the dataset manager
    (the data comes through the object store, not as Ray Data datasets) and, on an embedded local Ray, the
    placement-group cleaner (it removes the workers' placement group if the controller dies while the cluster
    lives on; a local Ray ends with the driver). Each is a Python process started while the workers start."""

    def _create_default_callbacks(self) -> list[Any]:
        unused: tuple[type, ...] = (DatasetsCallback,)
        if not os.environ.get("RAY_ADDRESS"):
            unused += (PlacementGroupCleanerCallback,)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]


def fit(args: argparse.Namespace, arrays: tuple[np.ndarray, ...]) -> ray.train.Result:
    """Run the TorchTrainer on ``arrays`` (from :func:`load_training_data`); raises when the run fails after
    its retries.

    The arrays go to the workers through Ray's object store: the workers of a node map the same shared memory
    instead of each parsing the files.
    """
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={
            "data": ray.put(arrays),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "threads": args.cpus_per_worker,
            "model": asdict(ModelConfig()),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.num_workers, use_gpu=False, resources_per_worker={"CPU": args.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=args.run_name,
            storage_path=args.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def predict_logits(model: nn.Module, images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Logits of an eval-mode model for uint8 images (N, 28, 28), normalised with ``mean``/``std``."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for chunk in images.split(1000):
            x = ((chunk.float() / 255 - mean) / std).unsqueeze(1)
            outputs.append(model(x.contiguous(memory_format=torch.channels_last)))
    return torch.cat(outputs)


def champion_decision(challenger: float, champion: float | None, tolerance: float) -> bool:
    """Whether a new model with test accuracy ``challenger`` may replace one with ``champion`` (None: no model)."""
    return champion is None or challenger >= champion - tolerance


def _champion_accuracy(
    model_dir: str, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, str] | None:
    """Test accuracy and version of the model in ``model_dir``; None when there is none or it does not load."""
    if not (Path(model_dir) / METADATA).exists():
        return None
    try:
        artifact = load_artifact(model_dir)
    except ArtifactError as exc:
        log.warning("current model not comparable (%s); treating it as absent", exc)
        return None
    norm = artifact.meta["normalization"]
    logits = predict_logits(artifact.model, images, float(norm["mean"]), float(norm["std"]))
    return (logits.argmax(1) == labels).double().mean().item(), str(artifact.meta["version"])


@dataclass
class PublishInputs:
    """What publishing reads besides the new model (:func:`read_publish_inputs`)."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    data_sha256: str
    champion: tuple[float, str] | None = None  # the current model's test accuracy and version
    champion_files: tuple[int, ...] | None = None  # its files when it was measured


def read_publish_inputs(args: argparse.Namespace) -> PublishInputs:
    """The test set, the data checksum, the current model's test accuracy (champion gate on) and the plotting
    library: nothing here depends on the new model, so :func:`main` reads it while the workers start."""
    test_x, test_y = data.load_mnist(args.data_dir, train=False)
    inputs = PublishInputs(test_x, test_y, data.checksum(args.data_dir))
    if args.champion_gate == "on":
        inputs.champion_files = files_signature(args.model_dir)
        inputs.champion = _champion_accuracy(args.model_dir, test_x, test_y)
    load_pyplot()
    return inputs


def publish(
    args: argparse.Namespace,
    state: dict[str, Any],
    wall_time_s: float,
    inputs: PublishInputs | None = None,
) -> int:
    """Apply the gates to a finished run's final state, calibrate it and publish it. Returns the exit code.

    Gates: test accuracy below ``--min-accuracy`` → 2; worse than the model already in ``--model-dir`` by more
    than ``--champion-tolerance`` on the same test set (unless ``--champion-gate off``) → 3. Nothing is
    written in either case. ``inputs`` are read here unless given; the current model is measured again if its
    files changed since.
    """
    confusion = state["confusion"]
    accuracy = state["history"][-1]["test_accuracy"]
    if accuracy < args.min_accuracy:
        log.error(
            "test accuracy %.4f is below --min-accuracy %.4f; model not published",
            accuracy,
            args.min_accuracy,
        )
        return EXIT_BELOW_MIN_ACCURACY
    inputs = inputs or read_publish_inputs(args)
    model = Net(**asdict(ModelConfig()))
    model.load_state_dict(state["model"])
    test_x, test_y = inputs.test_x, inputs.test_y
    logits = predict_logits(model, test_x, data.MEAN, data.STD)
    challenger = (logits.argmax(1) == test_y).double().mean().item()
    champion = None
    if args.champion_gate == "on":
        current = inputs.champion
        if files_signature(args.model_dir) != inputs.champion_files:
            current = _champion_accuracy(args.model_dir, test_x, test_y)
        champion = {
            "gate": "on",
            "tolerance": args.champion_tolerance,
            "challenger_accuracy": challenger,
            "champion_accuracy": current[0] if current else None,
            "champion_version": current[1] if current else None,
        }
        if not champion_decision(challenger, champion["champion_accuracy"], args.champion_tolerance):
            log.error(
                "test accuracy %.4f is worse than the current model %s (%.4f) by more than "
                "--champion-tolerance %g; model not published",
                challenger,
                champion["champion_version"],
                champion["champion_accuracy"],
                args.champion_tolerance,
            )
            return EXIT_WORSE_THAN_CHAMPION
        log.info("champion gate passed: %.4f vs current %s", challenger, champion["champion_accuracy"])
    meta = {
        "config": asdict(ModelConfig()),
        "normalization": {"mean": data.MEAN, "std": data.STD},
        "test_accuracy": accuracy,
        "per_digit_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
        "confusion_matrix": confusion.tolist(),
        "history": state["history"],
        "resumed_from_epochs": state["resumed"],
        "epochs": args.epochs,
        "num_workers": args.num_workers,
        "cpus_per_worker": args.cpus_per_worker,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_images": min(args.train_limit or 60000, 60000 - args.val_size),
        "wall_time_s": round(wall_time_s, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_sha256": inputs.data_sha256,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "run_name": args.run_name,
        "champion_gate": champion or {"gate": "off"},
    }
    bins = None
    if args.val_size > 0:
        train_x, train_y = data.load_mnist(args.data_dir, train=True)
        _, val = holdout_split(len(train_x), args.val_size, args.seed)
        val_logits = predict_logits(model, train_x[val], data.MEAN, data.STD)
        meta["calibration"], bins = calibrate(val_logits, train_y[val], logits, test_y)
        log.info(
            "calibration: temperature %.3f, test ECE %.4f -> %.4f, NLL %.4f -> %.4f, threshold %.3f",
            meta["calibration"]["temperature"],
            meta["calibration"]["test"]["ece_before"],
            meta["calibration"]["test"]["ece_after"],
            meta["calibration"]["test"]["nll_before"],
            meta["calibration"]["test"]["nll_after"],
            meta["calibration"]["threshold"],
        )
    version = save_artifact(args.model_dir, state["model"], meta)
    write_plots(args.model_dir, state["history"], meta["confusion_matrix"])
    if bins is not None:
        write_reliability(args.model_dir, bins, meta["calibration"])
    log.info(
        "done: test accuracy %.4f in %.1f s wall time; model %s in %s",
        accuracy,
        meta["wall_time_s"],
        version,
        args.model_dir,
    )
    return EXIT_PUBLISHED


def main(argv: list[str] | None = None) -> int:
    """Train, check the gates, calibrate, publish.

    Exit codes: 0 a new model was published; 1 training failed; 2 test accuracy below ``--min-accuracy``;
    3 worse than the model already in ``--model-dir`` (champion gate). Only 0 changes ``--model-dir``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    timeline = {"main": time.time()}
    args = parse_args(argv)
    data.ensure_mnist(args.data_dir)
    if _early_start is None:
        start_ray()
    else:
        _early_start.wait()
    timeline["ray_ready"] = time.time()
    try:
        arrays = load_training_data(args)
        timeline["data_loaded"] = time.time()
        # Publishing's own reads run while the controller and the workers start (mostly one CPU busy); the
        # thread then ends, and with it the torch thread pool it may have started.
        with concurrent.futures.ThreadPoolExecutor(1, "publish-inputs") as pool:
            reading = pool.submit(read_publish_inputs, args)
            result = fit(args, arrays)
        timeline["fit_done"] = time.time()
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
    except Exception:
        log.exception("training failed; the model in %s is unchanged", args.model_dir)
        ray.shutdown()
        return EXIT_FAILED
    # Ray stops while the driver publishes: stopping it is mostly waiting for its processes to exit.
    stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    stopping.start()
    code = publish(args, state, time.monotonic() - started, reading.result())
    timeline["published"] = time.time()
    stopping.join()
    timeline["ray_down"] = time.time()
    log.info("timeline %s", json.dumps({**timeline, "worker": state.get("timeline", {})}))
    return code


if __name__ == "__main__":
    sys.exit(main())
