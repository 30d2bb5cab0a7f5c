"""Convolutional and transformer cases: jaxnet against hand-written JAX, Flax NNX, Equinox and PyTorch.

cnn: a small CNN on 28x28x1 images (conv 3x3 1->16, ReLU, max pool 2, conv 3x3 16->32, ReLU, max
pool 2, dense 1568->10), Adam 1e-3, batches of 128 and 1024. Every implementation starts from the
same weights and trains on the same batches in the same order; its loss after the first steps is
checked against hand-written JAX's. One repeat is one epoch of ``steps`` batches:

- ``raw-jax-loop``: a donated ``jax.jit`` step with ``lax.conv`` called from a Python loop (the
  hand-written baseline the ratios are taken against);
- ``raw-jax-scan``: the same step in ``lax.scan`` over the epoch, one call (what ``fit`` compiles);
- ``jaxnet``: ``fit(shuffle=False)`` of ``serial(conv2d, ...)``, the seconds it reports per epoch;
- ``flax-nnx``, ``equinox``: their idiomatic jitted step from a Python loop; ``torch``: eager.

transformer: ``transformer_block(128, 4, 256)`` on sequences of 64 tokens (mean-pooled, dense to
10 classes), against the same block hand-written in JAX in ``lax.scan``.

Repeats are interleaved (the order reversed every round); reported: median seconds per epoch and
ratios of medians against the baseline.

    python bench/cnn.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxnet  # noqa: E402
from jaxnet import layers as L  # noqa: E402

LR, CHECK_STEPS = 1e-3, 3
DN = ("NHWC", "HWIO", "NHWC")


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def jaxnet_cnn():
    return L.serial(
        L.conv2d(1, 16, 3, "relu"), L.max_pool(2), L.conv2d(16, 32, 3, "relu"), L.max_pool(2), L.flatten(),
        L.dense(7 * 7 * 32, 10),
    )  # fmt: skip


def hand_apply(p, x):
    """The CNN on a batch, written with lax directly."""
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p[0]["w"], (1, 1), "SAME", dimension_numbers=DN) + p[0]["b"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, p[2]["w"], (1, 1), "SAME", dimension_numbers=DN) + p[2]["b"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(x.shape[0], -1) @ p[5]["w"] + p[5]["b"]


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def raw_jax(params, xb, yb, scan):
    opt = optax.adam(LR)

    def step(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(lambda p: _ce(hand_apply(p, batch[0]), batch[1]))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    carry = (params, opt.init(params))
    if scan:
        run = jax.jit(lambda c, xb, yb: jax.lax.scan(step, c, (xb, yb)))
        return lambda: jax.block_until_ready(run(carry, xb, yb)[1]), run(carry, xb, yb)[1][:CHECK_STEPS]
    one = jax.jit(step)

    def epoch():
        c, losses = carry, []
        for i in range(len(xb)):
            c, loss = one(c, (xb[i], yb[i]))
            losses.append(loss)
        return jax.block_until_ready(losses)

    return epoch, jnp.stack(epoch()[:CHECK_STEPS])


def jaxnet_fit(params, xb, yb, repeats):
    """fit's own per-epoch seconds (after the first epoch, which compiles) and its first losses."""
    model, b = jaxnet_cnn(), xb.shape[1]
    x, y = xb.reshape(-1, 28, 28, 1), yb.reshape(-1)
    options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(LR), batch_size=b, key=jax.random.key(0),
                   shuffle=False)  # fmt: skip
    first = jaxnet.init_state(params, optax.adam(LR), jax.random.key(0))
    update = jax.jit(jaxnet.make_update(model, "softmax_cross_entropy", optax.adam(LR)))
    losses = []
    for i in range(CHECK_STEPS):  # the per-step losses of the same steps, for the check
        first, m = update(first, (x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]))
        losses.append(m["loss"])
    result = jaxnet.fit(model, params, x, y, epochs=repeats + 1, **options)
    return [r["seconds"] for r in result.history[1:]], jnp.stack(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="128,1024")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    from bench import cnn_peers

    rows, env = [], _environment()
    print(f"# {env['date']}, {env['device']}, jax {env['jax']}", flush=True)
    for b in (int(v) for v in args.batches.split(",")):
        steps = max(CHECK_STEPS, 1024 // b) if jax.default_backend() == "cpu" else 50
        x, y = data(b * steps)
        xb, yb = x.reshape(steps, b, 28, 28, 1), y.reshape(steps, b)
        params = jaxnet_cnn().init(jax.random.key(0))
        timers = {
            "raw-jax-loop": raw_jax(params, jnp.asarray(xb), jnp.asarray(yb), scan=False),
            "raw-jax-scan": raw_jax(params, jnp.asarray(xb), jnp.asarray(yb), scan=True),
            **cnn_peers.peers(params, xb, yb, LR, CHECK_STEPS),
        }
        fit_seconds, fit_losses = jaxnet_fit(params, xb, yb, args.repeats)
        rows += _report(_measure(f"cnn-b{b}", timers, fit_seconds, fit_losses, args.repeats, b * steps))
    rows += _report(_transformer(args.repeats))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def _report(rows):
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _measure(case, timers, fit_seconds, fit_losses, repeats, examples):
    reference = np.asarray(timers["raw-jax-loop"][1])
    seconds = {name: [] for name in timers}
    for r in range(repeats):  # interleaved, the order reversed every round
        for name in list(timers)[:: -1 if r % 2 else 1]:
            start = time.perf_counter()
            timers[name][0]()
            seconds[name].append(time.perf_counter() - start)
    seconds["jaxnet"] = fit_seconds
    checks = {name: np.asarray(t[1]) for name, t in timers.items()} | {"jaxnet": np.asarray(fit_losses)}
    base = statistics.median(seconds["raw-jax-loop"])
    out = []
    for name, values in seconds.items():
        median = statistics.median(values)
        close = bool(np.allclose(checks[name], reference, rtol=2e-3, atol=1e-4))
        row = dict(case=case, impl=name, median_s=median, examples_per_s=examples / median)
        row.update(vs_raw_jax_loop=base / median, loss_check=close, first_losses=checks[name].tolist())
        out.append(row)
    return out


def _transformer(repeats, batch=64, length=64, dim=128, steps=8):
    from bench import cnn_peers

    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, batch, length, dim)).astype(np.float32)
    y = rng.integers(0, 10, (steps, batch)).astype(np.int32)
    block = jaxnet.serial(L.transformer_block(dim, 4, 256), L.global_avg_pool(), L.dense(dim, 10))
    params = block.init(jax.random.key(0))
    opt = optax.adam(LR)
    ours = jax.jit(jaxnet.make_epoch(jaxnet.make_update(block, "softmax_cross_entropy", opt), steps * batch, batch,
                                     shuffle=False))  # fmt: skip
    state = jaxnet.init_state(params, opt, jax.random.key(0))
    xs, ys = jnp.asarray(x.reshape(-1, length, dim)), jnp.asarray(y.reshape(-1))
    hand = cnn_peers.hand_transformer_epoch(params, jnp.asarray(x), jnp.asarray(y), opt)
    timers = {
        "raw-jax-scan": (hand, hand()),
        "jaxnet-epoch": (lambda: jax.block_until_ready(ours(state, xs, ys)[1]["loss"]), ours(state, xs, ys)[1]["loss"]),
    }
    seconds = {name: [] for name in timers}
    for r in range(repeats):
        for name in list(timers)[:: -1 if r % 2 else 1]:
            start = time.perf_counter()
            timers[name][0]()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["raw-jax-scan"])
    ref = float(timers["raw-jax-scan"][1])
    rows = []
    for name, values in seconds.items():
        median, loss = statistics.median(values), float(timers[name][1])
        row = dict(case="transformer-block", impl=name, median_s=median, examples_per_s=steps * batch / median)
        row.update(vs_raw_jax_scan=base / median, loss_check=math.isclose(loss, ref, rel_tol=1e-3), epoch_loss=loss)
        rows.append(row)
    return rows


def _environment():
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores",
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
