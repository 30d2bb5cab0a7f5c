"""The cost of logging steps: ``fit(log_every_steps=N)`` against the same fit logging none.

mlp784 (784-512-512-10, ReLU, softmax cross-entropy) on ``--rows`` random examples, batches of
``--batch``, shuffled every epoch, all through ``jaxnet.fit``'s public API:

- ``plain``: ``optax.adam(1e-3)``, no logging: each epoch one compiled call (the baseline);
- ``injected``: ``optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`` (what the CLI builds,
  so that the applied rate can be logged), no logging;
- ``log every N``: the injected optimizer, with ``log_every_steps=N`` and a callback that keeps
  every logged step (loss, gradient norm, learning rate): the epoch runs in compiled chunks of N
  steps, the host reads the logged values between two chunks;
- ``train metrics``: no logging, ``metrics=["accuracy", "f1"]`` summed over the training steps.

Each repeat is one epoch (the epochs' own timing, see ``common.EpochTimer``), repeats interleaved
with the order reversed every round. Reported: median examples per second and the median over
rounds of each one's throughput relative to ``plain`` in the same round.

    python bench/step_logging.py [--rows 32768] [--batch 128] [--every 100,10] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from bench import common  # noqa: E402

SIZES = [784, 512, 512, 10]


def timer(x, y, batch: int, repeats: int, optimizer, **options) -> common.EpochTimer:
    net = jn.mlp(SIZES, activation="relu")
    params = jax.tree.map(jax.numpy.asarray, common.mlp_params(SIZES))
    steps: list[dict] = []

    class Keep:
        def __init__(self, after_epoch):
            self.after_epoch = after_epoch

        def __call__(self, state, record):
            return self.after_epoch(record["seconds"])

        def on_step(self, state, record):
            steps.append(record)

    def train(after_epoch):
        jn.fit(
            net,
            params,
            x,
            y,
            loss="softmax_cross_entropy",
            optimizer=optimizer,
            epochs=10_000,
            batch_size=batch,
            key=jax.random.key(0),
            callbacks=[Keep(after_epoch)],
            **options,
        )

    return common.EpochTimer(train, units=len(x), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", default="100,10")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    x, y = common.classification_data(args.rows, SIZES[0], SIZES[-1])
    adam = optax.adam(1e-3)
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    b, r = args.batch, args.repeats
    impls = {"plain": timer(x, y, b, r, adam), "injected": timer(x, y, b, r, injected)}
    for every in (int(e) for e in args.every.split(",")):
        impls[f"log every {every}"] = timer(x, y, b, r, injected, log_every_steps=every)
    impls["train metrics"] = timer(x, y, b, r, adam, metrics=["accuracy", "f1"])
    seconds = common.interleaved(impls, args.repeats)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "rows": args.rows,
        "batch": b,
        "steps_per_epoch": -(-args.rows // b),
        "impls": {},
    }
    lines = [
        f"{results['date']}  {results['machine']}  jax {jax.__version__}  mlp784, {args.rows} rows, "
        f"batch {b} ({results['steps_per_epoch']} steps per epoch), {args.repeats} interleaved epochs"
    ]
    for name, times in seconds.items():
        ratio = statistics.median(p / t for p, t in zip(seconds["plain"], times))
        rate = args.rows / statistics.median(times)
        results["impls"][name] = {"seconds": times, "examples_per_second": rate, "vs_plain": ratio}
        lines.append(
            f"  {name:14s} {rate:10,.0f} examples/s  {ratio:5.3f}x plain  (cost {(1 / ratio - 1) * 100:+.1f}%)"
        )
    common.publish("\n".join(lines), results, args.json)


if __name__ == "__main__":
    main()
