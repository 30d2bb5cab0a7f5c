"""Checkpoints of a training run: save every N epochs, keep the last K, resume exactly.

A checkpoint is ``<out>/checkpoints/<epoch>``, written by orbax-checkpoint's
``CheckpointManager`` (atomic finalize: a save killed midway leaves only a temporary folder, which
is ignored; retention of the last ``keep`` steps). Each holds two items:

- ``state``: a flat dict of named arrays: the :class:`~jaxnet.loop.FitState`'s train state (params,
  optimizer state, PRNG key data, step), the best params so far (early stopping) and the data
  standardization (``norm.mean``, ``norm.std``).
- ``meta``: JSON: format and version, epoch, history, best epoch, the run's config, the model meta,
  the checkpoint schedule and a sha256 checksum over the arrays and the rest of the meta.

Restoring never unpickles: the tree structure is rebuilt from the config (model + optimizer), and
the arrays are read into it by name, shape and dtype. Orbax does not verify array contents on
read (a flipped byte inside a stored chunk may decode to different numbers), so the checksum is
verified here and a mismatch is reported as damage.

The arrays are flattened to a dict keyed by their pytree path, so the same layout serves models
with a leading member axis (the arrays just gain a dimension) and sharded ``jax.Array`` leaves
(orbax writes each process's shards; the checksum would then have to be computed per shard).

orbax is imported inside the functions that use it: training without checkpoints does not pay
its import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnet.base import TrainState
from jaxnet.loop import FitState

FORMAT = "jaxnet-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"


class Restored(NamedTuple):
    """A restored checkpoint.

    Attributes:
      config: the run's :class:`jaxnet.train.TrainConfig`.
      fit_state: the :class:`~jaxnet.loop.FitState` to pass to ``fit(resume=...)``.
      meta: the checkpoint's JSON meta (``epoch``, ``finished``, ``checkpoint_every``, ``keep``...).
      path: the checkpoint folder.
      damaged: ``(path, reason)`` for each newer checkpoint that was skipped as damaged.
    """

    config: Any
    fit_state: FitState
    meta: dict
    path: Path
    damaged: list


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """The checkpoint folder of run folder ``out``: ``out/checkpoints`` (absolute)."""
    return Path(out).absolute() / CHECKPOINTS


def _manager(out, keep: int | None = None, create: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(out), options=options)


def _name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) for p in parts)


def _flatten(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): leaf for path, leaf in leaves}


def _state_tree(fit_state: FitState, mean, std) -> dict:
    """The arrays of a checkpoint as a pytree (typed key as its raw ``key_data``)."""
    train = fit_state.train
    tree = {
        "train": {
            "params": train.params,
            "opt_state": train.opt_state,
            "key": jax.random.key_data(train.key),
            "step": train.step,
        },
        "norm": {"mean": mean, "std": std},
    }
    if fit_state.best_params is not None:
        tree["best_params"] = fit_state.best_params
    return tree


def _checksum(arrays: dict[str, np.ndarray], meta: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def finished(config, epoch: int, best_epoch: int) -> bool:
    """Whether a run of ``config`` is over after ``epoch`` epochs (all done, or early-stopped)."""
    if epoch >= config.epochs:
        return True
    return config.patience is not None and best_epoch > 0 and epoch - best_epoch >= config.patience


class Saver:
    """A ``fit`` callback that checkpoints every ``every`` epochs into ``out/checkpoints``.

    Args:
      out: the run folder.
      config: the run's :class:`~jaxnet.train.TrainConfig`.
      model_meta: :func:`jaxnet.train.model_meta` of the run.
      standardizer: the training split's ``(mean, std)``.
      every: save after every ``every``-th epoch (None: only through :meth:`finish`).
      keep: keep the newest ``keep`` checkpoints (None: all).
      start_epoch: the epoch the run resumes from; existing checkpoints newer than it (damaged
        ones that were skipped) are renamed to ``<epoch>.damaged`` so they are not overwritten.
    """

    def __init__(self, out, config, model_meta: dict, standardizer, *, every: int | None = None,
                 keep: int | None = 3, start_epoch: int = 0):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0):
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        self.out, self.config, self.model_meta = Path(out), config, model_meta
        self.mean = np.asarray(standardizer[0], np.float32)
        self.std = np.asarray(standardizer[1], np.float32)
        self.every, self.keep = every, keep
        self.last: FitState | None = None
        self.saved_epoch = start_epoch
        directory = checkpoint_dir(out)
        if directory.is_dir() and jax.process_index() == 0:  # one process tidies the shared folder
            for child in directory.iterdir():
                if child.name.isdigit() and int(child.name) > start_epoch:
                    aside, n = child.with_name(f"{child.name}.damaged"), 1
                    while aside.exists():
                        aside, n = child.with_name(f"{child.name}.damaged-{n}"), n + 1
                    child.rename(aside)
                elif ".orbax-checkpoint-tmp" in child.name and child.is_dir():
                    shutil.rmtree(child)  # a save killed midway: never finalized, never used
        self._manager = None  # created at the first save: a run that fails early leaves nothing

    def __call__(self, fit_state: FitState, record) -> None:
        self.last = fit_state
        if self.every is not None and fit_state.epoch % self.every == 0:
            self.save(fit_state)

    @property
    def manager(self):
        if self._manager is None:
            self._manager = _manager(self.out, self.keep, create=True)
        return self._manager

    def save(self, fit_state: FitState) -> Path:
        """Writes the checkpoint of ``fit_state`` (synchronously) and returns its folder."""
        import orbax.checkpoint as ocp

        tree = jax.tree.map(np.asarray, _state_tree(fit_state, self.mean, self.std))
        arrays = _flatten(tree)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": fit_state.epoch,
            "best_epoch": fit_state.best_epoch,
            "finished": finished(self.config, fit_state.epoch, fit_state.best_epoch),
            "history": fit_state.history,
            "config": self.config.to_dict(),
            "model": self.model_meta,
            "key_impl": str(jax.random.key_impl(fit_state.train.key)),
            "has_best": fit_state.best_params is not None,
            "checkpoint_every": self.every,
            "keep": self.keep,
        }
        meta["checksum"] = _checksum(arrays, meta)
        self.manager.save(
            fit_state.epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        )
        self.manager.wait_until_finished()
        self.saved_epoch = fit_state.epoch
        return checkpoint_dir(self.out) / str(fit_state.epoch)

    def finish(self) -> Path | None:
        """Saves the last epoch seen unless it is already saved; returns the newest checkpoint."""
        if self.last is not None and self.last.epoch != self.saved_epoch:
            self.save(self.last)
        if self._manager is not None:
            self._manager.close()
        return latest(self.out)


def steps(out) -> list[int]:
    """The epochs of the complete checkpoints in run folder ``out``, oldest first."""
    directory = checkpoint_dir(out)
    if not directory.is_dir():
        return []
    # A finalized orbax step is a folder named by the integer step; a save that was killed
    # midway leaves a "<step>.orbax-checkpoint-tmp-*" folder, which is not a step.
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def latest(out) -> Path | None:
    """The folder of the newest complete checkpoint in ``out`` (not verified), or None."""
    found = steps(out)
    return checkpoint_dir(out) / str(found[-1]) if found else None


def _template(config, model_meta: dict, has_best: bool):
    """The checkpoint's array tree, as shapes and dtypes, rebuilt from the config."""
    from jaxnet import train as trainlib
    from jaxnet.step import init_state, skip_nonfinite_updates

    model = trainlib.build_model(model_meta)
    optimizer = trainlib.make_optimizer(config)
    if config.skip_nonfinite:
        optimizer = skip_nonfinite_updates(optimizer)

    def build():
        params = model.init(jax.random.key(0))
        state = init_state(params, optimizer, jax.random.key(0))
        fit_state = FitState(state, 0, [], params if has_best else None, 0)
        d = model_meta["sizes"][0]
        return _state_tree(fit_state, jax.numpy.zeros(d, jax.numpy.float32), jax.numpy.zeros(d, jax.numpy.float32))

    shapes = jax.eval_shape(build)
    treedef = jax.tree.structure(shapes)
    return shapes, treedef


