"""Loggers as :func:`jaxnet.fit` callbacks: CSV, TensorBoard event files, MLflow, fed the same records.

Each logger is called after every epoch with the epoch's record (``epoch``, ``train_loss``,
``val_loss``, ``val_<metric>`` ...) and writes its scalars: a member run's per-member lists become
one row per member (CSV) or one series per member (``val_loss/member_3``). With
``fit(log_every_steps=N)`` each also gets the logged steps' records through ``on_step`` (``step``,
``epoch``, ``loss``, ``grad_norm``, ``learning_rate``): a ``steps.csv`` beside the epochs' CSV,
TensorBoard and MLflow series ``step/loss`` ... by global step. TensorBoard and MLflow
are optional extras, imported when their logger is made (``pip install 'jaxnet-trainer[log]'``).

:func:`make_loggers` builds them by name for a run folder (``jaxnet train --log tensorboard,mlflow,csv``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from jaxnet import _atomic as atomic
from jaxnet.hooks import OnRunEnd, OnRunStart, OnStep

LOG_EXTRA = "pip install 'jaxnet-trainer[log]'"
NAMES = ("csv", "tensorboard", "mlflow")


def scalars(record: dict) -> list[tuple[str, float]]:
    """``(tag, value)`` of a record's numbers: a list of K per-member values becomes ``tag/member_i``;
    None (a stopped member) and non-numbers are left out."""
    out = []
    for name, value in record.items():
        if name == "epoch":
            continue
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                out.append((f"{name}/member_{i}" if isinstance(value, list) else name, float(v)))
    return out


def _rows(record: dict) -> list[dict]:
    """A record as CSV rows: itself, or one row per member (``member`` first)."""
    lists = {k: v for k, v in record.items() if isinstance(v, list)}
    if not lists:
        return [record]
    k = len(next(iter(lists.values())))
    return [{"member": i, **{n: (v[i] if isinstance(v, list) else v) for n, v in record.items()}} for i in range(k)]


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if row.get(c) is None else row.get(c)) for c in columns} for row in rows)
    atomic.write_text(path, text.getvalue())


def step_tags(record: dict) -> list[tuple[str, float]]:
    """``(step/<name>, value)`` of a logged step's record."""
    return [(f"step/{k}", float(v)) for k, v in record.items() if k not in ("step", "epoch") and math.isfinite(v)]


class CSVLogger(OnRunStart, OnStep, OnRunEnd):
    """One CSV row per epoch (per member and epoch in a member run), rewritten atomically after
    every epoch, so a crash keeps the epochs done and no reader sees half a file. Logged steps
    go to ``steps_path`` (default ``steps.csv`` beside it), written with each epoch's row."""

    def __init__(self, path, steps_path=None):
        self.path = Path(path)
        self.steps_path = Path(steps_path) if steps_path is not None else self.path.with_name("steps.csv")
        self.rows: list[dict] = []
        self.steps: list[dict] = []

    def on_run_start(self, state) -> None:
        self.rows = [row for record in state.history for row in _rows(record)]  # a resumed run's epochs
        self.steps = [row for row in _read_csv(self.steps_path) if int(row["step"]) <= state.steps]

    def on_step(self, state, record) -> None:
        self.steps.append(record)

    def __call__(self, state, record) -> None:
        self.rows.extend(_rows(record))
        _write_csv(self.path, self.rows)
        if self.steps:
            _write_csv(self.steps_path, self.steps)

    def on_run_end(self, state) -> None:
        if self.steps:
            _write_csv(self.steps_path, self.steps)


def _read_csv(path: Path) -> list[dict]:
    """The rows of a steps file this logger wrote (none when it is absent or unreadable)."""
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("step", "").isdigit()]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which is not installed: {LOG_EXTRA}") from None


class TensorBoardLogger(OnRunStart, OnStep, OnRunEnd):
    """TensorBoard event files in ``logdir``: every scalar of every epoch (step = epoch), and the
    run's configuration as text. Written with TensorBoard's own event writer (no TensorFlow)."""

    def __init__(self, logdir, config: dict | None = None):
        writer = _require("tensorboard.summary.writer.event_file_writer", "the TensorBoard logger")
        self._pb = _require("tensorboard.compat.proto.summary_pb2", "the TensorBoard logger")
        self._event = _require("tensorboard.compat.proto.event_pb2", "the TensorBoard logger").Event
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = writer.EventFileWriter(str(self.logdir))
        self.config = config

    def on_run_start(self, state) -> None:
        if self.config is not None and state.epoch == 0:
            self._text("config", "```\n" + json.dumps(self.config, indent=1, sort_keys=True) + "\n```")

    def _text(self, tag: str, text: str) -> None:
        tensor_pb2 = _require("tensorboard.compat.proto.tensor_pb2", "the TensorBoard logger")
        shape_pb2 = _require("tensorboard.compat.proto.tensor_shape_pb2", "the TensorBoard logger")
        types_pb2 = _require("tensorboard.compat.proto.types_pb2", "the TensorBoard logger")
        metadata = self._pb.SummaryMetadata(plugin_data=self._pb.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[text.encode()], tensor_shape=shape_pb2.TensorShapeProto()
        )
        value = self._pb.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self.writer.add_event(self._event(wall_time=time.time(), step=0, summary=self._pb.Summary(value=[value])))
        self.writer.flush()

    def _scalars(self, step: int, tags: list[tuple[str, float]]) -> None:
        values = [self._pb.Summary.Value(tag=tag, simple_value=v) for tag, v in tags]
        self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._pb.Summary(value=values)))

    def on_step(self, state, record) -> None:
        self._scalars(int(record["step"]), step_tags(record))  # flushed with the epoch's scalars

    def __call__(self, state, record) -> None:
        self._scalars(int(record["epoch"]), scalars(record))
        self.writer.flush()

    def on_run_end(self, state) -> None:
        self.writer.close()


