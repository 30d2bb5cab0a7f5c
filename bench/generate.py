"""Generation with a key-value cache against re-running the whole prefix for every token.

``jn.generate`` (one compiled program: a forward pass over the prompt, then a ``lax.scan`` of cached
decode steps) against the uncached way: for each new token, the model's forward pass over the
sequence so far (its last ``context`` tokens, padded to the context so that one program serves every
length), greedy in both. Both produce the same tokens within the context (checked here on the first
``context - len(prompt)`` tokens); reported: tokens/s of each, medians of interleaved repeats, and
their ratio. The first call of each compiles and is left out.

    python bench/generate.py [--tokens 500] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxnet as jn  # noqa: E402
from jaxnet.base import Context  # noqa: E402


def uncached(forward, params, prompt, steps: int, context: int) -> np.ndarray:
    """Greedy tokens, each from ``forward(params, window)`` over the sequence so far (its last
    ``context`` ids, padded to the context so that one compiled program serves every length)."""
    ids = list(prompt)
    for _ in range(steps):
        window = ids[-context:]
        padded = np.zeros(context, np.int32)
        padded[: len(window)] = window
        ids.append(int(jnp.argmax(forward(params, padded)[len(window) - 1])))
    return np.array(ids[len(prompt) :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=66)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    net = jn.gpt(args.vocab, args.context, args.layers, args.heads, args.dim)
    params, _ = net.init(jax.random.key(0))
    prompt = np.array([1, 2, 3], np.int32)
    key = jax.random.key(0)

    def cached_run():
        return jn.generate(net, params, prompt, args.tokens, key=key, temperature=0)

    forward = jax.jit(lambda params, window: net.apply(params, {}, window, Context(train=False))[0])

    def uncached_run():
        return uncached(forward, params, prompt, args.tokens, args.context)

    within = args.context - len(prompt)
    same = np.array_equal(cached_run()[:within], uncached_run()[:within])  # (and compiles both)
    seconds = {"cached": [], "uncached": []}
    for r in range(args.repeats):
        order = [("cached", cached_run), ("uncached", uncached_run)]
        for name, run in order if r % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    rates = {name: args.tokens / statistics.median(s) for name, s in seconds.items()}
    lines = [
        f"generate: GPT {args.layers} layers x {args.dim}, context {args.context}, {args.tokens} new tokens, greedy; "
        f"the same tokens within the context: {same}",
        f"cached (jn.generate, one program)   {rates['cached']:>10,.0f} tokens/s",
        f"uncached (forward over the prefix)  {rates['uncached']:>10,.0f} tokens/s",
        f"ratio                               {rates['cached'] / rates['uncached']:>10.1f}x",
    ]
    env = dict(date=datetime.date.today().isoformat(), device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
               python=platform.python_version(), jax=jax.__version__, load=os.getloadavg())  # fmt: skip
    lines.append(" ".join(f"{k}={v}" for k, v in env.items()))
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "env": env, "seconds": seconds, "same": same}))
        Path(args.json).with_suffix(".txt").write_text(table + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
