"""Reading tables: ``jaxnet.app.data.load_data_csv`` (pyarrow, kinds, gaps, encoding) against ``np.loadtxt``.

- ``100k x 11``: 100,000 rows of 10 float features and an integer label (about 9.7 MB), read by
  ``np.loadtxt(delimiter=",", skiprows=1)`` (numbers only, no names, no checks: the baseline) and
  by ``load_csv`` (everything a training run reads: types, checks, the encoder, the targets);
- ``wide``: 20 rows of 25,000 and of 100,000 float columns, read by ``load_csv``: the time should
  grow linearly with the columns (4x the columns, about 4x the time).

Repeats interleaved (the order reversed every other round); reported: the median seconds, and
the median over rounds of the ratio in that round. Peak memory: a fresh process per reader, the
peak of Python's and numpy's allocations (tracemalloc) plus pyarrow's memory pool's peak.

    python bench/tables.py [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow  # noqa: E402

from bench import common  # noqa: E402
from jaxnet.app import data  # noqa: E402


def write_long(path: Path, rows: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(rows, 10)), rng.integers(0, 3, rows)
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(10)] + ["y"]) + "\n")
        for r, t in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in r) + f",{t}\n")


def write_wide(path: Path, columns: int, rows: int = 20) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(columns)] + ["y"]) + "\n")
        for r in range(rows):
            f.write(",".join(f"{v:.4f}" for v in rng.normal(size=columns)) + f",{r % 2}\n")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


PEAK = """
import sys, tracemalloc, numpy as np, pyarrow as pa
from jaxnet.app import data
tracemalloc.start()
if sys.argv[1] == "loadtxt":
    np.loadtxt(sys.argv[2], delimiter=",", skiprows=1)
else:
    data.load_csv(sys.argv[2], "y")
print((tracemalloc.get_traced_memory()[1] + pa.default_memory_pool().max_memory()) / 2**20)
"""


def peak_mb(reader: str, path: Path) -> float:
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PEAK, reader, str(path)], capture_output=True, text=True, cwd=root)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    long, wide25, wide100 = folder / "long.csv", folder / "wide25k.csv", folder / "wide100k.csv"
    write_long(long)
    write_wide(wide25, 25_000)
    write_wide(wide100, 100_000)
    readers = {
        "loadtxt 100k x 11": lambda: np.loadtxt(long, delimiter=",", skiprows=1),
        "load_csv 100k x 11": lambda: data.load_csv(long, "y"),
        "load_csv 20 x 25k": lambda: data.load_csv(wide25, "y"),
        "load_csv 20 x 100k": lambda: data.load_csv(wide100, "y"),
    }
    for fn in readers.values():  # warm: imports, pyarrow's thread pool
        fn()
    times = {name: [] for name in readers}
    for r in range(args.repeats):
        for name in list(readers) if r % 2 == 0 else list(reversed(readers)):
            times[name].append(seconds(readers[name]))
    csv_vs_loadtxt = statistics.median(a / b for a, b in zip(times["loadtxt 100k x 11"], times["load_csv 100k x 11"]))
    wide_ratio = statistics.median(a / b for a, b in zip(times["load_csv 20 x 100k"], times["load_csv 20 x 25k"]))
    peaks = {"loadtxt": peak_mb("loadtxt", long), "load_csv": peak_mb("load_csv", long)}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "file_mb": os.path.getsize(long) / 1e6,
        "seconds": times,
        "load_csv_speed_vs_loadtxt": csv_vs_loadtxt,
        "wide_100k_over_25k": wide_ratio,
        "peak_mb": peaks,
    }
    lines = [
        f"{results['date']}  {results['machine']}  numpy {np.__version__}  pyarrow {pyarrow.__version__}  "
        f"{args.repeats} interleaved repeats"
    ]
    for name, t in times.items():
        lines.append(f"  {name:20s} median {statistics.median(t):8.3f} s")
    lines.append(f"  load_csv is {csv_vs_loadtxt:.2f}x as fast as np.loadtxt on {results['file_mb']:.1f} MB")
    lines.append(f"  wide: 100k columns take {wide_ratio:.2f}x the time of 25k columns (linear: 4x)")
    lines.append(f"  peak memory of the read: loadtxt +{peaks['loadtxt']:.0f} MB, load_csv +{peaks['load_csv']:.0f} MB")
    common.publish("\n".join(lines), results, args.json)


if __name__ == "__main__":
    main()
