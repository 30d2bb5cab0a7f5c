"""Equinox: an ``eqx.nn`` model, optax, and one ``eqx.filter_jit`` step called from a Python loop,
as in Equinox's own training examples."""

from __future__ import annotations

from bench import common

try:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as e:  # pragma: no cover - depends on the environment
    eqx = None
    _IMPORT_ERROR = str(e)


def _require():
    if eqx is None:
        raise common.Skip(f"equinox not importable ({_IMPORT_ERROR}); pip install -e '.[bench]'")


def _mlp(params, activation, final_activation):
    sizes = [params[0]["w"].shape[0]] + [p["w"].shape[1] for p in params]
    model = eqx.nn.MLP(
        sizes[0],
        sizes[-1],
        sizes[1],
        len(params) - 1,
        activation=activation,
        final_activation=final_activation,
        key=jax.random.key(0),
    )
    for i, p in enumerate(params):
        model = eqx.tree_at(
            lambda m: (m.layers[i].weight, m.layers[i].bias),
            model,
            (jnp.asarray(p["w"].T), jnp.asarray(p["b"])),
        )
    return model


def _make_step(loss_fn, optim):
    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def _run(step, model, optim, batches):
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    for x, y in batches:
        model, opt_state, loss = step(model, opt_state, x, y)
    return jax.block_until_ready(model)


def _seed_loss(model, x, t):
    return 0.5 * jnp.sum((model(x) - t) ** 2)


def seed_sgd(cfg):
    _require()
    optim = optax.sgd(common.SEED_LR)
    step = _make_step(_seed_loss, optim)
    x0, t0 = jnp.asarray(common.SEED_X), jnp.asarray(common.SEED_T)
    model = _mlp(common.seed_params(), jax.nn.sigmoid, jax.nn.sigmoid)
    model = _run(step, model, optim, [(x0, t0)] * cfg["check_steps"])
    check = float(_seed_loss(model, x0, t0))
    xs, ts = common.seed_stream(cfg["loop_steps"])
    batches = [(jnp.asarray(x), jnp.asarray(t)) for x, t in zip(xs, ts)]
    model0 = _mlp(common.seed_params(), jax.nn.sigmoid, jax.nn.sigmoid)
    run = lambda: _run(step, model0, optim, batches)  # noqa: E731
    return check, common.time_calls(run, run, len(batches), cfg["repeats"])


def _ce_loss(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def minibatch(case, cfg):
    _require()
    if case == "wide":
        raise common.Skip("not written for this case (matmul-bound: the same XLA matmuls as raw JAX)")
    sizes = cfg["sizes"]
    optim = optax.adam(cfg["lr"])
    step = _make_step(_ce_loss, optim)
    x, y = common.classification_data(cfg["check_batch"], sizes[0], sizes[-1], 1)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = _run(step, _mlp(common.mlp_params(sizes), jax.nn.relu, lambda v: v), optim, [(x, y)] * cfg["check_steps"])
    check = float(_ce_loss(model, x, y))
    b, steps = cfg["batch"], cfg["steps"]
    x, y = common.classification_data(b * steps, sizes[0], sizes[-1], 0)
    batches = [(jnp.asarray(x[i * b : (i + 1) * b]), jnp.asarray(y[i * b : (i + 1) * b])) for i in range(steps)]
    model0 = _mlp(common.mlp_params(sizes), jax.nn.relu, lambda v: v)
    run = lambda: _run(step, model0, optim, batches)  # noqa: E731
    return check, common.time_calls(run, run, b * steps, cfg["repeats"], cfg["min_seconds"])
