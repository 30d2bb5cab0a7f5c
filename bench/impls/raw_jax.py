"""Hand-written JAX: ``jit`` + ``lax.scan`` over steps, optax for the optimizer. The floor for library overhead.

Each case function returns ``(check_loss, Timing)``: the loss after ``cfg["check_steps"]`` steps on
the check problem, then the timing of the case's workload.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common


def _forward(params, x, hidden, out=None):
    """Dense layers ``act(x @ w + b)``; ``hidden`` after every layer but the last, ``out`` after it."""
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        x = hidden(x) if i < len(params) - 1 else (out(x) if out else x)
    return x


def _tree(params, dtype=None):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


# ---- seed-sgd / ensemble: the worked example, online, SGD ----------------------------------------------


def _seed_loss(params, x, t):
    y = _forward(params, x, jax.nn.sigmoid, jax.nn.sigmoid)
    return 0.5 * jnp.sum((y - t) ** 2)


def _sgd(params, grads):
    return jax.tree.map(lambda p, g: p - common.SEED_LR * g, params, grads)


def _seed_step(params, xt):
    return _sgd(params, jax.grad(_seed_loss)(params, *xt)), None


def _seed_step_tracked(carry, xt):
    """One SGD step that also adds the example's loss to a running sum, as a training loop that
    reports its epoch loss does (fit reports it)."""
    params, total = carry
    loss, grads = jax.value_and_grad(_seed_loss)(params, *xt)
    return (_sgd(params, grads), total + loss), None


def _seed_train(params, xs, ts):
    """``(params, mean loss over the steps)`` after one SGD step per example of ``xs, ts``."""
    (params, total), _ = jax.lax.scan(_seed_step_tracked, (params, jnp.zeros((), jnp.float32)), (xs, ts))
    return params, total / xs.shape[0]


def _seed_train_untracked(params, xs, ts):
    return jax.lax.scan(_seed_step, params, (xs, ts))[0]


def _seed_check(cfg, train):
    k = cfg["check_steps"]
    xs, ts = jnp.tile(common.SEED_X, (k, 1)), jnp.tile(common.SEED_T, (k, 1))
    return train, xs, ts


def seed_sgd(cfg, track_loss=True):
    """``jit`` + ``lax.scan`` over the stream; ``track_loss=False`` takes only the gradient (no loss
    value, no running sum), the least work an online SGD loop can do."""
    train = jax.jit(_seed_train if track_loss else _seed_train_untracked)
    _, xs_c, ts_c = _seed_check(cfg, train)
    params = train(_tree(common.seed_params()), xs_c, ts_c)
    params = params[0] if track_loss else params
    check = float(_seed_loss(params, jnp.asarray(common.SEED_X), jnp.asarray(common.SEED_T)))

    xs, ts = map(jnp.asarray, common.seed_stream(cfg["steps"]))
    p0 = _tree(common.seed_params())
    call = lambda: jax.block_until_ready(train(p0, xs, ts))  # noqa: E731
    return check, common.time_calls(call, call, cfg["steps"], cfg["repeats"], cfg["min_seconds"])


def seed_sgd_shuffled(cfg):
    """The same scan, each epoch first shuffled in the compiled call (``jax.random.permutation`` + gather)."""

    @jax.jit
    def train(params, key, xs, ts):
        perm = jax.random.permutation(key, xs.shape[0])
        return _seed_train(params, xs[perm], ts[perm])

    p0 = _tree(common.seed_params())
    k = cfg["check_steps"]
    x1, t1 = jnp.asarray(common.SEED_X[None]), jnp.asarray(common.SEED_T[None])
    params = p0
    for _ in range(k):  # epochs of the single worked example, as fit runs them
        params, _ = train(params, jax.random.key(0), x1, t1)
    check = float(_seed_loss(params, x1[0], t1[0]))

    xs, ts = map(jnp.asarray, common.seed_stream(cfg["steps"]))
    key = jax.random.key(1)
    call = lambda: jax.block_until_ready(train(p0, key, xs, ts))  # noqa: E731
    return check, common.time_calls(call, call, cfg["steps"], cfg["repeats"], cfg["min_seconds"])


def seed_sgd_loop(cfg):
    """A donated ``jit`` step called from a Python loop (batches already on the device)."""
    step = jax.jit(lambda p, x, t: _seed_step(p, (x, t))[0], donate_argnums=0)
    params = _tree(common.seed_params())
    x0, t0 = jnp.asarray(common.SEED_X), jnp.asarray(common.SEED_T)
    for _ in range(cfg["check_steps"]):
        params = step(params, x0, t0)
    check = float(_seed_loss(params, x0, t0))

    xs, ts = common.seed_stream(cfg["loop_steps"])
    pairs = [(jnp.asarray(x), jnp.asarray(t)) for x, t in zip(xs, ts)]
    state = {"p": _tree(common.seed_params())}

    def run():
        p = state["p"]
        for x, t in pairs:
            p = step(p, x, t)
        state["p"] = jax.block_until_ready(p)

    return check, common.time_calls(run, run, len(pairs), cfg["repeats"])


def ensemble(cfg):
    train = jax.jit(jax.vmap(_seed_train, in_axes=(0, None, None)))
    k = cfg["k"]
    p0 = _tree(common.ensemble_params(k))
    _, xs_c, ts_c = _seed_check(cfg, train)
    params, _ = train(p0, xs_c, ts_c)
    losses = jax.vmap(_seed_loss, in_axes=(0, None, None))(
        params, jnp.asarray(common.SEED_X), jnp.asarray(common.SEED_T)
    )
    check = float(jnp.mean(losses))

    xs, ts = map(jnp.asarray, common.seed_stream(cfg["steps"]))
    call = lambda: jax.block_until_ready(train(p0, xs, ts))  # noqa: E731
    return check, common.time_calls(call, call, k * cfg["steps"], cfg["repeats"], cfg["min_seconds"])


# ---- mlp784 / wide / fit-epoch: minibatch training ---------------------------------------------------


def _ce_loss(params, x, y):
    logits = _forward(params, x, jax.nn.relu)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))


def _mse_loss(params, x, y):
    pred = _forward(params, x, jax.nn.relu)
    return jnp.mean(jnp.mean((pred.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=-1))


def _make_step(loss_fn, optimizer):
    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def _problem(case, cfg):
    """(loss_fn, optimizer, params, data(n) -> (x, y)) of a minibatch case."""
    dtype = jnp.dtype(cfg.get("dtype", "float32"))
    if case == "wide":
        sizes = [cfg["width"]] * 5
        data = lambda n, seed=0: common.regression_data(n, sizes[0], sizes[-1], seed)  # noqa: E731
        return _mse_loss, optax.sgd(cfg["lr"]), _tree(common.mlp_params(sizes), dtype), data, dtype
    sizes = cfg["sizes"]
    data = lambda n, seed=0: common.classification_data(n, sizes[0], sizes[-1], seed)  # noqa: E731
    return _ce_loss, optax.adam(cfg["lr"]), _tree(common.mlp_params(sizes)), data, dtype


def minibatch_check(case, cfg):
    """Loss after ``check_steps`` steps on one fixed batch of ``check_batch`` examples."""
    loss_fn, opt, params, data, dtype = _problem(case, cfg)
    x, y = data(cfg["check_batch"], seed=1)
    x = jnp.asarray(x, dtype)
    step = jax.jit(_make_step(loss_fn, opt))
    carry = (params, opt.init(params))
    for _ in range(cfg["check_steps"]):
        carry, _ = step(carry, (x, jnp.asarray(y)))
    return float(loss_fn(carry[0], x, jnp.asarray(y)))


def minibatch(case, cfg):
    """``lax.scan`` over ``steps`` pre-made batches of ``batch`` examples, one compiled call."""
    loss_fn, opt, params, data, dtype = _problem(case, cfg)
    b, steps = cfg["batch"], cfg["steps"]
    x, y = data(b * steps)
    xb = jnp.asarray(x.reshape(steps, b, -1), dtype)
    yb = jnp.asarray(y.reshape((steps, b) + y.shape[1:]))
    step = _make_step(loss_fn, opt)

    def train(carry, xb, yb):  # the carry and the mean loss, as a loop reporting its epoch loss
        carry, losses = jax.lax.scan(step, carry, (xb, yb))
        return carry, jnp.mean(losses)

    train = jax.jit(train)
    carry0 = (params, opt.init(params))
    call = lambda: jax.block_until_ready(train(carry0, xb, yb))  # noqa: E731
    return minibatch_check(case, cfg), common.time_calls(call, call, b * steps, cfg["repeats"], cfg["min_seconds"])


def minibatch_loop(case, cfg):
    """A donated ``jit`` step from a Python loop over batches already separate on the device."""
    loss_fn, opt, params, data, dtype = _problem(case, cfg)
    b, steps = cfg["batch"], cfg["steps"]
    x, y = data(b * steps)
    batches = [(jnp.asarray(xi, dtype), jnp.asarray(yi)) for xi, yi in zip(np.split(x, steps), np.split(y, steps))]
    step = jax.jit(lambda carry, batch: _make_step(loss_fn, opt)(carry, batch)[0], donate_argnums=0)
    state = {"c": (params, opt.init(params))}

    def run():
        c = state["c"]
        for batch in batches:
            c = step(c, batch)
        state["c"] = jax.block_until_ready(c)

    return minibatch_check(case, cfg), common.time_calls(run, run, b * steps, cfg["repeats"], cfg["min_seconds"])


def fit_epoch(cfg):
    """A hand-written epoch: permutation from a threaded key, gather, ``lax.scan`` over the batches."""
    loss_fn, opt, params, data, dtype = _problem("fit-epoch", cfg)
    n, b = cfg["n"], cfg["batch"]
    x, y = map(jnp.asarray, data(n))
    step = _make_step(loss_fn, opt)

    def epoch(carry, key, x, y):
        key, sub = jax.random.split(key)
        perm = jax.random.permutation(sub, n)[: (n // b) * b].reshape(n // b, b)
        carry, losses = jax.lax.scan(step, carry, (x[perm], y[perm]))
        return carry, key, jnp.mean(losses)

    run_epoch = jax.jit(epoch, donate_argnums=(0,))
    state = {"c": (params, opt.init(params)), "k": jax.random.key(0)}

    def run():
        state["c"], state["k"], loss = run_epoch(state["c"], state["k"], x, y)
        float(loss)  # the host reads the epoch's loss, as a training loop does

    return minibatch_check("fit-epoch", cfg), common.time_calls(run, run, n, cfg["repeats"])


def matmul_timer(m, k, n, dtype, repeats, min_seconds=0.2, queued=8) -> common.CallTimer:
    """A timer of a jitted ``(m, k) @ (k, n)`` matmul whose rates are TFLOP/s: each call queues
    ``queued`` matmuls back to back and waits for the last."""
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype) / k
    mm = jax.jit(lambda a, b: a @ b)

    def run():
        for _ in range(queued):
            out = mm(a, b)
        jax.block_until_ready(out)

    return common.time_calls(run, run, queued * 2 * m * k * n / 1e12, repeats, min_seconds)
