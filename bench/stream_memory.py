"""Training on data larger than memory wants: `jaxnet train --data DIR` on a >= 3 GB memory-mapped x.npy.

Writes DIR/x.npy (float32, ``--rows`` x 784, 3.1 GB at the default million rows) and DIR/y.npy
(10 classes from a fixed random linear teacher, so the run has something to learn) chunk by chunk,
runs one epoch of ``jaxnet train --data DIR`` in a child process, and reports the child's peak
resident memory (``ru_maxrss``), its wall time and its figures; the data is deleted afterwards.
The run reads x three times: a check that every value is finite, the standardization's moments,
and the epoch (plus the held-out rows' validation and test).

    python bench/stream_memory.py [--rows 1000000] [--dir /tmp] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES = 784, 10


def write_data(folder: Path, rows: int, chunk: int = 50_000) -> int:
    """x.npy and y.npy written a chunk at a time (this process never holds more than a chunk)."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    y = np.empty(rows, np.int32)
    for start in range(0, rows, chunk):
        block = rng.standard_normal((min(chunk, rows - start), FEATURES), dtype=np.float32)
        x[start : start + len(block)] = block
        y[start : start + len(block)] = np.argmax(block @ teacher, axis=1)
        x.flush()
    del x
    np.save(folder / "y.npy", y)
    return (folder / "x.npy").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the data (deleted after)")
    parser.add_argument("--json", help="also write the results as JSON")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # internal: write the data into this folder
    args = parser.parse_args()
    if args.write:
        write_data(Path(args.write), args.rows)
        return
    folder = Path(tempfile.mkdtemp(prefix="jaxnet-stream-", dir=args.dir))
    try:
        # The data is written by a child of its own: a process's peak resident memory is inherited by
        # the children it forks (Linux keeps the larger across exec), so this one stays small.
        start = time.perf_counter()
        writer = [sys.executable, __file__, "--write", str(folder), "--rows", str(args.rows)]
        subprocess.run(writer, check=True)
        size = (folder / "x.npy").stat().st_size
        written = time.perf_counter() - start
        flags = ["--data", str(folder), "--epochs", "1", "--hidden", "256", "--batch-size", "1024"]
        flags += ["--lr", "3e-3", "--val-split", "0.01", "--test-split", "0.01", "--out", str(folder / "run")]
        # the trainer reports its own peak (RUSAGE_CHILDREN would also count the data writer's)
        measured = folder / "peak"
        trainer = (
            "import resource, sys; from jaxnet.app import cli; code = cli.main(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); sys.exit(code)"
        )
        cmd = [sys.executable, "-c", trainer, str(measured), "train", *flags, "--json", "--quiet"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"jaxnet train failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak = int(measured.read_text()) * 1024  # ru_maxrss is in KiB on Linux
        summary = json.loads(proc.stdout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import jax

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__,
        "rows": args.rows,
        "x_bytes": size,
        "write_seconds": round(written, 1),
        "train_seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "command": "jaxnet train " + " ".join(f.replace(str(folder), "DIR") for f in flags),
        "summary": {k: summary[k] for k in ("train_loss", "val_accuracy", "test_accuracy", "steps_per_second")},
    }
    print(
        f"x.npy {size / 1e9:.2f} GB ({args.rows} x {FEATURES} float32): one epoch of jaxnet train --data DIR in "
        f"{seconds:.1f} s, peak resident memory {peak / 2**30:.2f} GiB; test accuracy "
        f"{summary['test_accuracy']:.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
