"""Progress of a fit on a stream: a tqdm bar on a terminal or in a notebook, one line per epoch otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from jaxnet.hooks import OnRunEnd


def _progress_fields(record: dict) -> dict[str, str]:
    """What one epoch's progress shows; a member run's record shows its best member's figures."""
    members = isinstance(record["train_loss"], list)
    fields = {}
    if members:
        active = [v for v in record["train_loss"] if v is not None]
        fields["members"] = f"{len(active)}/{len(record['train_loss'])}"
    for name, label, best in (
        ("train_loss", "loss", min),
        ("val_loss", "val_loss", min),
        ("val_accuracy", "val_acc", max),
    ):
        value = record.get(name)
        if members and value is not None:
            value = best([v for v in value if v is not None], default=None)
        if value is not None:
            fields[label] = f"{value:.4f}" if name == "val_accuracy" else f"{value:.4g}"
    spikes = record.get("spikes")
    if spikes:  # loss spikes skipped so far
        fields["spikes"] = str(sum(v or 0 for v in spikes) if isinstance(spikes, list) else spikes)
    for name, value in record.items():  # named metrics (fit(metrics=...)): their validation values
        if not members and name.startswith("val_") and name not in ("val_loss", "val_accuracy", "val_seconds"):
            if isinstance(value, (int, float)):
                fields[name] = f"{value:.4g}"
    skipped = record.get("skipped")
    if skipped:
        fields["skipped"] = str(sum(v or 0 for v in skipped) if isinstance(skipped, list) else skipped)
    seconds = record["seconds"] - record.get("val_seconds", 0.0)
    speed = record["steps"] / seconds if seconds > 0 else float("inf")
    fields["steps/s"] = f"{speed:,.0f}" if speed >= 10 else f"{speed:.3g}"
    if record.get("tokens"):
        fields["tokens/s"] = f"{record['tokens'] / seconds:,.0f}" if seconds > 0 else "inf"
    if record.get("mfu") is not None:
        fields["MFU"] = f"{record['mfu']:.1%}"
    return fields


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm.auto draws a notebook widget)."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress(OnRunEnd):
    """Per-epoch progress on ``stream``: a tqdm bar on a terminal, one plain line per epoch otherwise.

    Args:
      total: the number of epochs of the run.
      stream: where to write (default stderr).
      bar: True for a tqdm bar, False for lines, None for a bar only when ``stream`` is a terminal
        or the code runs in a Jupyter notebook (tqdm's notebook widget).
    """

    def __init__(self, total: int, stream: TextIO | None = None, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.bar = None
        if bar or (bar is None and (self.stream.isatty() or _in_notebook())):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="epoch", file=self.stream, dynamic_ncols=True)

    def __call__(self, state, record: dict) -> None:
        fields = _progress_fields(record)
        if self.bar is not None:
            self.bar.update(record["epoch"] - self.bar.n)
            self.bar.set_postfix(fields, refresh=True)
        else:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            where = f"step {record['step']}" if "step" in record else f"epoch {record['epoch']}"
            print(f"{where}: {text}", file=self.stream, flush=True)

    def on_run_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        """Closes the bar (also when training failed: the error then stands on a line of its own)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
