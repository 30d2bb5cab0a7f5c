"""Text for people: a run's summary, a member table, prediction rows. Pure functions of results.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import numpy as np

from jaxnet.app.data import target_columns

_TABLE = (
    "seed",
    "learning_rate",
    "weight_decay",
    "epochs",
    "best_epoch",
    "steps",
    "best_step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_accuracy",
    "test_r2",
)


def format_result(summary: dict, out: str | None = None) -> str:
    """The last lines of ``jaxnet train``: epochs (or steps), time, loss and the held-out figures."""
    by_steps = summary.get("epochs") is None and summary.get("steps") is not None
    length = f"{summary['steps']} steps" if by_steps else f"{summary['epochs']} epochs"
    seconds = summary.get("train_seconds", summary["seconds"])  # the run's rounds, a resumed run's earlier ones too
    parts = [f"{length} in {seconds:.1f}s", f"train loss {summary['train_loss']:.4g}"]
    if summary.get("task") == "lm":
        if summary.get("val_loss") is not None:
            parts.append(f"validation loss {summary['val_loss']:.4g} (perplexity {summary['val_perplexity']:.4g})")
        if summary.get("tokens_per_second") is not None:
            parts.append(f"{summary['tokens_per_second']:,.0f} tokens/s")
    elif summary.get("val_accuracy") is not None:
        parts.append(f"validation accuracy {summary['val_accuracy']:.4f}")
    for name, value in summary.items():  # named metrics (--metrics), of the best validation epoch
        if name.startswith("val_") and name not in ("val_loss", "val_accuracy", "val_perplexity"):
            if isinstance(value, (int, float)):
                parts.append(f"validation {name[4:].replace('_', ' ')} {value:.4f}")
    for name, label in (
        ("test_accuracy", "test accuracy"),
        ("test_mse", "test MSE"),
        ("test_mae", "test MAE"),
        ("test_r2", "test R²"),
    ):
        if summary.get(name) is not None:
            parts.append(f"{label} {summary[name]:.4f}")
    for name, value in summary.items():  # named metrics (--metrics) on the test split
        if name.startswith("test_") and name not in _TEST_FIGURES and isinstance(value, (int, float)):
            parts.append(f"test {name[5:].replace('_', ' ')} {value:.4f}")
    text = "; ".join(parts)
    if summary.get("test_per_target"):
        text += "\n" + per_target_line(summary["test_per_target"], "test")
    if out:
        written = ["model.npz", "metrics.jsonl", "curves.png"] + (["data.json"] if summary.get("data") else [])
        text += f"\nwrote {out}/{', '.join(written)}"
    return text


_TEST_FIGURES = ("test_accuracy", "test_loss", "test_mse", "test_mae", "test_r2", "test_per_target")


def per_target_line(per_target: dict, split: str) -> str:
    """Each target's MSE, MAE and R² (several targets are in their own units: a pooled MSE mixes them)."""
    shown = (f"{name} MSE {m['mse']:.4g} MAE {m['mae']:.4g} R² {m['r2']:.4f}" for name, m in per_target.items())
    return f"{split}, per target: " + "; ".join(shown)


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


def prediction_rows(meta: dict, outputs: np.ndarray, probabilities: bool = False) -> tuple[list[str], list[list]]:
    """``(header, rows)`` of ``jaxnet predict``'s CSV for predictions ``(n, out)``: the predicted
    class (its name, for labels that were names) and with ``probabilities`` each class's
    probability (``prob_<class>``); a regression's outputs, by target name."""
    if meta["task"] == "classification":
        classes = meta.get("classes")
        if meta["loss"] == "sigmoid_binary_cross_entropy":
            names = classes or [0, 1]
            header = ["prediction", "probability"][: 1 + probabilities]
            return header, [[names[int(p[0] > 0.5)], f"{p[0]:.6g}"][: 1 + probabilities] for p in outputs]
        names = classes or list(range(outputs.shape[1]))
        header = ["prediction"] + ([f"prob_{k}" for k in names] if probabilities else [])
        best = np.argmax(outputs, axis=1)
        if not probabilities:
            return header, [[names[k]] for k in best]
        return header, [[names[k]] + [f"{v:.6g}" for v in p] for k, p in zip(best, outputs)]
    names = ["prediction"] if outputs.shape[1] == 1 else [f"prediction_{t}" for t in target_names(meta)]
    return names, [[f"{v:.8g}" for v in p] for p in outputs]


def target_names(meta: dict) -> list[str]:
    """A regression model's target columns by name (``0``, ``1``, ... when it was not trained on
    a table's named columns)."""
    target, width = meta.get("target"), meta["sizes"][-1]
    names = target_columns(target) if target else []
    return names if len(names) == width else [str(k) for k in range(width)]