def _load(path: Path):
    """Reads and verifies one checkpoint folder; raises ValueError saying what is wrong."""
    import orbax.checkpoint as ocp

    from jaxnet import train as trainlib

    manager = _manager(path.parent.parent)
    try:
        step = int(path.name)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a jaxnet checkpoint")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"checkpoint format {meta['format_version']}: upgrade jaxnet to read it")
        config = trainlib.TrainConfig.from_dict(meta["config"])
        shapes, treedef = _template(config, meta["model"], bool(meta.get("has_best")))
        named = _flatten(shapes)
        template = {k: np.zeros(v.shape, v.dtype) for k, v in named.items()}
        arrays = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
        ).state
        if set(arrays) != set(named):
            raise ValueError("its arrays do not match its config")
        for k, v in named.items():
            if arrays[k].shape != v.shape or arrays[k].dtype != v.dtype:
                raise ValueError(f"array {k} has shape {arrays[k].shape}, expected {v.shape}")
        if _checksum(arrays, meta) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
    except ValueError:
        raise
    except Exception as e:  # orbax/tensorstore/json errors of every kind mean: unreadable
        raise ValueError(f"{type(e).__name__}: {e}") from None
    finally:
        manager.close()
    tree = jax.tree.unflatten(treedef, [arrays[k] for k in named])
    t = tree["train"]
    impl = meta.get("key_impl")
    key = jax.random.wrap_key_data(t["key"], impl=impl) if impl else jax.random.wrap_key_data(t["key"])
    train = TrainState(t["params"], t["opt_state"], key, t["step"])
    fit_state = FitState(train, meta["epoch"], list(meta["history"]), tree.get("best_params"), meta["best_epoch"])
    norm = (tree["norm"]["mean"], tree["norm"]["std"])
    return config, fit_state, dict(meta, norm=norm)


