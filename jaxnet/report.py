"""Text for people: a run's summary, a member table, prediction rows. Pure functions of results."""

from __future__ import annotations

import numpy as np

_TABLE = (
    "seed",
    "learning_rate",
    "weight_decay",
    "epochs",
    "best_epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_accuracy",
    "test_r2",
)


def format_summary(summary: dict, out: str | None = None) -> str:
    """The last lines of ``jaxnet train``: epochs, time, loss and the held-out figures."""
    parts = [
        f"{summary['epochs']} epochs in {summary['seconds']:.1f}s",
        f"train loss {summary['train_loss']:.4g}",
    ]
    if summary.get("val_accuracy") is not None:
        parts.append(f"validation accuracy {summary['val_accuracy']:.4f}")
    for name, label in (
        ("test_accuracy", "test accuracy"),
        ("test_mse", "test MSE"),
        ("test_mae", "test MAE"),
        ("test_r2", "test R²"),
    ):
        if summary.get(name) is not None:
            parts.append(f"{label} {summary[name]:.4f}")
    text = "; ".join(parts)
    if out:
        text += f"\nwrote {out}/model.npz, metrics.jsonl, curves.png"
    return text


def format_members(summary: dict) -> str:
    """The members of a run's summary as a text table, one row per member, the best marked ``*``."""
    rows = summary["members"]
    names = [n for n in _TABLE if any(r.get(n) is not None for r in rows)]
    header = ["member"] + [{"learning_rate": "lr"}.get(n, n) for n in names]

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [header] + [
        [f"{r['member']}{'*' if r['member'] == summary['best_member'] else ''}"] + [cell(r.get(n)) for n in names]
        for r in rows
    ]
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines) + f"\nbest member {summary['best_member']} (by {summary['monitor']})"


def prediction_rows(meta: dict, outputs: np.ndarray) -> tuple[list[str], list[list]]:
    """``(header, rows)`` of ``jaxnet predict``'s CSV for predictions ``(n, out)``."""
    if meta["task"] == "classification":
        if meta["loss"] == "sigmoid_binary_cross_entropy":
            return ["prediction", "probability"], [[int(p[0] > 0.5), f"{p[0]:.6g}"] for p in outputs]
        header = ["prediction"] + [f"prob_{k}" for k in range(outputs.shape[1])]
        return header, [[int(np.argmax(p))] + [f"{v:.6g}" for v in p] for p in outputs]
    names = ["prediction"] if outputs.shape[1] == 1 else [f"prediction_{k}" for k in range(outputs.shape[1])]
    return names, [[f"{v:.8g}" for v in p] for p in outputs]
