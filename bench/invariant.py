"""What ``device_invariant`` costs, and that it holds: jaxnet's GPT trained by ``fit`` with and
without it, on one device and on meshes of emulated CPU devices.

Each run trains ``2 * --steps`` steps in two rounds; its speed is the second round's (compiled
already). Runs are interleaved over ``--repeats`` and the medians reported, with each mode's
steps/s over the default's on the same mesh. Also reported: the largest difference of each run's
params from the one-device run of its mode (0.0 exactly, for ``device_invariant``: bitwise).

    python bench/invariant.py [--meshes one fsdp=2 fsdp=8] [--k 8] [--steps 20] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from bench import common  # noqa: E402
from jaxnet import sharding  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="+", default=["one", "fsdp=2", "fsdp=8"])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_gpt_arguments(parser, dim=128, layers=4, batch_size=32)
    args = parser.parse_args()
    net = jn.gpt(vocab_size=65, context=64, layers=args.layers, heads=4, dim=args.dim)
    params, state = net.init(jax.random.key(0))
    x, y = common.token_windows(args.batch_size * 2 * args.steps, 65)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.99, weight_decay=0.1))

    def run(text: str, k: int | None):
        sizes = {} if text == "one" else sharding.parse_mesh(text)
        mesh = jn.make_mesh(**sizes, devices=jax.devices()[: int(np.prod(list(sizes.values())))]) if sizes else None
        result = jn.fit(
            net, params, x, y, loss="softmax_cross_entropy", optimizer=optimizer, steps=2 * args.steps,
            eval_every=args.steps, batch_size=args.batch_size, key=jax.random.key(1), model_state=state, mesh=mesh,
            device_invariant=k,
        )  # fmt: skip
        return args.steps / result.history[-1]["seconds"], jax.device_get(result.train.params)

    modes = {"default": None, f"device_invariant={args.k}": args.k}
    speeds: dict = {(m, mode): [] for m in args.meshes for mode in modes}
    params_of: dict = {}
    for _ in range(args.repeats):
        for text in args.meshes:
            for mode, k in modes.items():
                speed, trained = run(text, k)
                speeds[(text, mode)].append(speed)
                params_of[(text, mode)] = trained
    rows = []
    for text in args.meshes:
        for mode in modes:
            median = statistics.median(speeds[(text, mode)])
            base = statistics.median(speeds[(text, "default")])
            reference = params_of[(args.meshes[0], mode)]
            worst = max(
                float(np.max(np.abs(a - b), initial=0.0))
                for a, b in zip(jax.tree.leaves(params_of[(text, mode)]), jax.tree.leaves(reference))
            )
            rows.append(
                {"mesh": text, "mode": mode, "steps_per_second": median, "over_default": median / base,
                 "largest_param_difference_from_" + args.meshes[0]: worst, "runs": speeds[(text, mode)]}
            )  # fmt: skip
            print(
                f"{text:>8} {mode:>20}: {median:7.2f} steps/s ({median / base:.2f}x default); params differ from "
                f"{args.meshes[0]}'s by at most {worst:.3g}"
            )
    result = {
        "rows": rows,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "parameters": sum(int(np.size(a)) for a in jax.tree.leaves(params)),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }
    common.write_json(args.json, result)  # (with the device, versions and date: common.stamp)


if __name__ == "__main__":
    main()
