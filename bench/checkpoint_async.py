"""The cost of checkpointing a fit: asynchronous saves against synchronous ones and none at all.

A GPT whose params and AdamW state take about ``--state-mb`` megabytes trains for ``--steps``
steps in rounds of ``--every`` steps, saving a checkpoint after every round (``Checkpointer(every=1)``):
asynchronously (the default: the state copied to the host, then written by a background thread),
synchronously, or not at all. Reported: seconds per step of each (medians of ``--repeats``
interleaved runs) and the overhead of each kind of save over no saves.

    python bench/checkpoint_async.py [--steps 60] [--every 10] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from bench import common  # noqa: E402
from jaxnet.callbacks import Checkpointer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    net = jn.gpt(vocab_size=256, context=64, layers=args.layers, heads=8, dim=args.dim)
    params, state = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8 * args.steps, 64)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    state_bytes = 3 * sum(a.nbytes for a in jax.tree.leaves(params))
    folder = Path(tempfile.mkdtemp(prefix="jaxnet-bench-ckpt-"))

    def run(kind: str) -> float:
        shutil.rmtree(folder / kind, ignore_errors=True)
        saver = [] if kind == "none" else [Checkpointer(folder / kind, every=1, keep=2, asynchronous=kind == "async")]
        start = time.perf_counter()
        jn.fit(
            net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.adamw(1e-3), steps=args.steps,
            eval_every=args.every, batch_size=8, key=jax.random.key(1), model_state=state, callbacks=saver,
        )  # fmt: skip
        return (time.perf_counter() - start) / args.steps

    kinds = ("none", "async", "sync")
    run("none")  # compile once, outside the timed runs (the cache serves the others)
    seconds: dict = {k: [] for k in kinds}
    for i in range(args.repeats):
        for kind in kinds if i % 2 == 0 else reversed(kinds):
            seconds[kind].append(run(kind))
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"GPT of {sum(a.size for a in jax.tree.leaves(params)):,} params: {state_bytes / 2**20:.0f} MiB of params "
          f"and AdamW state; a save every {args.every} steps")  # fmt: skip
    for kind in kinds:
        over = medians[kind] / medians["none"] - 1
        print(f"{kind:>5}: {medians[kind] * 1e3:.1f} ms per step (median of {args.repeats}), {over:+.1%} over none")
    shutil.rmtree(folder, ignore_errors=True)
    result = {
        "seconds_per_step": medians,
        "all": seconds,
        "state_bytes": state_bytes,
        "every": args.every,
    }
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
