"""Figures (matplotlib, an optional extra: ``pip install 'jaxnet-trainer[plot]'``).

matplotlib is imported inside the functions that use it; figures are drawn with the Agg canvas
(no pyplot, no global backend change) and written atomically.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxnet import _atomic as atomic

_FORMATS = ("png", "svg", "pdf")


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"drawing figures needs matplotlib ({e}): install it with pip install 'jaxnet-trainer[plot]'"
        ) from e
    return Figure, FigureCanvasAgg


def check_figure_path(path: str | os.PathLike) -> str:
    """Checks that a figure can be written to ``path`` (a supported extension, an existing folder)
    before any work is done; returns the format (``png``, ``svg`` or ``pdf``)."""
    fmt = _format(path)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: the folder {folder!r} does not exist")
    return fmt


def _format(path: str | os.PathLike) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in _FORMATS:
        endings = ", ".join("." + f for f in _FORMATS)
        raise ValueError(f"figure file {os.fspath(path)!r} must end in one of {endings}")
    return ext


def save_figure(fig, path: str | os.PathLike) -> None:
    """Writes a matplotlib figure atomically: a temporary file in the same folder, then ``os.replace``."""
    fmt = check_figure_path(path)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format=fmt)


def _g(v: float) -> str:
    return f"{v:.4g}"


def draw_network(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Draws the worked example's network, annotated with its computed values, to ``path``.

    Like the notes' Figure 1: inputs, hidden and output neurons and every edge. Each neuron shows
    ``z`` and ``a`` (and its bias, gradient and updated bias); each edge shows ``w``, ``dC/dw``
    and the updated ``w'``.

    Args:
      result: the dict returned by :func:`jaxnet.app.worked_example.worked_example`.
      path: output file, ``.png`` (or ``.svg``, ``.pdf``).

    Raises:
      ImportError: matplotlib is not installed (the message names the ``plot`` extra).
      ValueError: the file name has an unsupported extension.
      OSError: the file cannot be written.
    """
    check_figure_path(path)
    Figure, FigureCanvasAgg = _matplotlib()

    sizes = [len(result["x"])] + [len(layer["a"]) for layer in result["layers"]]
    n_layers = len(sizes)
    fig = Figure(figsize=(4.2 * n_layers, 2.2 * max(sizes) + 1.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.0, 0.98, 0.93))
    ax.set_axis_off()
    dx, dy = 4.0, 1.8  # spacing of layers and of neurons within a layer
    top = (max(sizes) - 1) / 2 * dy

    def pos(l, j):  # layer l (0 = inputs), neuron j (0-based, top to bottom), centred on y = 0
        return l * dx, ((sizes[l] - 1) / 2 - j) * dy

    _draw_edges(ax, result, sizes, pos)  # first, so that the neurons are drawn on top of them
    _draw_neurons(ax, fig, result, sizes, pos)
    titles = ["inputs"] + [f"layer {l}" for l in range(1, n_layers)]
    titles[-1] += " (output)"
    if n_layers > 2:
        titles[1:-1] = [t + " (hidden)" for t in titles[1:-1]]
    for l, t in enumerate(titles):
        ax.text(l * dx, top + 0.75, t, ha="center", fontsize=10, weight="bold")
    ax.set_xlim(-0.9, (n_layers - 1) * dx + 1.5)
    ax.set_ylim(-top - 1.0, top + 1.1)
    ax.set_aspect("equal")
    fig.suptitle(
        f"One SGD step: C = 1/2 sum (a - t)$^2$ = {_g(result['loss'])}, learning rate {_g(result['lr'])}",
        fontsize=11,
    )
    save_figure(fig, path)


