"""jaxnet's compiled epoch against a hand-written scan on the worked example, timed interleaved.

Usage (from the repository root): python bench/epoch_overhead.py [--steps 200000] [--rounds 41]

Each round times one call of each, back to back, so that a shared machine's drift hits both alike;
the ratio printed is the median of the per-round ratios. Both train the notes' 3-2-2 sigmoid network
online (one example per step, SGD 0.1) on the same stream in order, and must end with the same params
and report the same mean loss. The hand-written scan sums its loss, as jaxnet's epoch does; its
gradient-only form (no loss value at all) is timed too.
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnet  # noqa: E402
from bench import common  # noqa: E402
from bench.impls import raw_jax  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)

    xs, ts = map(jnp.asarray, common.seed_stream(args.steps))
    params = jax.tree.map(jnp.asarray, common.seed_params())
    raw = jax.jit(raw_jax._seed_train)
    raw_noloss = jax.jit(raw_jax._seed_train_untracked)
    opt = optax.sgd(common.SEED_LR)
    update = jaxnet.make_update(jaxnet.mlp([3, 2, 2], "sigmoid", "sigmoid"), "half_sse", opt)
    epoch = jax.jit(jaxnet.make_epoch(update, args.steps, 1, shuffle=False))
    state = jaxnet.init_state(params, opt, jax.random.key(0))

    calls = {
        "hand-written scan": lambda: raw(params, xs, ts),
        "jaxnet make_epoch": lambda: epoch(state, xs, ts),
        "the scan, no loss": lambda: raw_noloss(params, xs, ts),
    }
    (ref, ref_loss), (mine, metrics), _ = (jax.block_until_ready(f()) for f in calls.values())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ref, mine.params)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-4)

    seconds = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            seconds[name].append(time.perf_counter() - start)
    raw_s, epoch_s, noloss_s = seconds.values()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.steps} steps, {args.rounds} rounds")
    for name, s in seconds.items():
        print(f"  {name:18s} {statistics.median(s) / args.steps * 1e9:6.1f} ns/step (median)")
    for name, ref_s in (("hand-written", raw_s), ("hand-written, no loss", noloss_s)):
        print(
            f"  jaxnet / {name} throughput: {statistics.median(r / e for r, e in zip(ref_s, epoch_s)):.3f} "
            "(median of per-round ratios)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
