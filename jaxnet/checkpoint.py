"""Checkpoints of a fit: the bytes on disk, written and read back against a caller's template.

:func:`save` writes a :class:`~jaxnet.loop.FitState` (params, optimizer state, PRNG key, step,
model state, best params, epoch, history, the position inside an epoch) plus the caller's JSON
metadata as ``<directory>/<steps>``, named by the optimizer steps done, through
orbax-checkpoint's ``CheckpointManager`` (atomic finalize: a save killed midway leaves only a
temporary folder, which is never read; retention of the newest ``keep``). :func:`restore` reads
the newest usable one into the structure of a template the caller gives, for example
``jax.eval_shape`` of :func:`jaxnet.init_fit_state`, so that any model checkpoints and nothing is
ever unpickled. Arrays are stored by pytree path, checked by name, shape and dtype, and covered
by a checksum computed where they live (:func:`_sums`; orbax does not verify contents on read); a
damaged checkpoint is skipped for the one before it. A state sharded across processes is written
by every process, each its own shards.

This module only stores: when to save is :class:`jaxnet.callbacks.Checkpointer`'s business.
orbax is imported inside the functions that use it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import _checks as checks
from jaxnet import parallel
from jaxnet import sharding as shardinglib
from jaxnet._feed import Position
from jaxnet.base import TrainState
from jaxnet.epoch import start_carry
from jaxnet.loop import FitState
from jaxnet.members import num_members

FORMAT = "jaxnet-checkpoint"
FORMAT_VERSION = 3
CHECKPOINT_EXTRA = "pip install 'jaxnet-trainer[checkpoint]'"


class Restored(NamedTuple):
    """A restored checkpoint.

    Attributes:
      state: the :class:`~jaxnet.loop.FitState` to pass to ``fit(resume=...)``.
      metadata: the JSON metadata given to :func:`save`.
      path: the checkpoint folder.
      damaged: ``(path, reason)`` for each newer checkpoint that was skipped as damaged.
    """

    state: FitState
    metadata: dict
    path: Path
    damaged: list


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(f"checkpoints need orbax-checkpoint, which is not installed: {CHECKPOINT_EXTRA}") from None
    return ocp


def _manager(directory, keep: int | None = None, create: bool = False, handlers: dict | None = None):
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _writers() -> dict:
    """The handlers :func:`write` saves with: the arrays uncompressed. Orbax's default (zstd) costs
    several times the CPU of the write itself and saves a few percent of a trained float state's
    bytes; the CPU is what an asynchronous save takes from training. The format is orbax's
    standard one (read back with ``StandardRestore``; older, compressed checkpoints still read)."""
    ocp = _orbax()
    return {"state": ocp.PyTreeCheckpointHandler(use_compression=False), "meta": ocp.JsonCheckpointHandler()}


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


def _array_tree(state: FitState) -> dict:
    """The arrays of a checkpoint as a pytree (the typed key as its raw ``key_data``)."""
    train = state.train
    tree = {
        "train": {
            "params": train.params,
            "opt_state": train.opt_state,
            "key": jax.random.key_data(train.key),
            "step": train.step,
        }
    }
    if train.model_state is not None:
        tree["train"]["model_state"] = train.model_state
    if state.best_params is not None:
        tree["best_params"] = state.best_params
        if train.model_state is not None:
            tree["best_model_state"] = state.best_model_state
    if state.position is not None:
        p = state.position
        tree["position"] = {
            "shuffle_key": jax.random.key_data(p.shuffle_key),
            "total": p.total,
            "finite": p.finite_steps,
        }
        if p.sums is not None:
            tree["position"]["sums"] = p.sums
        if p.weight is not None:
            tree["position"]["weight"] = p.weight
    return tree


def _where(p: Position) -> dict:
    """The JSON part of a position: its counts, and the shapes of its metric sums (the template)."""
    where = {"steps": p.steps, "examples": p.examples, "tokens": p.weight is not None, "order": list(p.order)}
    if p.sums is not None:
        where["sums"] = {name: [list(np.shape(v)), np.asarray(v).dtype.str] for name, v in p.sums.items()}
    return where


def _sums_template(position: dict) -> dict | None:
    sums = position.get("sums")
    if sums is None:
        return None
    if not isinstance(sums, dict) or not all(isinstance(v, list) and len(v) == 2 for v in sums.values()):
        raise ValueError("its position's metric sums are malformed")
    return {name: jnp.zeros(tuple(int(d) for d in shape), np.dtype(dtype)) for name, (shape, dtype) in sums.items()}


def _checksum(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """The sha256 of host arrays (by name, dtype and shape) and of the metadata: the checksum of
    checkpoints written before :func:`_sums` (still read)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


