"""Shared pieces of the benchmark suite: problem definitions, initial weights, data, timing.

Every implementation starts from the same numpy weights and data made here, so that each can be
checked to compute the same loss before it is timed. Weight layout is ``w: (in, out)``, ``b: (out,)``;
frameworks that store ``(out, in)`` transpose on the way in.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable

import numpy as np

# The worked example: 3-2-2 sigmoid network, half sum of squares, SGD 0.1.
SEED_W1 = np.array([[0.1, 0.2, 0.5], [0.4, 0.1, 0.5]], np.float32)  # notes' w_jk (neuron j, input k)
SEED_B1 = np.array([0.2, 0.2], np.float32)
SEED_W2 = np.array([[0.6, 0.1], [0.5, 0.2]], np.float32)
SEED_B2 = np.array([0.2, 0.1], np.float32)
SEED_X = np.array([0.5, 0.5, 0.1], np.float32)
SEED_T = np.array([0.9, 0.1], np.float32)
SEED_LR = 0.1


def seed_params() -> list[dict]:
    """The notes' weights as ``[{"w": (3, 2), "b": (2,)}, {"w": (2, 2), "b": (2,)}]``."""
    return [{"w": SEED_W1.T.copy(), "b": SEED_B1.copy()}, {"w": SEED_W2.T.copy(), "b": SEED_B2.copy()}]


def seed_stream(steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` online examples: inputs ``(steps, 3)`` in [0, 1) and targets ``(steps, 2)`` in [0.1, 0.9)."""
    rng = np.random.default_rng(seed)
    x = rng.random((steps, 3), dtype=np.float32)
    t = (0.1 + 0.8 * rng.random((steps, 2), dtype=np.float32)).astype(np.float32)
    return x, t


def ensemble_params(k: int, seed: int = 1) -> list[dict]:
    """``k`` copies of the notes' weights, each perturbed by N(0, 0.1): leading model axis ``k``."""
    rng = np.random.default_rng(seed)
    return [
        {name: (a[None] + 0.1 * rng.standard_normal((k,) + a.shape)).astype(np.float32) for name, a in layer.items()}
        for layer in seed_params()
    ]


def mlp_params(sizes: list[int], seed: int = 0, dtype=np.float32) -> list[dict]:
    """He-normal weights ``(in, out)`` and zero biases for an MLP of the given sizes."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(dtype),
            "b": np.zeros((b,), dtype),
        }
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


@functools.lru_cache(maxsize=8)  # large cases reuse one copy across implementations
def classification_data(n: int, features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs ``(n, features)`` ~ N(0, 1) and integer labels ``(n,)`` in ``[0, classes)``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features), dtype=np.float32), rng.integers(0, classes, n).astype(np.int32)


@functools.lru_cache(maxsize=8)
def regression_data(n: int, features: int, outputs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs ``(n, features)`` and targets ``(n, outputs)``, both ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, features), dtype=np.float32),
        rng.standard_normal((n, outputs), dtype=np.float32),
    )


def num_weights(sizes: list[int]) -> int:
    """Number of multiply-accumulate weights (biases excluded) of an MLP."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclasses.dataclass
class Timing:
    """A measured implementation: compile time of the first call and wall seconds of each repeat.

    ``units`` is the work done by one repeat (steps, model-steps or examples).
    """

    compile_s: float | None
    seconds: list[float]
    units: float

    @property
    def rates(self) -> list[float]:
        return [self.units / s for s in self.seconds]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)


def time_calls(first: Callable[[], object], run: Callable[[], object], units: float, repeats: int,
               min_seconds: float = 0.0) -> Timing:
    """Times ``first()`` (compilation plus one run) once, then ``run()`` ``repeats`` times.

    Both must block until their results are ready. A repeat that takes less than ``min_seconds``
    is grown by calling ``run`` several times in it, so that timer resolution and launch noise stay small.
    """
    start = time.perf_counter()
    first()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    calls = max(1, int(np.ceil(min_seconds / max(once, 1e-9)))) if min_seconds else 1
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        seconds.append(time.perf_counter() - start)
    return Timing(compile_s=max(first_s - once, 0.0), seconds=seconds, units=units * calls)


class Skip(Exception):
    """An implementation cannot run here (missing package, unsupported case); the message says why."""
