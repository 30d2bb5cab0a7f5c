"""Figures (matplotlib, an optional extra, imported lazily): training curves."""

from __future__ import annotations

import os
from pathlib import Path

from jaxnet import io


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'jaxnet-trainer[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Draws loss (train and validation) and validation accuracy against epoch into a PNG."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    has_acc = any(r.get("val_accuracy") is not None for r in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if any("val_loss" in r for r in history):
        ax.plot(epochs, [r.get("val_loss") for r in history], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        ax.plot(epochs, [r.get("val_accuracy") for r in history], color="tab:green", label="validation accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"jaxnet training ({Path(path).parent.name or 'run'})")
    _save(fig, path)
    plt.close(fig)