SUMS = "sum32:"
"""The prefix of a checksum made by :func:`_sums`."""


def _sums(arrays: dict, meta: dict) -> str:
    """The checksum of a checkpoint's arrays, computed where they live (on their devices, sharded
    or not; no copy to the host): per array, the sum modulo 2**32 of a mix of each element's bits
    with its index (murmur3's finalizer). Integer sums do not depend on the order of addition, so
    the figure is the same for the array whole on one device, sharded on any mesh or across
    processes, or read back as numpy; any one changed element changes it. Combined with the
    names, dtypes, shapes and metadata by sha256."""
    names = sorted(arrays)
    sums = jax.device_get(_mixed_sums([arrays[n] for n in names]))
    h = hashlib.sha256()
    for name, total in zip(names, sums):
        a = arrays[name]
        h.update(f"{name}:{np.dtype(a.dtype).str}:{tuple(a.shape)}:{int(total)};".encode())
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return SUMS + h.hexdigest()


@jax.jit
def _mixed_sums(arrays: list) -> list:
    return [_mixed_sum(a) for a in arrays]  # one program for the whole state


def _mixed_sum(a) -> jax.Array:
    if a.dtype == jnp.bool_:
        words = a.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[np.dtype(a.dtype).itemsize]
        words = jax.lax.bitcast_convert_type(a, width).astype(jnp.uint32)
    index = jax.lax.broadcasted_iota(jnp.uint32, a.shape, 0) if a.ndim else jnp.uint32(0)
    for axis in range(1, a.ndim):  # the flat index, in uint32 (wrapping as the sum does)
        index = index * jnp.uint32(a.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, a.shape, axis)
    h = words ^ (index * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


def _verify(arrays: dict, meta: dict) -> None:
    """Raises ValueError unless ``arrays`` and ``meta`` have the checksum ``meta`` records."""
    recorded = meta.get("checksum", "")
    found = _sums(arrays, meta) if recorded.startswith(SUMS) else _checksum(arrays, meta)
    if found != recorded:
        raise ValueError("checksum mismatch")


class Snapshot(NamedTuple):
    """A checkpoint's contents (:func:`snapshot`), to be written by :func:`write`: ``arrays`` by
    name (copies of the state's, on their devices), ``meta`` (JSON) and ``steps`` (its name)."""

    arrays: dict
    meta: dict
    steps: int


def snapshot(state: FitState, metadata: dict | None = None) -> Snapshot:
    """A copy of ``state`` as :func:`write` stores it: after this returns, training may go on (and
    donate the state's buffers) while the snapshot is written. The copies stay where the state's
    arrays are (sharded as they are)."""
    tree = _array_tree(state)
    p = state.position
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "key_impl": str(jax.random.key_impl(state.train.key)),
        "has_best": state.best_params is not None,
        "position": None if p is None else _where(p),
        "metadata": metadata or {},
    }
    # Copies: the loop goes on (donating the state's buffers, appending to its history) while a
    # background thread writes this. Arrays are copied on their device (dispatched, not waited
    # for): the thread then brings them to the host (:func:`write`), off the training thread.
    arrays = jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else np.array(a), tree)
    return Snapshot(_flatten(arrays), copy.deepcopy(meta), state.steps)


