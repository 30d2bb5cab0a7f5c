"""The peers of ``bench/cnn.py``: the same CNN in Flax NNX, Equinox and PyTorch (from the same
weights), and the transformer block hand-written in JAX. Each returns ``(run_epoch, first_losses)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _skip(name, error):
    def fail():
        raise RuntimeError(f"{name} unavailable: {error}")

    return fail, np.full(3, np.nan)


def peers(params, xb, yb, lr, check_steps):
    """``{name: (run_epoch, first check_steps losses)}`` for each library that imports."""
    out = {}
    for name, make in (("flax-nnx", _flax), ("equinox", _equinox), ("torch", _torch)):
        try:
            out[name] = make(params, xb, yb, lr, check_steps)
        except ImportError as e:
            print(f"# {name} skipped: {e}")
    return out


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _loop(step, carry, xb, yb, check_steps):
    def epoch():
        c, losses = carry, []
        for i in range(len(xb)):
            c, loss = step(c, xb[i], yb[i])
            losses.append(loss)
        return jax.block_until_ready(losses)

    return epoch, np.asarray([float(v) for v in epoch()[:check_steps]])


def _flax(params, xb, yb, lr, check_steps):
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
            self.c2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
            self.out = nnx.Linear(7 * 7 * 32, 10, rngs=rngs)

        def __call__(self, x):
            h = nnx.max_pool(jax.nn.relu(self.c1(x)), (2, 2), (2, 2))
            h = nnx.max_pool(jax.nn.relu(self.c2(h)), (2, 2), (2, 2))
            return self.out(h.reshape(x.shape[0], -1))

    model = CNN(nnx.Rngs(0))
    for layer, p in ((model.c1, params[0]), (model.c2, params[2]), (model.out, params[5])):
        layer.kernel.value, layer.bias.value = jnp.asarray(p["w"]), jnp.asarray(p["b"])
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: _ce(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    bound = nnx.cached_partial(step, model, optimizer)
    xs, ys = jnp.asarray(xb), jnp.asarray(yb)
    return _loop(lambda c, x, y: (c, bound(x, y)), None, xs, ys, check_steps)


def _equinox(params, xb, yb, lr, check_steps):
    import equinox as eqx

    class CNN(eqx.Module):
        c1: eqx.nn.Conv2d
        c2: eqx.nn.Conv2d
        out: eqx.nn.Linear

        def __init__(self):
            keys = jax.random.split(jax.random.key(0), 3)
            c1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=keys[0])
            c2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=keys[1])
            out = eqx.nn.Linear(7 * 7 * 32, 10, key=keys[2])
            to_oihw = lambda w: jnp.transpose(jnp.asarray(w), (3, 2, 0, 1))  # noqa: E731
            c1 = eqx.tree_at(
                lambda m: (m.weight, m.bias), c1, (to_oihw(params[0]["w"]), jnp.asarray(params[0]["b"])[:, None, None])
            )
            c2 = eqx.tree_at(
                lambda m: (m.weight, m.bias), c2, (to_oihw(params[2]["w"]), jnp.asarray(params[2]["b"])[:, None, None])
            )
            self.c1, self.c2 = c1, c2
            self.out = eqx.tree_at(
                lambda m: (m.weight, m.bias), out, (jnp.asarray(params[5]["w"]).T, jnp.asarray(params[5]["b"]))
            )

        def __call__(self, x):  # one example, (1, 28, 28)
            pool = eqx.nn.MaxPool2d(2, 2)
            h = pool(jax.nn.relu(self.c2(pool(jax.nn.relu(self.c1(x))))))
            return self.out(jnp.transpose(h, (1, 2, 0)).reshape(-1))  # flattened as jaxnet's (h, w, c)

    opt = optax.adam(lr)
    model = CNN()

    @eqx.filter_jit(donate="all-except-first")
    def step(x, carry, y):
        model, state = carry
        loss, grads = eqx.filter_value_and_grad(lambda m: _ce(jax.vmap(m)(x), y))(model)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), state), loss

    xs, ys = jnp.asarray(np.transpose(xb, (0, 1, 4, 2, 3))), jnp.asarray(yb)
    carry = (model, opt.init(eqx.filter(model, eqx.is_array)))
    copy = lambda: jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a, carry)  # noqa: E731

    def epoch():
        c, losses = copy(), []
        for i in range(len(xs)):
            c, loss = step(xs[i], c, ys[i])
            losses.append(loss)
        return jax.block_until_ready(losses)

    return epoch, np.asarray([float(v) for v in epoch()[:check_steps]])


def _torch(params, xb, yb, lr, check_steps):
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    c1, c2, out = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(1568, 10)
    with torch.no_grad():
        for layer, p in ((c1, params[0]), (c2, params[2])):
            layer.weight.copy_(torch.from_numpy(np.transpose(np.asarray(p["w"]), (3, 2, 0, 1)).copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(p["b"]).copy()))
        out.weight.copy_(torch.from_numpy(np.asarray(params[5]["w"]).T.copy()))
        out.bias.copy_(torch.from_numpy(np.asarray(params[5]["b"]).copy()))
    modules = torch.nn.ModuleList([c1, c2, out])
    initial = {k: v.clone() for k, v in modules.state_dict().items()}
    xs = torch.from_numpy(np.transpose(xb, (0, 1, 4, 2, 3)).copy())
    ys = torch.from_numpy(yb.astype(np.int64))
    pool = torch.nn.functional.max_pool2d

    def forward(x):
        h = pool(torch.relu(c2(pool(torch.relu(c1(x)), 2))), 2)
        return out(h.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    def epoch():
        modules.load_state_dict(initial)
        opt = torch.optim.Adam(modules.parameters(), lr=lr)
        losses = []
        for i in range(len(xs)):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(forward(xs[i]), ys[i])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses

    return epoch, np.asarray([float(v) for v in epoch()[:check_steps]])


def hand_transformer_epoch(params, xb, yb, opt):
    """The block of ``transformer_block`` + mean pool + dense, written out by hand, in one
    ``lax.scan`` over the epoch; returns ``run() -> mean loss``."""

    def norm(p, x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]

    def attention(p, x, heads=4):
        b, t, d = x.shape
        q, k, v = ((x @ p[n]["w"] + p[n]["b"]).reshape(b, t, heads, d // heads) for n in "qkv")
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d) @ p["o"]["w"] + p["o"]["b"]

    def apply(p, x):
        (ln1, attn), (ln2, up, down) = p[0]
        x = x + attention(attn, norm(ln1, x))
        x = x + jax.nn.gelu(norm(ln2, x) @ up["w"] + up["b"]) @ down["w"] + down["b"]
        return x.mean(1) @ p[2]["w"] + p[2]["b"]

    def step(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(lambda p: _ce(apply(p, batch[0]), batch[1]))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    run = jax.jit(lambda c, xb, yb: jax.lax.scan(step, c, (xb, yb))[1].mean())
    carry = (params, opt.init(params))
    return lambda: jax.block_until_ready(run(carry, xb, yb))