def _draw_edges(ax, result: dict[str, Any], sizes: list[int], pos) -> None:
    """Every edge of the network, labelled with its weight, gradient and updated weight."""
    n_layers = len(sizes)
    for l in range(1, n_layers):
        w, gw, uw = (result[k][l - 1]["w"] for k in ("params", "grads", "updated"))
        for j in range(sizes[l]):
            for k in range(sizes[l - 1]):
                (x0, y0), (x1, y1) = pos(l - 1, k), pos(l, j)
                ax.plot([x0, x1], [y0, y1], color="0.55", lw=1.0, zorder=1)
                # Stagger labels along the edge by target neuron so labels of crossing edges
                # do not sit on top of each other.
                f = 0.3 + 0.4 * (j / max(sizes[l] - 1, 1))
                lx, ly = x0 + f * (x1 - x0), y0 + f * (y1 - y0)
                ax.text(
                    lx,
                    ly,
                    f"w$_{{{j + 1}{k + 1}}}^{{{l}}}$={_g(w[j][k])}\ndC/dw={_g(gw[j][k])}\nw'={uw[j][k]:.6g}",
                    fontsize=7,
                    ha="center",
                    va="center",
                    zorder=3,
                    linespacing=1.1,
                    bbox=dict(boxstyle="round,pad=0.2", fc="lightyellow", ec="0.7", lw=0.5, alpha=0.95),
                )


def _draw_neurons(ax, fig, result: dict[str, Any], sizes: list[int], pos) -> None:
    """Every neuron, with its ``z`` and ``a`` (inputs: ``x``), bias line and output targets."""
    n_layers = len(sizes)
    radius = 0.42
    for l in range(n_layers):
        for j in range(sizes[l]):
            cx, cy = pos(l, j)
            if l == 0:
                color, label = "#d6e6f5", f"x$_{{{j + 1}}}$\n{_g(result['x'][j])}"
            else:
                layer = result["layers"][l - 1]
                color = "#f5dcc6" if l == n_layers - 1 else "#d9efd2"
                sub = f"$_{{{j + 1}}}^{{{l}}}$"
                label = f"z{sub}={_g(layer['z'][j])}\na{sub}={_g(layer['a'][j])}"
            ax.add_patch(_circle(fig, (cx, cy), radius, color))
            ax.text(cx, cy, label, fontsize=8, ha="center", va="center", zorder=5)
            if l > 0:
                b, gb, ub = (result[k][l - 1]["b"][j] for k in ("params", "grads", "updated"))
                ax.text(
                    cx,
                    cy - radius - 0.08,
                    f"b$_{{{j + 1}}}^{{{l}}}$={_g(b)}  dC/db={_g(gb)}  b'={ub:.6g}",
                    fontsize=7,
                    ha="center",
                    va="top",
                    zorder=5,
                )
            else:
                ax.text(cx, cy - radius - 0.08, f"a$_{{{j + 1}}}^{{0}}$", fontsize=7, ha="center", va="top")
            if l == n_layers - 1:
                ax.text(
                    cx + radius + 0.12,
                    cy,
                    f"t$_{{{j + 1}}}$={_g(result['target'][j])}",
                    fontsize=8,
                    ha="left",
                    va="center",
                )


def _circle(fig, center, radius, color):
    from matplotlib.patches import Circle

    return Circle(center, radius, fc=color, ec="0.25", lw=1.2, zorder=4)


def plot_curves(history: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Draws loss (train and validation) and validation accuracy against epoch to ``path``."""
    Figure, FigureCanvasAgg = _matplotlib()
    epochs = [r["epoch"] for r in history]
    has_acc = any(r.get("val_accuracy") is not None for r in history)
    width = 10 if has_acc else 5.5
    fig = Figure(figsize=(width, 4), dpi=120)
    # Fixed margins in inches (a layout engine costs more than the whole drawing).
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.13, top=0.88, wspace=0.25)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    ax = axes[0]
    losses = [r["train_loss"] for r in history] + [r["val_loss"] for r in history if "val_loss" in r]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if any("val_loss" in r for r in history):
        ax.plot(epochs, [r.get("val_loss") for r in history], label="validation loss")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        axes[1].plot(epochs, [r.get("val_accuracy") for r in history], color="tab:green", label="validation accuracy")
        axes[1].set(xlabel="epoch", ylabel="accuracy")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    fig.suptitle(title or f"jaxnet training: {Path(path).parent.name or 'run'}")
    save_figure(fig, path)
