"""Flax NNX: ``nnx.Linear`` modules, ``nnx.Optimizer``, an ``nnx.jit`` step bound with ``nnx.cached_partial``
(the NNX performance guide's way to cut Python overhead), called from a Python loop."""

from __future__ import annotations

from bench import common

try:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
except ImportError as e:  # pragma: no cover - depends on the environment
    nnx = None
    _IMPORT_ERROR = str(e)


def _require():
    if nnx is None:
        raise common.Skip(f"flax not importable ({_IMPORT_ERROR}); pip install -e '.[bench]'")


if nnx is not None:

    class MLP(nnx.Module):
        def __init__(self, params, activation, final_activation, rngs):
            self.layers = nnx.List([nnx.Linear(*p["w"].shape, rngs=rngs) for p in params])
            for layer, p in zip(self.layers, params):
                layer.kernel.value = jnp.asarray(p["w"])
                layer.bias.value = jnp.asarray(p["b"])
            self.activation, self.final_activation = activation, final_activation

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                x = self.activation(x) if i < len(self.layers) - 1 else self.final_activation(x)
            return x


def _train(params, act, final, tx, loss_fn, check_batches, batches, units, cfg):
    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    def fresh():
        model = MLP(params, act, final, nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = fresh()
    step = nnx.cached_partial(train_step, model, optimizer)
    for x, y in check_batches:
        step(x, y)
    check = float(loss_fn(model, *check_batches[0]))

    model, optimizer = fresh()
    step = nnx.cached_partial(train_step, model, optimizer)

    def run():
        for x, y in batches:
            loss = step(x, y)
        jax.block_until_ready(loss)

    return check, common.time_calls(run, run, units, cfg["repeats"], cfg.get("min_seconds", 0.0))


def _seed_loss(model, x, t):
    return 0.5 * jnp.sum((model(x) - t) ** 2)


def seed_sgd(cfg):
    _require()
    x0, t0 = jnp.asarray(common.SEED_X), jnp.asarray(common.SEED_T)
    xs, ts = common.seed_stream(cfg["loop_steps"])
    batches = [(jnp.asarray(x), jnp.asarray(t)) for x, t in zip(xs, ts)]
    return _train(
        common.seed_params(),
        jax.nn.sigmoid,
        jax.nn.sigmoid,
        optax.sgd(common.SEED_LR),
        _seed_loss,
        [(x0, t0)] * cfg["check_steps"],
        batches,
        len(batches),
        dict(cfg, min_seconds=0.0),
    )


def _ce_loss(model, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))


def minibatch(case, cfg):
    _require()
    if case == "wide":
        raise common.Skip("not written for this case (matmul-bound: the same XLA matmuls as raw JAX)")
    sizes = cfg["sizes"]
    x, y = common.classification_data(cfg["check_batch"], sizes[0], sizes[-1], 1)
    check_batches = [(jnp.asarray(x), jnp.asarray(y))] * cfg["check_steps"]
    b, steps = cfg["batch"], cfg["steps"]
    x, y = common.classification_data(b * steps, sizes[0], sizes[-1], 0)
    batches = [(jnp.asarray(x[i * b : (i + 1) * b]), jnp.asarray(y[i * b : (i + 1) * b])) for i in range(steps)]
    return _train(
        common.mlp_params(sizes),
        jax.nn.relu,
        lambda v: v,
        optax.adam(cfg["lr"]),
        _ce_loss,
        check_batches,
        batches,
        b * steps,
        cfg,
    )
