"""jaxnet through its public API, as a user writes it: ``mlp`` + ``fit``, or ``make_epoch`` + ``jit``.

``fit`` is timed from its own history: each epoch record carries its wall time (one compiled call
plus the host reading the epoch's loss); the first epoch includes compilation. A callback holds
``fit`` between epochs while the runner times the other implementations (see ``common.EpochTimer``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jaxnet
from bench import common

_UNTIL_STOPPED = 1_000_000  # epochs: fit runs until the timer's callback stops it


def _fit_timer(cfg, units, *args, **kwargs) -> common.EpochTimer:
    """``jaxnet.fit(*args, **kwargs)``, one or more epochs per repeat (at least ``min_seconds``),
    stopped by its callback when the runner is done."""

    def train(after_epoch):
        jaxnet.fit(
            *args,
            epochs=_UNTIL_STOPPED,
            callbacks=[lambda state, record: after_epoch(record["seconds"])],
            **kwargs,
        )

    return common.EpochTimer(train, units, cfg["repeats"], cfg.get("min_seconds", 0.0))


def _seed_model():
    return jaxnet.with_params(jaxnet.mlp([3, 2, 2], "sigmoid", "sigmoid"), common.seed_params())


def _seed_check(cfg, model, params):
    k = cfg["check_steps"]
    _fit = jaxnet.fit(
        model,
        params,
        common.SEED_X[None],
        common.SEED_T[None],
        loss="half_sse",
        optimizer=optax.sgd(common.SEED_LR),
        epochs=k + 1,
        batch_size=1,
        key=jax.random.key(0),
    )
    history = _fit.history
    return history[k]["train_loss"]  # the loss before step k + 1 is the loss after k steps


def seed_sgd(cfg, shuffle=False):
    """``fit`` with ``batch_size=1``: one epoch is ``steps`` online updates.

    ``shuffle=False`` trains on the stream in order, the same work as the hand-written scan;
    ``shuffle=True`` reshuffles every epoch, the work of the hand-written shuffled scan.
    """
    model = _seed_model()
    params = model.init(jax.random.key(0))
    check = _seed_check(cfg, model, params)
    xs, ts = common.seed_stream(cfg["steps"])
    return check, _fit_timer(
        cfg,
        cfg["steps"],
        model,
        params,
        xs,
        ts,
        loss="half_sse",
        optimizer=optax.sgd(common.SEED_LR),
        batch_size=1,
        key=jax.random.key(1),
        shuffle=shuffle,
        unroll=cfg.get("unroll", 1),
    )


def _timed_epoch(run_epoch, state, x, y, units, cfg):
    holder = {"s": state}

    def run():
        holder["s"], metrics = run_epoch(holder["s"], x, y)
        float(metrics["loss"])  # the host reads the epoch's loss, as fit does

    return common.time_calls(run, run, units, cfg["repeats"], cfg.get("min_seconds", 0.0))


def seed_sgd_epoch(cfg):
    """``jax.jit(make_epoch(make_update(...)))`` called by the user's own loop."""
    model = _seed_model()
    params = model.init(jax.random.key(0))
    check = _seed_check(cfg, model, params)
    xs, ts = map(jnp.asarray, common.seed_stream(cfg["steps"]))
    opt = optax.sgd(common.SEED_LR)
    update = jaxnet.make_update(model, "half_sse", opt)
    epoch = jaxnet.make_epoch(update, cfg["steps"], 1, shuffle=False, unroll=cfg.get("unroll", 1))
    run_epoch = jax.jit(epoch, donate_argnums=0)
    state = jaxnet.init_state(params, opt, jax.random.key(1))
    return check, _timed_epoch(run_epoch, state, xs, ts, cfg["steps"], cfg)


def ensemble(cfg):
    """``fit`` with a leading model axis: K members (params ``(K, ...)``, keys ``(K,)``) in one program.

    Every member trains on the same stream in order (``shuffle=False``), the work of the
    hand-written ``jit(vmap(scan))``.
    """
    k = cfg["k"]
    model = jaxnet.mlp([3, 2, 2], "sigmoid", "sigmoid")
    opt = optax.sgd(common.SEED_LR)
    params = jax.tree.map(jnp.asarray, common.ensemble_params(k))
    keys = jax.random.split(jax.random.key(1), k)

    x1, t1 = common.SEED_X[None], common.SEED_T[None]
    state = jaxnet.fit(
        model,
        params,
        x1,
        t1,
        loss="half_sse",
        optimizer=opt,
        epochs=cfg["check_steps"],
        batch_size=1,
        key=keys,
        shuffle=False,
    )
    losses = jax.vmap(jaxnet.make_loss_fn(model, "half_sse"), in_axes=(0, None))(state.params, (x1, t1))
    check = float(jnp.mean(losses))

    xs, ts = common.seed_stream(cfg["steps"])
    return check, _fit_timer(
        cfg,
        k * cfg["steps"],
        model,
        params,
        xs,
        ts,
        loss="half_sse",
        optimizer=opt,
        batch_size=1,
        key=keys,
        shuffle=False,
        unroll=cfg.get("unroll", 1),
    )


