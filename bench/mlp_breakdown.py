"""Where an mlp784 training step's time goes: each of its matmuls alone, then the step built up.

Usage (from the repository root): python bench/mlp_breakdown.py [--batch 1024] [--steps 8] [--rounds 7]

Prints, as TFLOP/s and as a fraction of the best forward matmul measured in the same run:
- every matmul of one training step of the 784-512-512-10 MLP alone (the forward products, the
  weight gradients ``dW = h^T dy`` that contract over the batch, the input gradients ``dx = dy W^T``);
- the step built up in one ``jit`` + ``lax.scan`` over ``--steps`` batches: the forward pass alone,
  forward and backward (gradients only), then with an SGD and with an Adam update.
FLOPs are those executed (no gradient with respect to the inputs). Rounds are interleaved, medians.
This is the measurement behind bench/run.py's "executed FLOP/s / matmul peak" for mlp784.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench import common  # noqa: E402
from bench.impls import raw_jax  # noqa: E402

SIZES = [784, 512, 512, 10]


def _matmuls(batch):
    """name -> (function, lhs shape, rhs shape, FLOPs) for every matmul of one training step."""
    out = {}
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        out[f"forward  h@W    ({batch}x{a})@({a}x{b})"] = (
            lambda h, w: h @ w,
            (batch, a),
            (a, b),
            2 * batch * a * b,
        )
        out[f"weights  h^T@dy ({a}x{batch})@({batch}x{b})"] = (
            lambda h, d: h.T @ d,
            (batch, a),
            (batch, b),
            2 * batch * a * b,
        )
        if a != SIZES[0]:  # no gradient with respect to the inputs
            out[f"inputs   dy@W^T ({batch}x{b})@({b}x{a})"] = (
                lambda d, w: d @ w.T,
                (batch, b),
                (a, b),
                2 * batch * a * b,
            )
    return out


def _steps(batch, steps):
    """name -> (jitted function of (params, opt_state, xb, yb), optimizer or None, FLOPs per call)."""
    weights = common.num_weights(SIZES)
    executed = (6 * weights - 2 * SIZES[0] * SIZES[1]) * batch * steps

    def forward(p, s, xb, yb):
        return jax.lax.scan(lambda c, b: (c + raw_jax._ce_loss(p, *b), None), 0.0, (xb, yb))[0]

    def grads(p, s, xb, yb):
        def step(acc, b):
            return jax.tree.map(jnp.add, acc, jax.grad(raw_jax._ce_loss)(p, *b)), None

        return jax.lax.scan(step, p, (xb, yb))[0]

    def trainer(opt):
        step = raw_jax._make_step(raw_jax._ce_loss, opt)
        return lambda p, s, xb, yb: jax.lax.scan(step, (p, s), (xb, yb))[0]

    return {
        "forward only": (jax.jit(forward), None, 2 * weights * batch * steps),
        "forward + backward": (jax.jit(grads), None, executed),
        "+ SGD update": (jax.jit(trainer(optax.sgd(1e-3))), optax.sgd(1e-3), executed),
        "+ Adam update (the mlp784 case)": (jax.jit(trainer(optax.adam(1e-3))), optax.adam(1e-3), executed),
    }


def _time(call, min_seconds=0.05):
    start = time.perf_counter()
    jax.block_until_ready(call())
    once = time.perf_counter() - start
    calls = max(1, int(min_seconds / max(once, 1e-9)))
    start = time.perf_counter()
    for _ in range(calls):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    b, n = args.batch, args.steps

    params = jax.tree.map(jnp.asarray, common.mlp_params(SIZES))
    x, y = common.classification_data(b * n, SIZES[0], SIZES[-1])
    xb, yb = jnp.asarray(x).reshape(n, b, -1), jnp.asarray(y).reshape(n, b)
    calls, flops = {}, {}
    for name, (fn, lhs, rhs, fl) in _matmuls(b).items():
        jitted, l, r = jax.jit(fn), jnp.ones(lhs), jnp.ones(rhs) / rhs[0]
        calls[name], flops[name] = (lambda f=jitted, l=l, r=r: f(l, r)), fl
    for name, (fn, opt, fl) in _steps(b, n).items():
        state = opt.init(params) if opt else None
        calls[name], flops[name] = (lambda f=fn, s=state: f(params, s, xb, yb)), fl
    for call in calls.values():  # compile everything first
        jax.block_until_ready(call())

    seconds = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            seconds[name].append(_time(call))
    rate = {name: flops[name] / statistics.median(s) / 1e12 for name, s in seconds.items()}
    peak = max(v for k, v in rate.items() if k.startswith("forward  "))
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {b}, {n} steps per call, "
        f"{args.rounds} interleaved rounds; fractions of the best forward matmul ({peak:.3f} TFLOP/s)"
    )
    for name, v in rate.items():
        print(f"  {name:42s} {v:7.3f} TFLOP/s  {v / peak:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
