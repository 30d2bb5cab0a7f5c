"""Streaming against resident data: the same fit, its data on the device or fed from the host.

mlp784 (784-512-512-10, ReLU, Adam 1e-3, softmax cross-entropy) on ``--rows`` random examples,
shuffled every epoch, batches of 128 and 1024. Every implementation is ``jaxnet.fit`` through its
public API; only where the data lives differs:

- ``resident``: numpy arrays, placed on the device whole; the epoch is one compiled call (the baseline);
- ``host``: the same arrays as a source (``jaxnet.Indexed(x, y)``): each epoch is read in the keyed
  order in chunks of ``CHUNK_BYTES`` (32 MiB), stacked and transferred by the prefetch thread while
  the device runs the chunk before;
- ``memmap``: x.npy and y.npy memory-mapped from a file (in the page cache after the first epoch);
- ``iterable``: a list of 1,024-row blocks (a sequential source: re-cut into batches in order).

Each repeat is one epoch (the epochs' own timing; the loops pause between epochs while the others
run, see ``common.EpochTimer``), repeats interleaved with the order reversed every round. Reported:
median examples per second and the median over rounds of each one's throughput relative to
``resident`` in the same round. ``host read`` is the host alone reading an epoch's chunks (no
device work): when it is below the resident epoch's time, the transfers can hide behind compute.

    python bench/stream.py [--rows 32768] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from bench import common  # noqa: E402
from jaxnet import _feed as feed  # noqa: E402

SIZES = [784, 512, 512, 10]


def timer(data: tuple, batch: int, repeats: int, rows: int) -> common.EpochTimer:
    net = jn.mlp(SIZES, activation="relu")
    params = jax.tree.map(jax.numpy.asarray, common.mlp_params(SIZES))

    def train(after_epoch):
        def callback(state, record):
            return after_epoch(record["seconds"])

        jn.fit(
            net,
            params,
            *data,
            loss="softmax_cross_entropy",
            optimizer=optax.adam(1e-3),
            epochs=10_000,
            batch_size=batch,
            key=jax.random.key(0),
            callbacks=[callback],
        )

    return common.EpochTimer(train, units=rows, repeats=repeats)


def host_read_seconds(x, y, batch: int) -> float:
    """Seconds the host takes to read, gather and stack one epoch's chunks (median of 3)."""
    source = jn.Indexed(x, y)
    steps = feed.chunk_steps(source.spec, batch)
    layout = feed.StreamLayout(batch, steps, False, True, 0, feed.Share(0, batch, batch))
    times = []
    for i in range(3):
        start = time.perf_counter()
        chunks, _ = feed.epoch_chunks(source, layout, jax.random.key(i), 0)
        for _ in chunks:
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="128,1024")
    parser.add_argument("--json")
    args = parser.parse_args()
    x, y = common.classification_data(args.rows, SIZES[0], SIZES[-1])
    folder = Path(tempfile.mkdtemp(prefix="jaxnet-bench-stream-"))
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    xm, ym = (np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("x", "y"))
    blocks = [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, len(x), 1024)]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "rows": args.rows,
        "cases": {},
    }
    lines = [f"{results['date']}  {results['machine']}  jax {jax.__version__}  mlp784, {args.rows} rows"]
    for batch in (int(b) for b in args.batches.split(",")):
        impls = {
            "resident": timer((x, y), batch, args.repeats, args.rows),
            "host": timer((jn.Indexed(x, y), None), batch, args.repeats, args.rows),
            "memmap": timer((xm, ym), batch, args.repeats, args.rows),
            "iterable": timer((blocks, None), batch, args.repeats, args.rows),
        }
        seconds = common.interleaved(impls, args.repeats)
        read = host_read_seconds(x, y, batch)
        case = {"host_read_seconds": read}
        lines.append(f"batch {batch}: host read of an epoch's chunks {read * 1e3:.0f} ms")
        for name, times in seconds.items():
            ratio = statistics.median(b / t for b, t in zip(seconds["resident"], times))
            rate = args.rows / statistics.median(times)
            case[name] = {"seconds": times, "examples_per_second": rate, "vs_resident": ratio}
            epoch = statistics.median(times)
            lines.append(f"  {name:9s} {rate:10,.0f} examples/s  {ratio:5.2f}x resident  (median epoch {epoch:.3f} s)")
        results["cases"][f"mlp784-b{batch}"] = case
    shutil.rmtree(folder, ignore_errors=True)
    common.publish("\n".join(lines), results, args.json)


if __name__ == "__main__":
    main()
