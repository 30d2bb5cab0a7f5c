"""The cost of checkpointing a fit: asynchronous saves against synchronous ones and none at all.

A GPT whose params and AdamW state take about ``--state-mb`` megabytes trains for ``--steps``
steps in rounds of ``--every`` steps, saving a checkpoint after every round (``Checkpointer(every=1)``):
asynchronously (the default: the state copied on its device, then checksummed and written by a
background thread), synchronously, not at all, or (``zstd``) asynchronously with orbax's default
zstd compression, which jaxnet's writes leave out. Reported, for each (medians of ``--repeats``
interleaved runs), and as overheads over no saves:

- ``steady``: the seconds per step while training goes on, from the end of the first round (which
  compiles) to the end of the last, every save's cost on the training thread and every write's
  competition for the cores included: the step time of a long run;
- ``whole``: the seconds of the whole ``fit`` call per step, which also waits for the last
  asynchronous write at the end (one write, about half a second here, spread over a short run).

    python bench/checkpoint_async.py [--steps 60] [--every 10] [--repeats 3] [--kinds none,async,sync,zstd]
        [--json FILE]
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
from jaxnet import checkpoint  # noqa: E402
from jaxnet.callbacks import Checkpointer  # noqa: E402

plain_writers = checkpoint._writers


def zstd_writers() -> dict:
    """Orbax's default handlers for the state: its arrays compressed with zstd."""
    import orbax.checkpoint as ocp

    return {"state": ocp.PyTreeCheckpointHandler(use_compression=True), "meta": ocp.JsonCheckpointHandler()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--kinds", default="none,async,sync", help="of none, async, sync, zstd; none first")
    parser.add_argument("--json")
    args = parser.parse_args()
    net = jn.gpt(vocab_size=256, context=64, layers=args.layers, heads=8, dim=args.dim)
    params, state = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8 * args.steps, 64)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    state_bytes = 3 * sum(a.nbytes for a in jax.tree.leaves(params))
    folder = Path(tempfile.mkdtemp(prefix="jaxnet-bench-ckpt-"))

    def run(kind: str) -> tuple[float, float]:
        shutil.rmtree(folder / kind, ignore_errors=True)
        ends: list = []  # the end of each round, after its callbacks before this one (the save)
        asynchronous = kind in ("async", "zstd")
        saver = [] if kind == "none" else [Checkpointer(folder / kind, every=1, keep=2, asynchronous=asynchronous)]
        checkpoint._writers = zstd_writers if kind == "zstd" else plain_writers
        start = time.perf_counter()
        jn.fit(
            net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.adamw(1e-3), steps=args.steps,
            eval_every=args.every, batch_size=8, key=jax.random.key(1), model_state=state,
            callbacks=[*saver, lambda *_: ends.append(time.perf_counter())],
        )  # fmt: skip
        whole = (time.perf_counter() - start) / args.steps
        return (ends[-1] - ends[0]) / (args.steps - args.every), whole

    kinds = tuple(args.kinds.split(","))
    if kinds[0] != "none" or not set(kinds) <= {"none", "async", "sync", "zstd"}:
        parser.error("--kinds: none first, then any of async, sync, zstd")
    run("none")  # compile once, outside the timed runs (the cache serves the others)
    seconds: dict = {k: {"steady": [], "whole": []} for k in kinds}
    for i in range(args.repeats):
        for kind in kinds if i % 2 == 0 else reversed(kinds):
            steady, whole = run(kind)
            seconds[kind]["steady"].append(steady)
            seconds[kind]["whole"].append(whole)
    medians = {k: {m: statistics.median(v) for m, v in by.items()} for k, by in seconds.items()}
    print(f"GPT of {sum(a.size for a in jax.tree.leaves(params)):,} params: {state_bytes / 2**20:.0f} MiB of params "
          f"and AdamW state; a save every {args.every} steps; medians of {args.repeats}")  # fmt: skip
    for kind in kinds:
        shown = []
        for m in ("steady", "whole"):
            over = medians[kind][m] / medians["none"][m] - 1
            shown.append(f"{m} {medians[kind][m] * 1e3:.1f} ms per step ({over:+.1%} over none)")
        print(f"{kind:>5}: " + ", ".join(shown))
    shutil.rmtree(folder, ignore_errors=True)
    result = {
        "seconds_per_step": medians,
        "all": seconds,
        "state_bytes": state_bytes,
        "every": args.every,
        "steps": args.steps,
    }
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
