"""Whether XLA's CPU runtime gives one compiled matmul the same bits in processes with different
numbers of emulated devices: the limit of ``device_invariant`` across processes (docs/sharding.md).

Runs ``h.T @ d`` (``h`` ``(K, 128)``, ``d`` ``(K, 65)``, fixed random values) jitted on device 0 of a
fresh process per device count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and counts
the results whose bits differ from the first count's. The compiled HLO is printed once per
process count as a hash: the same program in every process.

XLA's CPU runtime gives a process ``max(NPROC or its cores, devices)`` intra-op threads, and Eigen
splits a matmul's long sums by their number. ``--threads N`` starts every process with ``NPROC=N``
(what ``jaxnet.parts.same_cpu_threads`` does for a ``device_invariant`` run): then no result differs
in processes of up to N devices.

    python bench/matmul_processes.py [--counts 1 2 3 4 8 16] [--rows 64 256 1024] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

CHILD = """
import hashlib, json, sys
import jax, numpy as np
rows, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
h, d = rng.standard_normal((rows, 128)).astype(np.float32), rng.standard_normal((rows, 65)).astype(np.float32)
f = jax.jit(lambda h, d: h.T @ d)
text = f.lower(h, d).compile().as_text()
np.save(path, np.asarray(f(h, d)))
print(json.dumps({"hlo": hashlib.sha256(text.encode()).hexdigest()[:12], "devices": jax.device_count()}))
"""


def result(count: int, rows: int, folder: str, threads: int | None) -> tuple:
    path = os.path.join(folder, f"{count}-{rows}.npy")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    env.pop("NPROC", None)
    if threads is not None:
        env["NPROC"] = str(threads)
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), path], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return np.load(path), json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--threads", type=int, help="NPROC in every process (default: unset)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows_out = []
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.rows:
            first, _ = result(args.counts[0], rows, folder, args.threads)
            for count in args.counts:
                values, meta = result(count, rows, folder, args.threads)
                differ = int((values.view("u4") != first.view("u4")).sum())
                rows_out.append({"rows": rows, "devices": count, "differ": differ, "of": int(values.size), **meta})
                print(f"K={rows:5d} devices={count:3d}: {differ:5d} of {values.size} differ from "
                      f"devices={args.counts[0]} (HLO {meta['hlo']})")  # fmt: skip
    common.write_json(args.json, {"rows": rows_out, "cpu_count": os.cpu_count(), "nproc": args.threads})


if __name__ == "__main__":
    main()
