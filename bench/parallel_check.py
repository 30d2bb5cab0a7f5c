"""Checks mixed precision and the data-parallel path on whatever machine runs it; prints JSON.

  python bench/parallel_check.py                 # digits: bfloat16 vs float32 over 3 seeds, then
                                                 # data parallel over all local devices, and over
                                                 # 4 emulated CPU devices in a subprocess
  python bench/parallel_check.py --epochs 2 --seeds 1   # a quick smoke run

(a) ``--dtype bfloat16`` against float32 on digits: test accuracy and steps/s per seed.
(b) ``jaxnet train --devices all`` against one device: test accuracy and the largest parameter
    difference (zero up to float rounding: data parallelism changes only the order of sums).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(**overrides):
    from jaxnet.app import config, run

    mesh = overrides.pop("mesh", None)
    result = run.run(config.make_config(dataset="digits", **overrides), mesh=mesh)
    return result


def _figures(summary: dict) -> dict:
    return {"test_accuracy": summary["test_accuracy"], "steps_per_second": summary["steps_per_second"]}


def mixed_precision(seeds: int, epochs: int | None) -> list[dict]:
    rows = []
    for seed in range(seeds):
        row = {"seed": seed}
        for dtype in ("float32", "bfloat16"):
            summary = _run(seed=seed, epochs=epochs, dtype=dtype).summary
            row[dtype] = _figures(summary)
        row["difference_points"] = 100 * (row["bfloat16"]["test_accuracy"] - row["float32"]["test_accuracy"])
        rows.append(row)
    return rows


def data_parallel(epochs: int | None, batch_size: int) -> dict:
    import jax
    import numpy as np

    from jaxnet import parallel

    mesh = parallel.make_data_mesh("all")
    one = _run(epochs=epochs, batch_size=batch_size)
    many = _run(epochs=epochs, batch_size=batch_size, mesh=mesh)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(one.model.params), jax.tree.leaves(many.model.params))
    )
    return {
        "platform": jax.devices()[0].platform,
        "devices": mesh.size,
        "batch_size": batch_size,
        "one_device": _figures(one.summary),
        "data_parallel": _figures(many.summary),
        "max_param_difference": diff,
    }


def emulated_cpu(epochs: int | None, batch_size: int) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    args = [sys.executable, __file__, "--only-data-parallel", "--batch-size", str(batch_size)]
    if epochs:
        args += ["--epochs", str(epochs)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, help="default: the digits preset (30)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--only-data-parallel", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only_data_parallel:
        print(json.dumps(data_parallel(args.epochs, args.batch_size)))
        return
    import jax

    report = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "mixed_precision": mixed_precision(args.seeds, args.epochs),
        "data_parallel_local": data_parallel(args.epochs, args.batch_size),
        "data_parallel_4_cpu_devices": emulated_cpu(args.epochs, args.batch_size),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