class MLflowLogger(OnRunStart, OnStep, OnRunEnd):
    """An MLflow run: the config as parameters, every scalar per epoch (step = epoch), and at the
    end the artifacts given to :meth:`log_artifacts`.

    Args:
      tracking_uri: the tracking store (default: ``MLFLOW_TRACKING_URI``, else ``default_uri``).
      default_uri: the store when neither is given (a run folder's own ``sqlite:///.../mlflow.db``).
      artifact_root: where a new experiment keeps its artifacts (with ``default_uri``).
      experiment: the experiment's name; run_name: the run's; params: logged as parameters.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        default_uri: str | None = None,
        artifact_root: str | None = None,
        experiment: str = "jaxnet",
        run_name: str | None = None,
        params: dict | None = None,
        run_id: str | None = None,
    ):
        self.mlflow = _require("mlflow", "the MLflow logger")
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri
        self.client = self.mlflow.tracking.MlflowClient(self.uri)
        self.params = params or {}
        self.pending: list = []
        if run_id is not None:  # a resumed run logs on into its own MLflow run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            root = artifact_root if self.uri == default_uri else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=root)
        else:
            experiment_id = found.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def on_run_start(self, state) -> None:
        if state.epoch == 0 and self.params:
            flat = {k: json.dumps(v) if isinstance(v, (list, dict, tuple)) else v for k, v in self.params.items()}
            params = [self.mlflow.entities.Param(k, str(v)[:500]) for k, v in flat.items()]
            self.client.log_batch(self.run_id, params=params)

    def __call__(self, state, record) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self.mlflow.entities.Metric(tag, v, now, int(record["epoch"]))
            for tag, v in scalars(record)
            if math.isfinite(v)
        ]
        self._send(metrics + self.pending)
        self.pending = []

    def _send(self, metrics: list) -> None:
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def on_step(self, state, record) -> None:
        """Kept and sent with the epoch's metrics (one request per epoch)."""
        now = int(time.time() * 1000)
        step = int(record["step"])
        self.pending.extend(self.mlflow.entities.Metric(tag, v, now, step) for tag, v in step_tags(record))

    def log_artifacts(self, paths: list[Any]) -> None:
        for path in paths:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path))

    def on_run_end(self, state) -> None:
        if self.pending:  # the steps of an epoch stopped inside
            self._send(self.pending)
            self.pending = []

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def parse(names: str | tuple | list | None) -> tuple[str, ...]:
    """Logger names from ``"tensorboard,mlflow,csv"`` (or a sequence), checked."""
    if names is None or names == "":
        return ()
    given = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in given if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r}: use {', '.join(NAMES)} (comma-separated)")
    return tuple(dict.fromkeys(given))


def make_loggers(names, folder: Path, config: dict, run_name: str | None = None) -> list:
    """The loggers ``names`` for a run folder: ``metrics.csv``, ``tensorboard/`` and an MLflow run
    (into ``MLFLOW_TRACKING_URI``, else the folder's own ``mlflow.db`` with artifacts in ``mlartifacts/``)."""
    made = []
    for name in parse(names):
        if name == "csv":
            made.append(CSVLogger(folder / "metrics.csv"))
        elif name == "tensorboard":
            made.append(TensorBoardLogger(folder / "tensorboard", config=config))
        else:
            known = folder / "mlflow-run.json"  # the MLflow run of this folder, continued on resume
            stored = json.loads(known.read_text()) if known.exists() else {}
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').absolute()}"
            logger = MLflowLogger(
                uri,
                default_uri=f"sqlite:///{(folder / 'mlflow.db').absolute()}",
                artifact_root=(folder / "mlartifacts").absolute().as_uri(),
                run_name=run_name or folder.name,
                params=config,
                run_id=stored.get("run_id") if stored.get("tracking_uri") == uri else None,
            )
            atomic.write_text(known, json.dumps({"tracking_uri": uri, "run_id": logger.run_id}) + "\n")
            made.append(logger)
    return made
