"""Training benchmark: the wall clock a user waits for ``python -m ray_app.train`` against plain PyTorch.

    python -m bench.train_bench               # 3 alternated rounds of the full recipe: bench/results/train.{json,md,png}
    python -m bench.train_bench --runs 5      # more rounds
    python -m bench.train_bench --quick       # 4,096 images, 1 epoch, 1 round, results in a temporary folder

Every run is a fresh command in its own process, timed from its start until it exits with the model published:
Python start and imports, Ray start, data, training, checkpoints, shutdown and publishing all count.

* **Ray Train**: ``python -m ray_app.train`` as ``make train`` runs it (a fresh embedded local Ray), once with its
  default worker × thread layout and once per extra layout in ``--layouts``.
* **plain PyTorch**: the same recipe in one process (``torch`` threads = CPUs): the same data split, network,
  augmentation, optimizer, schedule, evaluation and the same ``publish`` (gates, calibration, plots) as
  ``ray_app.train``; the recipe functions come from ``ray_app.train``, so this process imports Ray too (its import
  time is reported).

Rounds alternate the order of the runs; round k trains every run with ``--seed k`` (the same seed for plain and Ray
within a round), so the accuracy column covers several seeds. The headline is the wall-clock ratio Ray / plain per round (median and
min–max), beside the per-epoch ratio (train + test time of the epochs) and where Ray's extra time goes, from the
timeline ``ray_app.train`` logs. Time to the target accuracy is secondary: wall clock from the command's start,
interpolated linearly within the epoch that crosses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLAIN = "plain"
TIMELINE = "timeline "  # the log line ray_app.train ends with
log = logging.getLogger("train_bench")

# Phases of a run, in order: (key, label). Each is the time between two stamps of the run's timeline.
PHASES = [
    ("startup", "Python start + imports"),
    ("ray_init", "Ray start (ray.init, beyond the driver imports it overlaps)"),
    ("data", "MNIST read (driver)"),
    ("worker_group", "controller + worker group start (processes, imports, process group)"),
    ("worker_data", "data from the object store"),
    ("model", "model + DDP setup"),
    ("epochs", "epochs (train + test)"),
    ("reports", "per-epoch report + checkpoint"),
    ("final", "last report + worker group shutdown"),
    ("publish", "publish (gates, calibration, artifact, plots)"),
    ("ray_shutdown", "Ray shutdown (beyond the publish it overlaps)"),
    ("exit", "process exit"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the recipe is ``ray_app.train``'s defaults unless overridden."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DATA_DIR", ""),
        help="MNIST folder holding MNIST/raw (default: env MNIST_DATA_DIR)",
    )
    p.add_argument(
        "--out", default="", help="results folder (default: bench/results; with --quick a temporary folder)"
    )
    p.add_argument("--runs", type=int, default=3, help="alternated rounds (default: 3)")
    p.add_argument(
        "--layouts",
        default="2x1,1x2",
        help="Ray Train layouts WORKERSxTHREADS timed besides the default one (default: 2x1,1x2)",
    )
    p.add_argument("--epochs", type=int, default=0, help="epochs (default: ray_app.train's)")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (default: 0 = all)")
    p.add_argument("--target", type=float, default=0.99, help="test accuracy to time (default: 0.99)")
    p.add_argument(
        "--quick",
        "--smoke",
        action="store_true",
        help="4,096 images, 1 epoch, 1 round: checks the benchmark works (default: off)",
    )
    p.add_argument(
        "--plain-child", default="", help=argparse.SUPPRESS
    )  # internal: run plain, write JSON here
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)  # internal: the plain child's model dir
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)  # internal: the round's seed
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("set MNIST_DATA_DIR or pass --data-dir")
    if args.quick:
        args.train_limit, args.epochs, args.runs = 4096, 1, 1
    default_out = (
        Path(tempfile.gettempdir()) / "mnist-bench-quick" if args.quick else ROOT / "bench" / "results"
    )
    args.out = Path(args.out) if args.out else default_out
    args.cpus = len(os.sched_getaffinity(0))
    return args


def recipe_flags(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """``ray_app.train`` flags shared by every run: the model folder, the data and the recipe overrides."""
    flags = ["--model-dir", str(model_dir), "--data-dir", str(args.data_dir), "--max-failures", "0"]
    flags += ["--seed", str(args.seed)]
    if args.epochs:
        flags += ["--epochs", str(args.epochs)]
    if args.train_limit:
        flags += ["--train-limit", str(args.train_limit), "--min-accuracy", "0"]
    return flags


def plain_child(args: argparse.Namespace) -> int:
    """The plain-PyTorch run (in its own process): ``train_loop_per_worker``'s recipe for one process, then
    ``ray_app.train.publish``. Writes its timeline to ``--plain-child``."""
    import torch

    stamps = {"torch_imported": time.time()}
    from ray_app import data, train
    from ray_app.model import ModelConfig, Net

    stamps["main"] = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    targs = train.parse_args(recipe_flags(args, Path(args.model_dir)))
    torch.set_num_threads(args.cpus)
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in train.load_training_data(targs))
    test_x = data.normalize(test_x)
    stamps["data_loaded"] = time.time()
    steps = len(train_x) // targs.batch_size
    model = Net(**asdict(ModelConfig())).to(memory_format=torch.channels_last)
    optimizer, scheduler = train.make_optimizer(model, targs.lr, targs.epochs * steps)
    generator = torch.Generator().manual_seed(targs.seed * 1000)
    history = []
    stamps["model_ready"] = time.time()
    for epoch in range(1, targs.epochs + 1):
        started = time.monotonic()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(targs.seed + epoch))
        batches = order[: steps * targs.batch_size].view(steps, targs.batch_size)
        sums = train.train_epoch(model, optimizer, scheduler, train_x, train_y, batches, generator)
        test_loss, confusion = train.evaluate(model, test_x, test_y)
        history.append(
            {
                "epoch": epoch,
                "loss": sums[0].item() / sums[2].item(),
                "train_accuracy": sums[1].item() / sums[2].item(),
                "test_loss": test_loss / len(test_y),
                "test_accuracy": confusion.diag().sum().item() / confusion.sum().item(),
                "images_per_s": sums[2].item() / (time.monotonic() - started),
                "epoch_time_s": time.monotonic() - started,
            }
        )
        log.info("plain epoch %d: %s", epoch, history[-1])
    stamps["trained"] = time.time()
    state = {"model": model.state_dict(), "history": history, "confusion": confusion, "resumed": []}
    code = train.publish(targs, state, time.time() - stamps["torch_imported"])
    stamps["published"] = time.time()
    Path(args.plain_child).write_text(json.dumps(stamps))
    return code


def _run(cmd: list[str], env: dict[str, str], label: str) -> tuple[float, float, str]:
    """Run a command; return its start (epoch seconds), wall time and combined output. Raises on failure."""
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{label} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return started, wall, done.stdout + done.stderr


def run_plain(args: argparse.Namespace, tmp: Path, index: int) -> dict[str, Any]:
    """One plain-PyTorch run in a fresh process."""
    model_dir, stamps_file = tmp / f"plain-{index}", tmp / f"plain-{index}.json"
    cmd = [sys.executable, "-m", "bench.train_bench", "--data-dir", str(args.data_dir)]
    cmd += ["--plain-child", str(stamps_file), "--model-dir", str(model_dir)]
    cmd += [f"--epochs={args.epochs}", f"--train-limit={args.train_limit}", f"--seed={args.seed}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started, wall, _ = _run(cmd, env, "plain run")
    s = {k: v - started for k, v in json.loads(stamps_file.read_text()).items()}
    history = _history(model_dir)
    phases = {
        "startup": s["main"],
        "data": s["data_loaded"] - s["main"],
        "model": s["model_ready"] - s["data_loaded"],
        "epochs": s["trained"] - s["model_ready"],
        "publish": s["published"] - s["trained"],
        "exit": wall - s["published"],
    }
    ends = _epoch_ends(s["model_ready"], history, [0.0] * len(history))
    return _result(PLAIN, 1, args.cpus, wall, phases, history, ends, args.target, args.seed) | {
        "ray_import_s": s["main"] - s["torch_imported"]
    }


def run_ray(
    args: argparse.Namespace, tmp: Path, index: int, layout: tuple[int, int] | None
) -> dict[str, Any]:
    """One ``python -m ray_app.train`` in a fresh process on a fresh local Ray; ``layout`` None = its defaults."""
    name = "default" if layout is None else f"{layout[0]}x{layout[1]}"
    model_dir = tmp / f"ray-{name}-{index}"
    cmd = [sys.executable, "-m", "ray_app.train", *recipe_flags(args, model_dir)]
    if layout:
        cmd += ["--num-workers", str(layout[0]), "--cpus-per-worker", str(layout[1])]
    ray_tmp = tempfile.mkdtemp(prefix="tb-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    env |= {"PYTHONPATH": str(ROOT)}
    try:
        started, wall, output = _run(cmd, env, f"Ray run {name}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next(x for x in reversed(output.splitlines()) if TIMELINE in x)
    t = json.loads(line.split(TIMELINE, 1)[1])
    worker = t.pop("worker")
    reports = worker.pop("reports_s")
    s = {k: v - started for k, v in t.items()}
    w = {k: v - started for k, v in worker.items()}
    meta = json.loads((model_dir / "model.json").read_text())
    history = meta["history"]
    epochs = sum(h["epoch_time_s"] for h in history)
    phases = {
        "startup": s["main"],
        "ray_init": s["ray_ready"] - s["main"],
        "data": s["data_loaded"] - s["ray_ready"],
        "worker_group": w["loop_start"] - s["data_loaded"],
        "worker_data": w["data_ready"] - w["loop_start"],
        "model": w["model_ready"] - w["data_ready"],
        "epochs": epochs,
        "reports": sum(reports),
        "final": s["fit_done"] - w["model_ready"] - epochs - sum(reports),
        "publish": s["published"] - s["fit_done"],
        "ray_shutdown": s["ray_down"] - s["published"],
        "exit": wall - s["ray_down"],
    }
    ends = _epoch_ends(w["model_ready"], history, reports + [0.0])
    label = f"Ray Train {meta['num_workers']}x{meta['cpus_per_worker']}" + (
        " (default)" if layout is None else ""
    )
    return _result(
        label,
        meta["num_workers"],
        meta["cpus_per_worker"],
        wall,
        phases,
        history,
        ends,
        args.target,
        meta["seed"],
    )


def _history(model_dir: Path) -> list[dict[str, Any]]:
    return json.loads((model_dir / "model.json").read_text())["history"]


def _epoch_ends(start: float, history: list[dict[str, Any]], reports: list[float]) -> list[float]:
    """Seconds from the command's start at which each epoch's test accuracy was known."""
    ends, clock = [], start
    for h, report in zip(history, reports, strict=False):
        clock += h["epoch_time_s"]
        ends.append(clock)
        clock += report
    return ends


def time_to_target(
    start: float, history: list[dict[str, Any]], ends: list[float], target: float
) -> float | None:
    """Wall-clock seconds until the test accuracy reaches ``target``, interpolated linearly within the epoch
    that crosses it (accuracy before the first epoch = chance, 0.1); None if never reached."""
    prev_time, prev_acc = start, 0.1
    for h, end in zip(history, ends, strict=True):
        acc, epoch_start = h["test_accuracy"], end - h["epoch_time_s"]
        if acc >= target:
            prev_time = max(prev_time, epoch_start)
            return prev_time + (end - prev_time) * (target - prev_acc) / max(acc - prev_acc, 1e-9)
        prev_time, prev_acc = end, acc
    return None


def _result(
    name: str,
    workers: int,
    threads: int,
    wall: float,
    phases: dict[str, float],
    history: list[dict[str, Any]],
    ends: list[float],
    target: float,
    seed: int,
) -> dict[str, Any]:
    start = phases["startup"] + phases.get("ray_init", 0) + phases["data"] + phases.get("worker_group", 0)
    start += phases.get("worker_data", 0) + phases["model"]
    return {
        "name": name,
        "workers": workers,
        "threads_per_worker": threads,
        "wall_s": wall,
        "epochs_s": phases["epochs"],
        "fixed_s": wall - phases["epochs"],
        "phases_s": phases,
        "final_accuracy": history[-1]["test_accuracy"],
        "seed": seed,
        "time_to_target_s": time_to_target(start, history, ends, target),
        "history": [{k: h[k] for k in ("epoch", "test_accuracy", "epoch_time_s")} for h in history],
    }


def machine() -> dict[str, Any]:
    """CPU model and count, load average, versions and date."""
    import ray
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((x.split(":", 1)[1].strip() for x in lscpu if x.startswith("Model name")), "unknown")
    return {
        "cpu_model": model,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration: medians (min–max) of wall, epochs, fixed cost, phases, and the per-round ratios."""
    summary = []
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        plains = [r[PLAIN] for r in rounds]
        row = {
            "name": name,
            "workers": runs[0]["workers"],
            "threads_per_worker": runs[0]["threads_per_worker"],
            "wall_s": _spread([r["wall_s"] for r in runs]),
            "epochs_s": _spread([r["epochs_s"] for r in runs]),
            "fixed_s": _spread([r["fixed_s"] for r in runs]),
            "wall_ratio": _spread([r["wall_s"] / p["wall_s"] for r, p in zip(runs, plains, strict=True)]),
            "epoch_ratio": _spread(
                [r["epochs_s"] / p["epochs_s"] for r, p in zip(runs, plains, strict=True)]
            ),
            "final_accuracy": _spread([r["final_accuracy"] for r in runs]),
            "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs) for k, _ in PHASES},
        }
        targets = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        row["time_to_target_s"] = _spread(targets) if len(targets) == len(runs) else None
        summary.append(row)
    return summary