def write(directory: str | os.PathLike, snap: Snapshot, *, keep: int | None = None) -> Path:
    """Writes ``snap`` as checkpoint ``<directory>/<snap.steps>`` (atomically: a write killed
    midway leaves only a temporary folder, never read), with its checksum; keeps the newest
    ``keep``. Safe to call from a background thread (one write at a time per directory).

    The arrays are checksummed where they live (:func:`_sums`) and handed to orbax as they are: a
    state sharded across processes is written by every process, each its own shards (all
    processes call this together)."""
    checks.optional_integer("keep", keep)
    ocp = _orbax()
    meta = dict(snap.meta, checksum=_sums(snap.arrays, snap.meta))
    manager = _manager(directory, keep, create=True, handlers=_writers())
    try:
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(snap.arrays), meta=ocp.args.JsonSave(meta))
        manager.save(snap.steps, args=args, force=True)
        manager.wait_until_finished()
    except (ValueError, OSError) as e:  # orbax reports a failed write (a full disk) as ValueError
        raise _write_error(directory, snap.steps, e) from e
    finally:
        manager.close()
    return Path(directory).absolute() / str(snap.steps)


def save(
    directory: str | os.PathLike, state: FitState, *, metadata: dict | None = None, keep: int | None = None
) -> Path:
    """Writes ``state`` as checkpoint ``<directory>/<state.steps>`` (synchronously, atomically):
    :func:`write` of its :func:`snapshot`.

    Args:
      directory: the checkpoint folder (created if needed); one run's checkpoints only.
      state: the :class:`~jaxnet.loop.FitState` after an epoch (single or member run), or
        between two chunks of an epoch (its ``position`` set).
      metadata: JSON-serializable data to keep with it (a config, a data description).
      keep: keep the newest ``keep`` checkpoints, deleting older ones (None: all).

    Returns:
      The checkpoint's folder.
    """
    return write(directory, snapshot(state, metadata), keep=keep)


def _write_error(directory, step: int, error: BaseException) -> OSError:
    """A failed checkpoint write as one OSError (nothing of it was finalized: the older
    checkpoints stay as they were)."""
    text = str(error)
    if isinstance(error, OSError) and error.errno is not None:
        code = error.errno
    else:
        code = errno.ENOSPC if "RESOURCE_EXHAUSTED" in text or "No space left" in text else errno.EIO
    reason = os.strerror(code) if code != errno.EIO else text.split("\n")[0][:200]
    return OSError(
        code,
        f"checkpoint {step} in {Path(directory).absolute()} was not written ({reason}); the "
        "checkpoints before it are intact: free space, then resume",
    )


