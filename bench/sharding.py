"""FSDP and tensor-parallel layouts of jaxnet's GPT on 8 devices, against one device.

Emulates 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before
JAX starts unless given), builds ``jn.gpt`` at a width whose params plus AdamW's two moments pass
``--min-mb`` megabytes, and trains it with ``fit`` for ``--steps`` steps on one device and on each
mesh given. Reported per mesh: the bytes of params and optimizer state that one device holds
(counted from the arrays' addressable shards) over the one-device run's, and the largest relative
difference of the per-round training losses. The must-show of the sharding work:
``bytes ratio <= 1.05 / shards`` and losses equal to 1e-5.

    python bench/sharding.py [--meshes fsdp=8 data=2,fsdp=2,model=2] [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
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
    parser.add_argument("--meshes", nargs="+", default=["fsdp=8", "data=2,fsdp=2,model=2"])
    common.add_gpt_arguments(parser, dim=512, layers=4, batch_size=8)
    args = parser.parse_args()
    net = jn.gpt(vocab_size=512, context=64, layers=args.layers, heads=8, dim=args.dim)
    params, state = net.init(jax.random.key(0))
    x, y = common.token_windows(args.batch_size * args.steps, 512)

    def run(mesh):
        start = time.perf_counter()
        result = jn.fit(
            net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.adamw(1e-3, weight_decay=0.1),
            steps=args.steps, eval_every=1, batch_size=args.batch_size, key=jax.random.key(1), model_state=state,
            shuffle=False, mesh=mesh,
        )  # fmt: skip
        held = sharding.bytes_per_device((result.train.params, result.train.opt_state))
        return [r["train_loss"] for r in result.history], held, time.perf_counter() - start

    losses, whole, seconds = run(None)
    rows = [{"mesh": "one device", "bytes_per_device": whole, "ratio": 1.0, "seconds": seconds}]
    print(f"one device: params + AdamW state {whole / 2**20:.1f} MiB, {seconds:.1f} s")
    for text in args.meshes:
        mesh = jn.make_mesh(**sharding.parse_mesh(text))
        got, held, seconds = run(mesh)
        shards = mesh.shape["fsdp"] * mesh.shape["model"]
        worst = float(np.max(np.abs(np.array(got) - np.array(losses)) / np.abs(np.array(losses))))
        rows.append(
            {"mesh": text, "bytes_per_device": held, "ratio": held / whole, "bound": 1.05 / shards,
             "max_relative_loss_difference": worst, "seconds": seconds}
        )  # fmt: skip
        print(
            f"{text}: {held / 2**20:.1f} MiB per device, {held / whole:.4f} of one device's "
            f"(bound {1.05 / shards:.4f}); losses over {args.steps} steps within {worst:.2e} relative; "
            f"{seconds:.1f} s"
        )
    result = {
        "rows": rows,
        "losses": losses,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