def _fmt(s: dict[str, float], digits: int = 1, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    """The tables for the README."""
    m, st = results["machine"], results["settings"]
    rows = results["summary"]
    lines = [
        "# Training benchmark",
        "",
        f"{m['date']} · {m['cpu_model']}, {m['cpus']} CPUs (load average 1 min {m['load_average_1m']} before, "
        f"{results['load_average_after']} after) · Ray {m['ray']}, torch "
        f"{m['torch']}, Python {m['python']}",
        "",
        f"{st['train_images']} training images, {st['epochs']} epochs (`ray_app.train` recipe); "
        f"{st['rounds_done']} alternated rounds; each run is a fresh process timed from its start until the model is published. "
        "Figures: median (min–max); ratios are per round against that round's plain run.",
        "",
        f"| run | workers × threads | wall (s) | **wall vs plain** | epochs (s) | epochs vs plain | fixed cost (s) "
        f"| to {st['target']:.0%} (s, wall) | final test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        to_target = _fmt(r["time_to_target_s"]) if r["time_to_target_s"] else "—"
        lines.append(
            f"| {r['name']} | {r['workers']} × {r['threads_per_worker']} | {_fmt(r['wall_s'])} "
            f"| **{_fmt(r['wall_ratio'], 2, '×')}** | {_fmt(r['epochs_s'])} | {_fmt(r['epoch_ratio'], 2, '×')} "
            f"| {_fmt(r['fixed_s'])} | {to_target} | {_fmt(r['final_accuracy'], 4)} |"
        )
    lines += ["", "Where the time goes (median seconds per phase):", ""]
    lines.append("| phase | " + " | ".join(r["name"] for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for key, label in PHASES:
        lines.append(f"| {label} | " + " | ".join(f"{r['phases_s'][key]:.1f}" for r in rows) + " |")
    lines += [""]
    for t in results["targets"]:
        lines.append(f"- {t['target']}: {t['shown']} — **{'met' if t['met'] else 'not met'}**")
    plain, default = rows[0], next(r for r in rows if r["name"].endswith("(default)"))
    extra = sorted(
        ((default["phases_s"][k] - plain["phases_s"][k], label) for k, label in PHASES), reverse=True
    )
    lines += [
        "",
        f"Where the default run's extra {default['wall_s']['median'] - plain['wall_s']['median']:.1f} s go "
        "(median phase minus plain's): "
        + ", ".join(f"{label} {d:+.1f} s" for d, label in extra if abs(d) >= 0.5)
        + ".",
    ]
    lines += ["", "Final test accuracy per round (every run of a round trains with that round's seed):", ""]
    lines.append("| round (seed) | " + " | ".join(r["name"] for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for i, rnd in enumerate(results["rounds"], 1):
        seed = rnd[PLAIN]["seed"]
        cells = [f"{rnd[r['name']]['final_accuracy']:.2%}" for r in rows]
        lines.append(f"| {i} ({seed}) | " + " | ".join(cells) + " |")
    plain_import = statistics.median(r[PLAIN]["ray_import_s"] for r in results["rounds"])
    lines += [
        "",
        f"The plain run imports `ray_app.train` for the shared recipe and publish code, hence Ray too: "
        f"{plain_import:.1f} s (median) after `import torch`, counted in its startup.",
        "",
        "![wall time per phase](train.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Stacked bars: each configuration's median wall time split into its phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.7 * len(rows)))
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for i, (key, label) in enumerate(PHASES):
        widths = [r["phases_s"][key] for r in rows]
        ax.barh(names, widths, left=left, label=label, color=cmap(i))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("wall time (s, median)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    m = results["machine"]
    ax.set_title(
        f"MNIST training, command start → model published · {m['cpus']} shared CPUs · {m['date'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and write ``train.json``, ``train.md`` and ``train.png``."""
    args = parse_args(argv)
    if args.plain_child:
        return plain_child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from ray_app.train import parse_args as train_args

    defaults = train_args(["--model-dir", tempfile.gettempdir()])
    default = (defaults.num_workers, defaults.cpus_per_worker)
    extra = {(int(w), int(t)) for w, t in (x.split("x") for x in args.layouts.split(",") if x)} - {default}
    layouts: list[tuple[int, int] | None] = [None, *sorted(extra)]  # None: ray_app.train's own defaults
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "epochs": args.epochs or "default",
        "train_images": args.train_limit or "all",
        "target": args.target,
        "runs": args.runs,
        "quick": args.quick,
    }
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for i in range(args.runs):
            args.seed = i + 1
            jobs = [("plain", None)] + [("ray", layout) for layout in layouts]
            if i % 2:
                jobs.reverse()
            runs = {}
            for kind, layout in jobs:
                r = run_plain(args, Path(tmp), i) if kind == "plain" else run_ray(args, Path(tmp), i, layout)
                log.info(
                    "round %d: %s wall %.1f s, epochs %.1f s", i + 1, r["name"], r["wall_s"], r["epochs_s"]
                )
                runs[r["name"]] = r
            results["rounds"].append(runs)
            write_results(
                results, args.out
            )  # after every round: an interrupted benchmark keeps what it measured
    log.info("wrote %s/train.{json,md,png}", args.out)
    return 0


def write_results(results: dict[str, Any], out: Path) -> None:
    """Summarise the rounds so far and write ``train.json``, ``train.md`` and ``train.png``."""
    results["settings"]["rounds_done"] = len(results["rounds"])
    results["summary"] = summarize([_ordered(r) for r in results["rounds"]])
    row = next(r for r in results["summary"] if r["name"].endswith("(default)"))
    results["targets"] = [
        {
            "target": "default `make train` wall ≤ 1.3× plain",
            "value": row["wall_ratio"]["median"],
            "shown": _fmt(row["wall_ratio"], 2, "×"),
            "met": row["wall_ratio"]["median"] <= 1.3,
        }
    ]
    two = next((r for r in results["summary"] if (r["workers"], r["threads_per_worker"]) == (2, 1)), None)
    if two:
        results["targets"].append(
            {
                "target": "2 workers × 1 thread: epochs ≤ 1.2× plain (1 process × all threads)",
                "value": two["epoch_ratio"]["median"],
                "shown": _fmt(two["epoch_ratio"], 2, "×"),
                "met": two["epoch_ratio"]["median"] <= 1.2,
            }
        )
    if results["settings"]["train_images"] == "all" and results["settings"]["epochs"] == "default":
        runs = [r for rnd in results["rounds"] for r in rnd.values()]
        lowest = min(runs, key=lambda r: r["final_accuracy"])
        results["targets"].append(
            {
                "target": f"final test accuracy ≥ 99.4 % in every run ({len(runs)} runs, seeds "
                f"{', '.join(str(s) for s in sorted({r['seed'] for r in runs}))})",
                "value": lowest["final_accuracy"],
                "shown": f"lowest {lowest['final_accuracy']:.2%} ({lowest['name']}, seed {lowest['seed']})",
                "met": lowest["final_accuracy"] >= 0.994,
            }
        )
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    (out / "train.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "train.md").write_text(markdown(results))
    plot(results, out / "train.png")


def _ordered(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Plain first, then the default Ray run, then the other layouts (rounds ran them in alternating order)."""
    return dict(
        sorted(runs.items(), key=lambda item: (item[0] != PLAIN, "(default)" not in item[0], item[0]))
    )


if __name__ == "__main__":
    sys.exit(main())