def steps(directory: str | os.PathLike) -> list[int]:
    """The step counts (names) of the complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    # A finalized orbax step is a folder named by the integer step; a save that was killed
    # midway leaves a "<step>.orbax-checkpoint-tmp-*" folder, which is not a step.
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class Entry(NamedTuple):
    """One checkpoint: its folder name ``steps`` (optimizer steps done), its completed ``epoch``
    count, and the steps done inside the next epoch (None at an epoch's end)."""

    steps: int
    epoch: int
    inside: int | None


def entries(directory: str | os.PathLike) -> list[Entry]:
    """What each complete checkpoint in ``directory`` holds (from its metadata), oldest first;
    an unreadable one is left out. A checkpoint that a running save removes meanwhile (``keep``)
    is left out too: the listing is taken again."""
    for _ in range(3):
        try:
            return _entries(directory)
        except (FileNotFoundError, NotADirectoryError):  # a step folder vanished between listing and reading
            continue  # (orbax says NotADirectoryError of a path that is no longer a folder)
    return _entries(directory)


def _entries(directory) -> list[Entry]:
    found, names = [], steps(directory)
    if not names:
        return found
    manager = _manager(directory)
    try:
        for step in names:
            try:
                meta = _read_meta(manager, step)
            except Exception:  # damaged, foreign or removed meanwhile: restore() reports those
                continue
            position = meta.get("position")
            found.append(Entry(step, int(meta["epoch"]), None if position is None else int(position["steps"])))
    finally:
        manager.close()
    return found


def latest(directory: str | os.PathLike) -> Path | None:
    """The folder of the newest complete checkpoint in ``directory`` (not verified), or None."""
    found = steps(directory)
    return Path(directory).absolute() / str(found[-1]) if found else None


def set_aside(directory: str | os.PathLike, after: int) -> list[Path]:
    """Renames the checkpoints newer than step ``after`` to ``<steps>.damaged`` (so that a resumed
    run neither overwrites nor keeps them) and removes the temporary folders of saves killed midway.

    Returns:
      The new paths of the checkpoints set aside.
    """
    directory, moved = Path(directory), []
    if not directory.is_dir():
        return moved
    for child in sorted(directory.iterdir()):
        if child.name.isdigit() and int(child.name) > after:
            aside, n = child.with_name(f"{child.name}.damaged"), 1
            while aside.exists():
                aside, n = child.with_name(f"{child.name}.damaged-{n}"), n + 1
            child.rename(aside)
            moved.append(aside)
        elif ".orbax-checkpoint-tmp" in child.name and child.is_dir():
            shutil.rmtree(child)  # a save killed midway: never finalized, never used
    return moved


def _template(like: FitState, has_best: bool, position: dict | None) -> dict:
    """The checkpoint's array tree as shapes and dtypes, from the caller's template."""

    def build(train, best, best_model_state):
        best = train.params if best is None else best
        best_model_state = train.model_state if best_model_state is None else best_model_state
        if not has_best:
            best, best_model_state = None, None
        inside = None
        if position is not None:
            carry = (start_carry if num_members(train.key) is None else jax.vmap(start_carry))(train)
            weight = carry.total if position.get("tokens") is True else None  # a token count: the total's shape
            inside = Position(train.key, carry.total, carry.finite_steps, 0, 0, _sums_template(position), weight)
        return _array_tree(FitState(train, 0, [], best, 0, best_model_state, inside))

    return jax.eval_shape(build, like.train, like.best_params, like.best_model_state)


def _placements(like: FitState, mesh, rules) -> dict:
    """The sharding of each array of a checkpoint (by name) as ``fit(mesh=mesh, sharding=rules)``
    lays the state out: the params, best params and optimizer state by the sharding rules, the
    rest of the train state replicated; the position inside an epoch is absent (read whole)."""
    layout = shardinglib.state_shardings(like.train, mesh, rules)
    whole = shardinglib.replicated(mesh)
    tree = {
        "train": {"params": layout.params, "opt_state": layout.opt_state, "key": whole, "step": whole},
        "best_params": layout.params,
    }
    if like.train.model_state is not None:
        tree["train"]["model_state"] = tree["best_model_state"] = layout.model_state
    return _flatten(tree)


def _read_meta(manager, step: int) -> dict:
    meta = manager.restore(step, args=_orbax().args.Composite(meta=_orbax().args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a jaxnet checkpoint")
    if meta.get("format_version", 0) != FORMAT_VERSION:
        newer = meta.get("format_version", 0) > FORMAT_VERSION
        raise ValueError(
            f"checkpoint format {meta.get('format_version')}: "
            + ("upgrade jaxnet to read it" if newer else "written by an older jaxnet")
        )
    problem = checks.field_problem(meta, _META_FIELDS)
    if problem is not None:
        raise ValueError(f"its metadata {problem}")
    position = meta.get("position")
    if position is not None and not (isinstance(position, dict) and type(position.get("steps")) is int):
        raise ValueError("its metadata field 'position' is malformed")
    order = [] if position is None else position.get("order", [])  # absent before the order was recorded
    if not (isinstance(order, list) and len(order) in (0, 4) and all(type(v) in (int, bool) for v in order)):
        raise ValueError("its metadata field 'position' is malformed (its order)")
    return meta


_META_FIELDS = {  # name: (allowed types, required)
    "epoch": ((int,), True),
    "best_epoch": ((int, list, type(None)), True),  # (a list: one per member)
    "history": ((list,), True),
    "key_impl": ((str,), True),
    "has_best": ((bool,), True),
    "metadata": ((dict,), True),
    "checksum": ((str,), True),
}


def _read(path: Path, like: FitState, placed: dict) -> tuple[FitState, dict]:
    """Reads and verifies one checkpoint folder, each array named in ``placed`` into its shards;
    raises ValueError saying what is wrong."""
    manager = _manager(path.parent)
    try:
        step = int(path.name)
        meta = _read_meta(manager, step)
        shapes = _template(like, bool(meta.get("has_best")), meta.get("position"))
        named = _flatten(shapes)
        _check_stored(path, named)
        template = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[k]) if k in placed else np.zeros(v.shape, v.dtype)
            for k, v in named.items()
        }  # an array with a sharding is read straight into its shards: each process reads its own
        arrays = _arrays(manager, step, meta, template)
    except ValueError:
        raise
    except Exception as e:  # orbax/tensorstore/json errors of every kind mean: unreadable
        raise ValueError(f"{type(e).__name__}: {e}") from None
    finally:
        manager.close()
    tree = jax.tree.unflatten(jax.tree.structure(shapes), [arrays[k] for k in named])
    t = tree["train"]
    key = jax.random.wrap_key_data(t["key"], impl=meta["key_impl"])
    train = TrainState(t["params"], t["opt_state"], key, t["step"], t.get("model_state"))
    best_epoch, position = meta["best_epoch"], None
    if meta.get("position") is not None:
        p, where = tree["position"], meta["position"]
        shuffle_key = jax.random.wrap_key_data(p["shuffle_key"], impl=meta["key_impl"])
        position = Position(
            shuffle_key,
            p["total"],
            p["finite"],
            int(where["steps"]),
            where["examples"],
            p.get("sums"),
            p.get("weight"),
            tuple(where.get("order", ())),
        )
    state = FitState(
        train,
        meta["epoch"],
        list(meta["history"]),
        tree.get("best_params"),
        best_epoch,
        tree.get("best_model_state"),
        position,
    )
    return state, meta["metadata"]


def _check_stored(path: Path, named: dict) -> None:
    """Refuses a checkpoint whose stored arrays (orbax's metadata, read before any array) differ
    from the template's ``named`` shapes and dtypes in names, shapes or dtypes."""
    stored = _orbax().StandardCheckpointHandler().metadata(path / "state")
    if set(stored) != set(named):
        raise ValueError("its arrays do not match the template (another model or optimizer)")
    for k, v in named.items():
        shape, dtype = tuple(stored[k].shape), np.dtype(stored[k].dtype)
        if shape != tuple(v.shape) or dtype != np.dtype(v.dtype):
            raise ValueError(f"array {k} is {dtype} {shape}, expected {np.dtype(v.dtype)} {tuple(v.shape)}")


def _arrays(manager, step: int, meta: dict, template: dict | None = None) -> dict:
    """The arrays of checkpoint ``step``, by name, verified against ``meta``'s checksum: into
    ``template`` (arrays, or abstract arrays with shardings: read into their shards), else as
    numpy arrays as saved. Raises ValueError saying what is wrong (orbax raises its own errors).

    Arrays read into shards across processes are read by every process, each its own shards: all
    agree whether the read succeeded before any goes on (to the checksum, a collective, or to an
    older checkpoint), so a read that fails in one process fails in all."""
    ocp = _orbax()
    spread = jax.process_count() > 1 and any(isinstance(a, jax.ShapeDtypeStruct) for a in (template or {}).values())
    folder = Path(manager.directory) / str(step) / "state"

    def read():  # the handler's own restore: the manager's waits for every process after reading, and a
        handler = ocp.StandardCheckpointHandler()  # process whose read failed never came: the others hung
        try:
            return handler.restore(folder, args=ocp.args.StandardRestore(template))
        finally:
            handler.close()

    arrays = _everywhere(read, spread)
    if template is None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
    elif set(arrays) != set(template):
        raise ValueError("its arrays do not match the template (another model or optimizer)")
    _verify(arrays, meta)
    return arrays


def _everywhere(read: Callable[[], Any], spread: bool):
    """``read()``; when ``spread``, every process calls this together and they agree: a read that
    failed in any process fails in all (its own error where it failed, a ValueError elsewhere)."""
    try:
        result, failure = read(), None
    except Exception as e:  # (raised below, once every process knows)
        result, failure = None, e
    if spread and not parallel.all_processes(failure is None) and failure is None:
        raise ValueError("another process could not read its shards of it")
    if failure is not None:
        raise failure
    return result


def saved_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The params of a checkpoint, by path (``blocks.attn.q.w`` stored, ``blocks/attn/q/w``
    returned), without a template: ``path`` is a checkpoint folder (``.../checkpoints/120``) or a
    folder of them (the newest is read). Its checksum is verified; for :func:`jaxnet.load_params`."""
    path = Path(path)
    if path.name.isdigit() and path.is_dir():
        directory, step = path.parent, int(path.name)
    else:
        found = steps(path)
        if not found:
            raise ValueError(f"{path} holds no checkpoints: give a run folder, a checkpoints folder or a weights file")
        directory, step = path, found[-1]
    manager = _manager(directory)
    try:
        arrays = _arrays(manager, step, _read_meta(manager, step))
    except ValueError as e:
        raise ValueError(f"checkpoint {step} in {directory} is not usable: {e}") from None
    except Exception as e:  # orbax/tensorstore/json errors of every kind mean: unreadable
        raise ValueError(f"checkpoint {step} in {directory} is unreadable: {type(e).__name__}: {e}") from None
    finally:
        manager.close()
    prefix = "train.params."
    return {k[len(prefix) :].replace(".", "/"): v for k, v in arrays.items() if k.startswith(prefix)}


def restore(
    directory: str | os.PathLike, like: FitState, *, step: int | None = None, mesh=None, sharding=None
) -> Restored:
    """The newest usable checkpoint in ``directory`` (or the one of ``step``).

    Args:
      directory: the checkpoint folder given to :func:`save`.
      like: a template: a :class:`~jaxnet.loop.FitState` of arrays or ``jax.ShapeDtypeStruct``
        with the run's structure, e.g. ``jax.eval_shape(lambda: init_fit_state(params, optimizer,
        key))``; its ``best_params`` and ``best_model_state`` may be None (they share the structure
        of the params and of ``train.model_state``).
      step: restore the checkpoint of this many steps (its folder's name) instead of the newest.
      mesh, sharding: the ``mesh`` and ``sharding`` rules the run will train on (as given to
        :func:`jaxnet.fit`): each array of the train state and best params is then read straight
        into its shards on ``mesh``, each process reading only its own (no sharded array is ever
        whole on one host or device), on any mesh and process count, whatever those that saved it.
        Without a mesh the arrays come back whole, as numpy arrays.

    Returns:
      A :class:`Restored`; damaged newer checkpoints were skipped and are listed in ``damaged``.

    Raises:
      ValueError: ``directory`` has no checkpoints, or none of them is usable (the message says why).
    """
    directory = Path(directory)
    found = steps(directory)
    if not found:
        raise ValueError(f"cannot resume: {directory} has no checkpoints")
    if step is not None:
        if step not in found:
            raise ValueError(f"{directory} has no checkpoint of step {step}: it has {', '.join(map(str, found))}")
        found = [step]
    if sharding is not None and mesh is None:
        raise ValueError("sharding rules lay the arrays out on a mesh: give mesh=jaxnet.make_mesh(...) too")
    placed = {} if mesh is None else _placements(like, mesh, sharding)  # a bad rule raises here, not per checkpoint
    damaged = []
    for step in reversed(found):
        path = directory.absolute() / str(step)
        try:
            state, metadata = _read(path, like, placed)
        except ValueError as e:
            reason = " ".join(str(e).split())
            damaged.append((path, reason if len(reason) <= 160 else reason[:157] + "..."))
            continue
        return Restored(state, metadata, path, damaged)
    reasons = "; ".join(f"checkpoint {p.name}: {r}" for p, r in damaged)
    raise ValueError(f"cannot resume: no usable checkpoint in {directory} ({reasons})")
