"""Pictures of a training run, written beside ``model.json``: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = "training_curves.png"
CONFUSION = "confusion_matrix.png"


def write_plots(
    model_dir: str | Path, history: list[dict[str, Any]], confusion: list[list[int]]
) -> list[Path]:
    """Write ``training_curves.png`` (loss and accuracy per epoch, train and test) and ``confusion_matrix.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
