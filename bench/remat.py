"""Remat and stacked layers: the memory a training step needs, and how compile time grows with depth.

1. XLA's memory analysis of the compiled gradient of an 8-block ``jn.gpt`` (``temp_size_in_bytes``:
   the activations and other scratch buffers of the step) with ``remat="none"``, ``"dots"`` and
   ``"full"``, and the largest difference of their gradients from the plain one's.
2. The time to compile the gradient of ``jn.repeat(block, n)`` (a transformer block, a scan over
   stacked params) for n = 2 and n = 16, against a Python loop of n blocks (``jn.serial``), medians
   of ``--repeats`` fresh compilations each (interleaved).

    python bench/remat.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxnet as jn  # noqa: E402
from bench import common  # noqa: E402


def gpt_memory(batch: int, layers: int) -> dict:
    x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (batch, 64)), jnp.int32)
    out, grads = {}, {}
    for remat in ("none", "dots", "full"):
        net = jn.gpt(vocab_size=64, context=64, layers=layers, heads=4, dim=128, remat=remat)
        params, _ = net.init(jax.random.key(0))
        loss = jn.make_loss_fn(net, "softmax_cross_entropy")
        step = jax.jit(jax.grad(lambda p, net=net, loss=loss: loss(p, (x, jnp.roll(x, -1, 1)), {})[0]))
        out[remat] = step.lower(params).compile().memory_analysis().temp_size_in_bytes
        grads[remat] = step(params)
    plain = jax.tree.leaves(grads["none"])
    diff = {}
    for r in ("dots", "full"):
        diff[r] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads[r]), plain))
    return {"temp_bytes": out, "max_gradient_difference": diff}


def compile_seconds(n: int, stacked: bool) -> float:
    block = jn.transformer_block(64, 4, 256, causal=True)
    net = jn.repeat(block, n) if stacked else jn.serial(*[block] * n)
    params = net.init(jax.random.key(0))
    x = jnp.ones((8, 32, 64))

    def loss(p, x):
        return jnp.mean(jax.vmap(lambda row: net.apply(p, row))(x) ** 2)

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, x).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    memory = gpt_memory(args.batch, 8)
    t = memory["temp_bytes"]
    for remat in ("none", "dots", "full"):
        print(f"gpt 8 blocks, batch {args.batch}x64, remat={remat}: temp {t[remat] / 2**20:.1f} MiB "
              f"({1 - t[remat] / t['none']:.0%} lower)")  # fmt: skip
    print(f"gradients' largest difference from remat=none: {memory['max_gradient_difference']}")
    seconds: dict = {(n, s): [] for n in (2, 16) for s in (True, False)}
    for _ in range(args.repeats):
        for key in seconds:
            jax.clear_caches()
            seconds[key].append(compile_seconds(*key))
    medians = {f"{'repeat' if s else 'serial'}-{n}": statistics.median(v) for (n, s), v in seconds.items()}
    for name, value in medians.items():
        print(f"compile {name}: {value:.2f} s (median of {args.repeats})")
    print(f"repeat 16 / repeat 2: {medians['repeat-16'] / medians['repeat-2']:.2f}x; "
          f"serial 16 / serial 2: {medians['serial-16'] / medians['serial-2']:.2f}x")  # fmt: skip
    result = {
        "gpt_memory": memory,
        "compile_seconds": medians,
        "repeats": args.repeats,
    }
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
