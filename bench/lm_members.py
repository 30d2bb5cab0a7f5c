"""K language models in one program (a member run under ``vmap``) against K separate runs.

A small character GPT trained for ``--steps`` steps on the text given with ``--data`` (a synthetic text
when none is), K members with their own seeds and learning rates, through ``jn.fit`` as one member run,
and the same K configurations one after another as K single runs. Reported: the wall time of each
(compilation included: a sweep pays it once, K runs K times), the training time alone (the rounds after
the first, ``fit``'s own per-round seconds), and each member's validation loss both ways (equal to
float32 rounding: the member run computes the same steps).

    python bench/lm_members.py [--data FILE.txt] [--members 4] [--steps 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import optax  # noqa: E402
from lm import tokens_of  # noqa: E402

import jaxnet as jn  # noqa: E402
from jaxnet import text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    tokens, vocab = tokens_of(args.data, Path(tempfile.mkdtemp(prefix="jaxnet-bench-members-")))
    train, held = text.split_tokens(tokens, 0.1)
    windows, val = text.windows(train, 64), text.windows(held, 64, stride=64, limit=120)
    net = jn.gpt(vocab, 64, 2, 4, 64)
    k = args.members
    rates = [1e-3 * (2 ** (i % 2)) for i in range(k)]
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)
    options = dict(loss="softmax_cross_entropy", optimizer=optimizer, steps=args.steps, batch_size=12,
                   eval_every=args.steps // args.rounds, validation=val)  # fmt: skip

    start = time.perf_counter()
    keys = jn.member_keys(list(range(k)))
    params, state = jax.vmap(net.init)(jax.random.split(jax.random.key(0), k))
    hyper = {"learning_rate": np.asarray(rates, np.float32)}
    together = jn.fit(net, params, windows, None, key=keys, model_state=state, hyperparams=hyper, **options)
    wall_together = time.perf_counter() - start
    train_together = sum(r["seconds"] - r.get("val_seconds", 0) for r in together.history[1:])

    wall_apart = train_apart = 0.0
    apart_losses = []
    for i in range(k):
        start = time.perf_counter()
        one = jax.tree.map(lambda a: a[i], params)
        result = jn.fit(
            net, one, windows, None, key=keys[i], model_state={},
            **{**options, "optimizer": optax.inject_hyperparams(optax.adamw)(learning_rate=rates[i])},
        )  # fmt: skip
        wall_apart += time.perf_counter() - start
        train_apart += sum(r["seconds"] - r.get("val_seconds", 0) for r in result.history[1:])
        apart_losses.append(result.history[-1]["val_loss"])
    lines = [
        f"{k} GPTs (2 layers x 64, context 64, batch 12), {args.steps} steps each, on {jax.devices()[0]}",
        f"one member run:  {wall_together:7.1f} s wall, {train_together:7.2f} s training (rounds after the first)",
        f"{k} single runs:  {wall_apart:7.1f} s wall, {train_apart:7.2f} s training (rounds after the first)",
        f"speed-up: {wall_apart / wall_together:.2f}x wall, {train_apart / train_together:.2f}x training",
        "validation loss, together / apart: "
        + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(together.history[-1]["val_loss"], apart_losses)),
        f"date={datetime.date.today().isoformat()} cpu_count={os.cpu_count()} jax={jax.__version__} "
        f"load={os.getloadavg()}",
    ]
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "text": table}) + "\n")
        Path(args.json).with_suffix(".txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
