"""Pictures of a training run, written beside ``model.json``: learning curves, the confusion matrix and the
reliability diagram of the calibrated probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = "training_curves.png"
CONFUSION = "confusion_matrix.png"
RELIABILITY = "reliability.png"


def load_pyplot() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend (the import takes about half a second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    model_dir: str | Path, history: list[dict[str, Any]], confusion: list[list[int]]
) -> list[Path]:
    """Write ``training_curves.png`` (loss and accuracy per epoch, train and test) and ``confusion_matrix.png``."""
    plt = load_pyplot()
    model_dir = Path(model_dir)
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    loss_ax.plot(epochs, [h["loss"] for h in history], "o-", label="train (augmented, smoothed labels)")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    acc_ax.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(model_dir / CURVES, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 4.6), constrained_layout=True)
    errors_only = [
        [min(v, 30) if i != j else 0 for j, v in enumerate(row)] for i, row in enumerate(confusion)
    ]
    image = ax.imshow(errors_only)
    bright = max(max(row) for row in errors_only) * 0.6
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            color = "k" if errors_only[i][j] > bright else "w"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true digit")
    errors = sum(sum(row) for row in confusion) - sum(confusion[i][i] for i in range(10))
    ax.set_title(f"Confusion matrix, test set ({errors} errors)")
    fig.colorbar(image, ax=ax, label="errors (capped at 30)")
    fig.savefig(model_dir / CONFUSION, dpi=100)
    plt.close(fig)
    return [model_dir / CURVES, model_dir / CONFUSION]


def write_reliability(
    model_dir: str | Path, bins: dict[str, list[dict[str, float]]], calibration: dict[str, Any]
) -> Path:
    """Write ``reliability.png``: accuracy against top probability per bin on the test set, before and after
    the temperature (``bins`` as from :func:`ray_app.calibration.calibrate`), with the image count per bin."""
    plt = load_pyplot()
    test = calibration["test"]
    fig, (diagram, counts) = plt.subplots(
        2, 1, figsize=(5.2, 6), height_ratios=(3, 1), sharex=True, constrained_layout=True
    )
    diagram.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    labels = {
        "before": f"raw softmax (ECE {100 * test['ece_before']:.2f} %)",
        "after": f"T = {calibration['temperature']:.3f} (ECE {100 * test['ece_after']:.2f} %)",
    }
    for (name, rows), marker in zip(bins.items(), ("o--", "s-"), strict=True):
        used = [r for r in rows if r["count"]]
        diagram.plot(
            [r["confidence"] for r in used], [r["accuracy"] for r in used], marker, label=labels[name]
        )
        width = (rows[0]["high"] - rows[0]["low"]) * 0.4
        offset = -width / 2 if name == "before" else width / 2
        counts.bar([(r["low"] + r["high"]) / 2 + offset for r in rows], [r["count"] for r in rows], width)
    diagram.axvline(
        calibration["threshold"],
        color="grey",
        lw=1,
        label=f"not-sure threshold {calibration['threshold']:.2f}",
    )
    diagram.set(
        ylabel="accuracy in bin", title="Reliability on the MNIST test set", xlim=(0, 1), ylim=(0, 1.02)
    )
    diagram.grid(alpha=0.3)
    diagram.legend(loc="lower right", fontsize=8)
    counts.set(xlabel="top probability (15 bins)", ylabel="images", yscale="log")
    counts.grid(alpha=0.3)
    path = Path(model_dir) / RELIABILITY
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
