"""Shared pieces of the benchmark suite: problem definitions, initial weights, data, timing.

Every implementation starts from the same numpy weights and data made here, so that each can be
checked to compute the same loss before it is timed. Weight layout is ``w: (in, out)``, ``b: (out,)``;
frameworks that store ``(out, in)`` transpose on the way in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

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


def add_gpt_arguments(parser, *, dim: int, layers: int, batch_size: int) -> None:
    """The GPT flags of the sharding benchmarks: ``--steps``, ``--dim``, ``--layers``,
    ``--batch-size`` (with these defaults) and ``--json``."""
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--json")


def token_windows(rows: int, vocab: int, context: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``rows`` windows of ``context`` random token ids below ``vocab`` (int32), and the
    same shifted by one (the next-token targets, wrapping around)."""
    x = np.random.default_rng(seed).integers(0, vocab, (rows, context)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)


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


class Timer:
    """A prepared implementation, timed one repeat at a time so that a runner can interleave several.

    ``start()`` compiles (the first call) and returns; each ``repeat()`` returns the wall seconds of
    one repeat of ``units`` of work; ``finish()`` releases what the timer holds and returns the
    :class:`Timing`. ``repeats`` is how many repeats the implementation asks for.
    """

    units: float
    repeats: int

    def start(self) -> None:
        raise NotImplementedError

    def repeat(self) -> float:
        raise NotImplementedError

    def finish(self, seconds: list[float]) -> Timing:
        raise NotImplementedError


class CallTimer(Timer):
    """Times ``first()`` (compilation plus one run) once, then ``run()`` once per repeat.

    Both must block until their results are ready. A repeat that would take less than
    ``min_seconds`` calls ``run`` several times, so that timer resolution and launch noise stay small.
    ``compile_s``, when given, is compile time spent before the timer (e.g. during the loss check),
    added to that of ``first``.
    """

    def __init__(
        self,
        first: Callable[[], object],
        run: Callable[[], object],
        units: float,
        repeats: int,
        min_seconds: float = 0.0,
        compile_s: float | None = None,
    ):
        self._first, self._run, self._min_seconds, self._compile_s = first, run, min_seconds, compile_s
        self._units, self.repeats, self._calls = units, repeats, 1

    @property
    def units(self) -> float:
        return self._units * self._calls

    def start(self) -> None:
        begin = time.perf_counter()
        self._first()
        self._first_s = time.perf_counter() - begin
        begin = time.perf_counter()
        self._run()
        self._once = time.perf_counter() - begin
        if self._min_seconds:
            self._calls = max(1, int(np.ceil(self._min_seconds / max(self._once, 1e-9))))

    def repeat(self) -> float:
        begin = time.perf_counter()
        for _ in range(self._calls):
            self._run()
        return time.perf_counter() - begin

    def finish(self, seconds: list[float]) -> Timing:
        compile_s = max(self._first_s - self._once, 0.0) + (self._compile_s or 0.0)
        return Timing(compile_s=compile_s, seconds=seconds, units=self.units)


def time_calls(
    first: Callable[[], object],
    run: Callable[[], object],
    units: float,
    repeats: int,
    min_seconds: float = 0.0,
    compile_s: float | None = None,
) -> CallTimer:
    """A :class:`CallTimer` of ``first`` and ``run`` (nothing runs until the runner starts it)."""
    return CallTimer(first, run, units, repeats, min_seconds, compile_s)


class EpochTimer(Timer):
    """Times a training loop that reports each epoch's wall time (``jaxnet.fit``).

    ``train(after_epoch)`` runs the loop, calling ``after_epoch(seconds)`` after every epoch and
    stopping when it returns True. The loop runs in a thread that waits in ``after_epoch`` until
    the runner asks for more, so that the waiting is outside the epochs' own timing. The first
    epoch includes compilation; a repeat is as many whole epochs as make up ``min_seconds``
    (measured on the second epoch), their times summed.
    """

    def __init__(
        self,
        train: Callable[[Callable[[float], bool]], object],
        units: float,
        repeats: int,
        min_seconds: float = 0.0,
    ):
        self._train, self._units, self.repeats, self._min_seconds = train, units, repeats, min_seconds
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._epochs: list[float] = []
        self._per_repeat, self._stop, self._ended = 1, False, False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def units(self) -> float:
        return self._units * self._per_repeat

    def _after_epoch(self, seconds: float) -> bool:
        self._epochs.append(seconds)
        self._done.release()
        self._go.acquire()
        return self._stop

    def _main(self) -> None:
        try:
            self._train(self._after_epoch)
        except BaseException as e:  # noqa: BLE001 - re-raised in the runner's thread
            self._error = e
        finally:
            self._ended = True
            self._done.release()

    def _next_epoch(self) -> float:
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise self._error
        if self._ended:
            raise RuntimeError("the training loop ended before its last epoch")
        return self._epochs[-1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._done.acquire()  # the first epoch: compilation and one run
        if self._error is not None:
            raise self._error
        if self._min_seconds:
            once = self._next_epoch()
            self._per_repeat = max(1, int(np.ceil(self._min_seconds / max(once, 1e-9))))

    def repeat(self) -> float:
        return sum(self._next_epoch() for _ in range(self._per_repeat))

    def finish(self, seconds: list[float]) -> Timing:
        if self._thread is not None:
            self._stop = True
            while self._thread.is_alive():
                self._go.release()
                self._thread.join(timeout=0.1)
        first = self._epochs[0] if self._epochs else 0.0
        steady = statistics.median(self._epochs[1:]) if len(self._epochs) > 1 else 0.0
        return Timing(compile_s=max(first - steady, 0.0), seconds=seconds, units=self.units)


class Skip(Exception):
    """An implementation cannot run here (missing package, unsupported case); the message says why."""


def interleaved(timers: dict, repeats: int) -> dict[str, list[float]]:
    """Starts every timer, then times ``repeats`` rounds of one repeat each, the order reversed
    every other round; returns each one's seconds per repeat (the timers finished)."""
    for t in timers.values():
        t.start()
    seconds = {name: [] for name in timers}
    for r in range(repeats):
        for name in list(timers) if r % 2 == 0 else list(reversed(timers)):
            seconds[name].append(timers[name].repeat())
    for name, t in timers.items():
        t.finish(seconds[name])
    return seconds


def publish(text: str, results: dict, json_path: str | None) -> None:
    """Prints ``text``; with ``json_path`` writes ``results`` there and ``text`` beside it (``.txt``)."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
        Path(json_path).with_suffix(".txt").write_text(text + "\n")


def stamp() -> dict:
    """Where and when a measurement ran: the first device, the JAX and Python versions, the date."""
    import datetime
    import platform

    import jax

    return {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_json(path: str | None, result: dict) -> None:
    """Writes ``result`` and :func:`stamp` as JSON to ``path`` (nothing without one)."""
    if path:
        Path(path).write_text(json.dumps({**result, **stamp()}, indent=1) + "\n")
