"""The benchmark runner's timing protocol: interleaved repeats, fit held between epochs, paired ratios."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.run import ratio  # noqa: E402


def _fake_fit(epoch_seconds, events, name):
    """A training loop that reports fixed epoch times, logs when each epoch runs, and stops when
    its callback says so."""

    def train(after_epoch):
        for i, seconds in enumerate(epoch_seconds):
            events.append(f"{name} epoch {i}")
            if after_epoch(seconds):
                break
        events.append(f"{name} done")

    return train


def test_epoch_timer_holds_the_loop_between_epochs_and_excludes_the_first():
    events = []
    timer = common.EpochTimer(_fake_fit([5.0, 1.0, 2.0, 3.0, 9.0, 9.0], events, "fit"), units=10, repeats=3)
    timer.start()
    assert events == ["fit epoch 0"]  # compiled, then held
    seconds = []
    for i in range(3):
        events.append(f"other repeat {i}")
        seconds.append(timer.repeat())
    timing = timer.finish(seconds)
    assert events == [
        "fit epoch 0",
        "other repeat 0",
        "fit epoch 1",
        "other repeat 1",
        "fit epoch 2",
        "other repeat 2",
        "fit epoch 3",
        "fit done",
    ]  # stopped by its callback
    assert timing.seconds == [1.0, 2.0, 3.0]
    assert timing.rates == [10.0, 5.0, 10 / 3]
    assert timing.compile_s == pytest.approx(3.0)  # first epoch minus the median epoch


def test_epoch_timer_groups_short_epochs_into_repeats_of_min_seconds():
    timer = common.EpochTimer(_fake_fit([5.0] + [0.25] * 20, [], "fit"), units=10, repeats=2, min_seconds=1.0)
    timer.start()  # the second epoch (0.25 s) sets four epochs per repeat
    timing = timer.finish([timer.repeat(), timer.repeat()])
    assert timing.seconds == [1.0, 1.0] and timing.units == 40 and timing.rates == [40.0, 40.0]


def test_epoch_timer_reraises_the_loops_error_and_a_short_loop():
    def broken(after_epoch):
        after_epoch(1.0)
        raise ValueError("diverged")

    timer = common.EpochTimer(broken, units=1, repeats=2)
    timer.start()
    with pytest.raises(ValueError, match="diverged"):
        timer.repeat()
    timer.finish([])

    short = common.EpochTimer(_fake_fit([1.0, 1.0], [], "fit"), units=1, repeats=3)
    short.start()
    short.repeat()
    with pytest.raises(RuntimeError, match="ended before its last epoch"):
        short.repeat()


def test_call_timer_grows_short_repeats_to_min_seconds():
    calls = []
    timer = common.time_calls(
        lambda: calls.append("first"), lambda: calls.append("run"), units=4, repeats=2, min_seconds=1e-3
    )
    assert calls == []  # nothing runs until the runner starts it
    timer.start()
    timing = timer.finish([timer.repeat(), timer.repeat()])
    assert calls[:2] == ["first", "run"] and len(calls) > 4
    assert timing.units == 4 * (len(calls) - 2) / 2 and len(timing.seconds) == 2


def test_ratio_pairs_interleaved_repeats():
    # b slowed down in repeat 2 and so did a (shared drift): paired ratios stay at 2, the ratio of
    # the medians does not.
    a = {"rates": [2.0, 2.2, 1.0, 0.9], "median": 1.5}
    b = {"rates": [1.0, 1.1, 0.5, 0.45], "median": 0.75}
    assert ratio(a, b) == pytest.approx(2.0)
    a = {"rates": [4.0, 4.0, 1.0], "median": 4.0}
    b = {"rates": [2.0, 1.0, 1.0], "median": 1.0}
    assert ratio(a, b) == pytest.approx(2.0)  # paired: 2, 4, 1 -> 2 (the medians give 4)
    assert ratio({"rates": [3.0], "median": 3.0}, {"rates": [1.0, 2.0], "median": 1.5}) == pytest.approx(2.0)
    # rows of different cases were not timed side by side: the ratio of their medians
    a, b = dict(a, case="ensemble"), dict(b, case="seed-sgd")
    assert ratio(a, b) == pytest.approx(4.0)


def test_interleave_alternates_timers_and_drops_a_failing_one():
    from bench.run import _interleave

    events, errors, timed = [], [], []

    def run_of(name, fail_at=None):
        def run():
            events.append(name)
            if timed and fail_at is not None and events.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return run

    timers = {
        "a": common.time_calls(run_of("a"), run_of("a"), 1, repeats=3),
        "b": common.time_calls(run_of("b", fail_at=2), run_of("b", fail_at=2), 1, repeats=3),
        "c": common.time_calls(run_of("c"), run_of("c"), 1, repeats=2),
    }
    for timer in timers.values():
        timer.start()  # first call and calibration call of each
    events.clear()
    timed.append(True)
    seconds = _interleave(timers, lambda name, e: errors.append((name, str(e))))
    # repeat 0 starts at a; repeat 1 at b, which fails (its 2nd timed call); repeat 2 at c, already done
    assert events == ["a", "b", "c", "b", "c", "a", "a"]
    assert errors == [("b", "b broke")] and set(timers) == {"a", "c"}
    assert [len(seconds[k]) for k in "abc"] == [3, 1, 2]