def restore(out: str | os.PathLike, step: int | None = None) -> Restored:
    """The newest usable checkpoint in run folder ``out`` (or the one of epoch ``step``); damaged
    newer ones are skipped and listed in ``damaged``.

    Raises:
      ValueError: ``out`` has no checkpoints, or none of them is usable (the message says why).
    """
    out = Path(out)
    if not out.exists():
        raise ValueError(f"cannot resume: {out} does not exist (give the --out folder of an earlier run)")
    found = steps(out)
    if not found:
        raise ValueError(f"cannot resume: {out} has no checkpoints (give the --out folder of an earlier 'jaxnet train')")
    if step is not None:
        if step not in found:
            raise ValueError(f"{out} has no checkpoint of epoch {step}: it has {', '.join(map(str, found))}")
        found = [step]
    damaged = []
    for step in reversed(found):
        path = checkpoint_dir(out) / str(step)
        try:
            config, fit_state, meta = _load(path)
        except ValueError as e:
            reason = " ".join(str(e).split())
            damaged.append((path, reason if len(reason) <= 160 else reason[:157] + "..."))
            continue
        return Restored(config, fit_state, meta, path, damaged)
    reasons = "; ".join(f"checkpoint {p.name}: {r}" for p, r in damaged)
    raise ValueError(f"cannot resume: no usable checkpoint in {out} ({reasons})")


OVERRIDABLE = ("checkpoint_every", "keep")


def check_overrides(config, **given) -> None:
    """Raises ValueError naming the first option in ``given`` (None = not given) that differs from
    the checkpoint's ``config``: a resumed run keeps its config."""
    from jaxnet.losses import get_loss

    for name, value in given.items():
        if value is None:
            continue
        have = getattr(config, name)
        same = value == have
        if name == "loss" and have is not None:
            same = get_loss(value).name == get_loss(have).name
        if name == "data" and have is not None:
            same = Path(value).absolute() == Path(have).absolute()
        if name == "hidden":
            same = tuple(value) == tuple(have)
            value, have = ",".join(map(str, value)), ",".join(map(str, have))
        if not same:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value} conflicts with the checkpoint's {have}: a resumed run keeps its config "
                "(drop the option, or train into a new --out folder)"
            )


class Interrupt:
    """Turns SIGINT/SIGTERM into a stop at the next epoch boundary (a ``fit`` callback).

    Use as a context manager around training; the first signal sets ``signum`` and makes the
    callback return True (stop). A second SIGINT raises KeyboardInterrupt at once (a second
    SIGTERM terminates): checkpoints are finalized atomically, so nothing is corrupted.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        print(f"stopping after this epoch ({signal.Signals(signum).name}; again to quit at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "Interrupt":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __call__(self, fit_state, record) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(self.signum or 0)



def resume(out: str | os.PathLike, callbacks=(), *, restored: Restored | None = None,
           checkpoint_every: int | None = None, keep: int | None = None, mesh=None):
    """Continues the run in folder ``out`` from its newest usable checkpoint, writing on into ``out``.

    Args:
      out: the run folder (the ``out`` of the interrupted :func:`jaxnet.train.run`).
      callbacks: ``fit`` callbacks.
      restored: an already restored checkpoint of ``out`` (default: :func:`restore`).
      checkpoint_every, keep: the checkpoint schedule (default: the checkpoint's own).
      mesh: a device mesh for data-parallel training, as in :func:`jaxnet.train.run`.

    Returns:
      The :class:`jaxnet.train.RunResult`; a run that had already finished trains no further.
    """
    from jaxnet import train as trainlib

    restored = restored if restored is not None else restore(out)
    problem = trainlib.load_problem(restored.config)
    for name, now, then in zip(("mean", "std"), problem.standardizer, restored.meta["norm"]):
        if not np.array_equal(np.asarray(now, np.float32), then):
            raise ValueError(
                f"cannot resume: the data of {out} changed since the checkpoint (its standardization {name} differs)"
            )
    every = checkpoint_every if checkpoint_every is not None else restored.meta.get("checkpoint_every")
    keep = keep if keep is not None else restored.meta.get("keep")
    return trainlib.run(restored.config, callbacks, restored.fit_state, mesh, out=out, checkpoint_every=every,
                        keep=keep)


def history_finished(config, history) -> bool:
    """Whether a run of ``config`` with ``history`` is over (all epochs, or stopped early)."""
    best = 0
    for record in history:
        if "val_loss" in record and (best == 0 or record["val_loss"] < history[best - 1]["val_loss"]):
            best = record["epoch"]
    return finished(config, len(history), best)


def quiet_failed_reads() -> None:
    """Silences the "Event loop is closed" tracebacks that orbax's I/O threads print when a read of
    a damaged checkpoint fails (the failure itself is reported by :func:`restore`). For command-line
    use: it replaces ``sys.unraisablehook`` for the rest of the process."""
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            return
        if isinstance(getattr(error, "__cause__", None), RuntimeError) and "Event loop is closed" in str(error.__cause__):
            return
        previous(unraisable)

    sys.unraisablehook = hook