def ensemble_separate(cfg, members=4):
    """``members`` separate ``fit`` calls, one per member, timed end to end (each call traces and
    compiles its own program, as a loop of K calls would): model-steps/s of K separate calls.

    Returns no loss check: tests/test_members.py shows that members trained alone equal the
    members of one vmapped run.
    """
    model = jaxnet.mlp([3, 2, 2], "sigmoid", "sigmoid")
    params = common.ensemble_params(members)
    keys = jax.random.split(jax.random.key(1), members)
    xs, ts = common.seed_stream(cfg["steps"])

    def run():
        for i in range(members):
            own = jax.tree.map(lambda a: jnp.asarray(a[i]), params)
            state = jaxnet.fit(
                model,
                own,
                xs,
                ts,
                loss="half_sse",
                optimizer=optax.sgd(common.SEED_LR),
                epochs=1,
                batch_size=1,
                key=keys[i],
                shuffle=False,
            )
            jax.block_until_ready(state.params)

    timing = common.time_calls(run, run, members * cfg["steps"], max(1, cfg["repeats"] // 2))
    return None, timing


def _problem(case, cfg):
    """(model, params, loss name, optimizer, data(n, seed) -> (x, y)) of a minibatch case."""
    if case == "wide":
        sizes, dtype = [cfg["width"]] * 5, jnp.dtype(cfg.get("dtype", "float32"))
        model = jaxnet.mlp(sizes, "relu", dtype=dtype)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), common.mlp_params(sizes))

        def data(n, seed=0):
            x, y = common.regression_data(n, sizes[0], sizes[-1], seed)
            return jnp.asarray(x, dtype), jnp.asarray(y)

        return model, params, "mse", optax.sgd(cfg["lr"]), data
    sizes = cfg["sizes"]
    params = jax.tree.map(jnp.asarray, common.mlp_params(sizes))
    data = lambda n, seed=0: common.classification_data(n, sizes[0], sizes[-1], seed)  # noqa: E731
    return jaxnet.mlp(sizes, "relu"), params, "softmax_cross_entropy", optax.adam(cfg["lr"]), data


def minibatch_check(case, cfg):
    model, params, loss, opt, data = _problem(case, cfg)
    x, y = data(cfg["check_batch"], seed=1)
    k = cfg["check_steps"]
    _fit = jaxnet.fit(
        model,
        params,
        x,
        y,
        loss=loss,
        optimizer=opt,
        epochs=k + 1,
        batch_size=cfg["check_batch"],
        key=jax.random.key(0),
    )
    history = _fit.history
    return history[k]["train_loss"]


def _shuffles(case, shuffle):
    """mlp784 and wide compare with pre-made batches in a fixed order (``shuffle=False``, the same
    work); fit-epoch with a hand-written shuffled epoch."""
    return case == "fit-epoch" if shuffle is None else shuffle


def minibatch(case, cfg, shuffle=None):
    """``fit`` over ``batch * steps`` examples: one epoch is ``steps`` updates."""
    model, params, loss, opt, data = _problem(case, cfg)
    n = cfg["n"] if "n" in cfg else cfg["batch"] * cfg["steps"]
    x, y = data(n)
    return minibatch_check(case, cfg), _fit_timer(
        cfg,
        n,
        model,
        params,
        x,
        y,
        loss=loss,
        optimizer=opt,
        batch_size=cfg["batch"],
        key=jax.random.key(1),
        unroll=cfg.get("unroll", 1),
        shuffle=_shuffles(case, shuffle),
    )


def minibatch_epoch(case, cfg):
    """``jax.jit(make_epoch(make_update(...)))`` called by the user's own loop."""
    model, params, loss, opt, data = _problem(case, cfg)
    n = cfg["n"] if "n" in cfg else cfg["batch"] * cfg["steps"]
    x, y = map(jnp.asarray, data(n))
    update = jaxnet.make_update(model, loss, opt)
    epoch = jaxnet.make_epoch(update, n, cfg["batch"], shuffle=_shuffles(case, None), unroll=cfg.get("unroll", 1))
    run_epoch = jax.jit(epoch, donate_argnums=0)
    state = jaxnet.init_state(params, opt, jax.random.key(1))
    return minibatch_check(case, cfg), _timed_epoch(run_epoch, state, x, y, n, cfg)
