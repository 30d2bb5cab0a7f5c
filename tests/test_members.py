"""Many members in one program: each equals its configuration trained alone; grids, sweeps, CLI."""

import contextlib
import json
from io import StringIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import (
    best_member,
    check_memory,
    estimate_member_bytes,
    fit,
    init_members,
    member_grid,
    member_keys,
    member_scores,
    mlp,
    set_hyperparams,
    take_member,
)
from jaxnet.app import arch, cli, files

NET = mlp([2, 12, 2])
# Members and lone runs compute the same float32 ops, batched differently: rounding-level differences
# (~1e-7 per step) that some 120 steps of SGD can grow by a few orders of magnitude at most.
ATOL, RTOL = 1e-5, 1e-4


def _xor_data(seed, n):
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(np.int32)


X, Y = _xor_data(0, 48)
VAL = _xor_data(1, 24)
# Two seeds and two weight decays at a sensible rate, and a rate so large that its member stops early.
GRID = [
    {"seed": 3, "learning_rate": 0.05, "weight_decay": 0.0},
    {"seed": 4, "learning_rate": 0.05, "weight_decay": 0.5},
    {"seed": 3, "learning_rate": 5.0, "weight_decay": 0.0},
]


def sgdw(learning_rate, weight_decay):
    """SGD with decoupled weight decay. (With Adam, whose steps divide by the root of the second
    moment, rounding-level differences between batched and lone runs grow to ~1e-3 relative.)"""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


EPOCHS, PATIENCE = 20, 2


def _keys(seeds):
    keys = jax.vmap(jax.random.split)(member_keys(seeds))
    return keys[:, 0], keys[:, 1]


@pytest.fixture(scope="module")
def members_run():
    init_keys, shuffle_keys = _keys([m["seed"] for m in GRID])
    optimizer = optax.inject_hyperparams(sgdw)(learning_rate=0.1, weight_decay=0.0)
    return fit(
        NET,
        init_members(NET, init_keys),
        X,
        Y,
        loss="softmax_cross_entropy",
        optimizer=optimizer,
        epochs=EPOCHS,
        batch_size=8,
        key=shuffle_keys,
        validation=VAL,
        patience=PATIENCE,
        hyperparams={name: jnp.array([m[name] for m in GRID]) for name in ("learning_rate", "weight_decay")},
    )


@pytest.fixture(scope="module")
def alone_runs():
    runs = []
    for m in GRID:
        init_key, shuffle_key = jax.random.split(jax.random.key(m["seed"]))
        runs.append(
            _with_history(
                fit(
                    NET,
                    NET.init(init_key),
                    X,
                    Y,
                    loss="softmax_cross_entropy",
                    optimizer=sgdw(m["learning_rate"], m["weight_decay"]),
                    epochs=EPOCHS,
                    batch_size=8,
                    key=shuffle_key,
                    validation=VAL,
                    patience=PATIENCE,
                )
            )
        )
    return runs


def _with_history(result):
    return result, result.history


def test_each_member_equals_its_configuration_trained_alone(members_run, alone_runs):
    state, history = members_run, members_run.history
    assert [m["seed"] for m in GRID] == [3, 4, 3]
    stopped_at = []
    for i, (alone, alone_history) in enumerate(alone_runs):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL),
            take_member(state.params, i),
            alone.params,
        )
        # The member's history is the lone run's, with None once the member stopped.
        mine = [r["val_loss"][i] for r in history]
        assert all(v is None for v in mine[len(alone_history) :])
        np.testing.assert_allclose(mine[: len(alone_history)], [r["val_loss"] for r in alone_history], rtol=RTOL)
        best_alone = min(range(len(alone_history)), key=lambda e: alone_history[e]["val_loss"]) + 1
        assert history[-1]["best_epoch"][i] == best_alone
        stopped_at.append(len(alone_history))
    assert len(history) == max(stopped_at)  # the run stops when every member has stopped
    assert min(stopped_at) < EPOCHS  # early stopping really differed between members


def test_a_sweep_picks_the_member_with_the_best_validation_metric(members_run, alone_runs):
    history = members_run.history
    best_alone = [min(r["val_loss"] for r in h) for _, h in alone_runs]
    np.testing.assert_allclose(member_scores(history, "val_loss"), best_alone, rtol=RTOL)
    assert best_member(history, "val_loss") == int(np.argmin(best_alone))


def test_best_member_by_accuracy_and_by_final_train_loss():
    history = [
        {"epoch": 1, "train_loss": [0.5, 0.4, 0.6], "val_accuracy": [0.7, 0.8, 0.6], "best_epoch": [1, 1, 1]},
        {
            "epoch": 2,
            "train_loss": [0.3, None, 0.2],
            "val_accuracy": [0.9, None, 0.95],
            "best_epoch": [2, 1, 2],
        },
    ]
    assert best_member(history, "val_accuracy") == 2
    assert member_scores(history, "val_accuracy") == [0.9, 0.8, 0.95]
    plain = [{k: v for k, v in r.items() if k != "best_epoch"} for r in history]
    assert best_member(plain, "train_loss") == 2  # member 1 stopped (None): no final value
    with pytest.raises(ValueError, match="no member has a finite"):
        best_member([{"epoch": 1, "train_loss": [None, float("nan")]}], "train_loss")


def test_each_figure_is_ranked_in_its_own_direction():
    """Perplexity and bits are the loss's exp and its ratio to log 2, errors are errors: lower is
    better for all of them; f1, r2 and accuracies are better higher."""
    history = [{"epoch": 1, "best_epoch": [1, 1, 1]}]
    for name in ("val_loss", "val_perplexity", "val_bits_per_token", "val_cross_entropy", "val_mse", "val_mae"):
        assert best_member([dict(history[0], **{name: [3.0, 2.0, 5.0]})], name) == 1, name
    for name in ("val_accuracy", "val_top_5_accuracy", "val_f1", "val_precision", "val_recall", "val_r2"):
        assert best_member([dict(history[0], **{name: [0.3, 0.9, 0.5]})], name) == 1, name
    from jaxnet.metrics import Metric, get_metric

    error = get_metric(lambda p, t: abs(p - t).sum())._replace(name="error", lower_is_better=True)
    assert best_member([dict(history[0], val_error=[3.0, 2.0, 5.0])], "val_error", [error]) == 1
    assert isinstance(error, Metric)


def test_early_stopping_on_perplexity_keeps_the_epoch_of_the_lowest():
    """Every figure of the cross-entropy picks the epoch of the lowest validation loss."""
    best = {}
    for monitor in ("val_loss", "val_perplexity", "val_bits_per_token", "val_cross_entropy"):
        params = NET.init(jax.random.key(0))
        result = fit(NET, params, X, Y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.5), epochs=12,
                     batch_size=16, key=jax.random.key(1), validation=VAL, patience=3, monitor=monitor,
                     metrics=["perplexity", "bits_per_token", "cross_entropy"])  # fmt: skip
        losses = [r["val_loss"] for r in result.history]
        best[monitor] = result.best_epoch
        assert result.best_epoch == int(np.argmin(losses)) + 1, monitor
    assert len(set(best.values())) == 1 and best["val_loss"] > 1


def test_member_grid():
    grid = member_grid(8, learning_rate=[1e-3, 1e-2, 1e-1])
    assert len(grid) == 24 and grid[0] == {"seed": 0, "learning_rate": 1e-3} and grid[-1]["seed"] == 7
    assert len(member_grid(2, learning_rate=[0.1], weight_decay=[0.0, 1e-4])) == 4


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, "seeds must be a positive integer"),
        ((2,), {"learning_rate": []}, "non-empty list"),
        ((2,), {"learning_rate": [0.1, -1.0]}, "greater than 0"),
        ((2,), {"learning_rate": [float("nan")]}, "finite"),
        ((2,), {"learning_rate": "0.1"}, "non-empty list"),
    ],
)
def test_member_grid_rejects_bad_grids(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        member_grid(*args, **kwargs)


def test_set_hyperparams_checks_names_and_shapes():
    params = {"w": jnp.zeros((2, 3))}  # two members
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    state = jax.jit(jax.vmap(opt.init))(params)
    new = set_hyperparams(state, {"learning_rate": [0.1, 0.2]})
    np.testing.assert_allclose(new.hyperparams["learning_rate"], [0.1, 0.2])
    with pytest.raises(ValueError, match="one per member"):
        set_hyperparams(state, {"learning_rate": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="no hyperparameter 'momentum'"):
        set_hyperparams(state, {"momentum": [0.1, 0.2]})
    with pytest.raises(TypeError, match="inject_hyperparams"):
        set_hyperparams(jax.jit(jax.vmap(optax.adam(0.1).init))(params), {"learning_rate": [0.1, 0.2]})


def test_member_keys_need_member_params():
    with pytest.raises(ValueError, match="leading member axis of 2"):
        fit(
            NET,
            NET.init(jax.random.key(0)),
            X,
            Y,
            loss="softmax_cross_entropy",
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=8,
            key=member_keys([0, 1]),
        )


def test_memory_estimate_is_linear_and_checked():
    params = jax.eval_shape(NET.init, jax.random.key(0))
    opt_state = jax.eval_shape(optax.adam(0.1).init, params)
    one = estimate_member_bytes(params, opt_state, 8, 1)
    assert one > 0 and estimate_member_bytes(params, opt_state, 8, 1000) == 1000 * one
    check_memory(one, 1)
    with pytest.raises(ValueError, match="members need about .* more than the"):
        check_memory(2**62, 10**9)


# --- the CLI --------------------------------------------------------------------------------------------------


COMMON = ("train", "--dataset", "moons", "--hidden", "8", "--epochs", "3", "--batch-size", "64", "--quiet")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """A sweep and an ensemble through ``cli.main``, the console script's entry point (in-process:
    tests/test_cli.py runs the command as a process)."""
    d = tmp_path_factory.mktemp("members")
    commands = {
        "sweep": (*COMMON, "--seeds", "2", "--lr", "0.001,0.05", "--json", "--out", d / "sweep"),
        "ensemble": (*COMMON, "--seeds", "3", "--ensemble", "--out", d / "ensemble"),
    }
    results = {}
    for name, args in commands.items():
        out, err = StringIO(), StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
        assert code == 0, (name, err.getvalue())
        results[name] = out.getvalue()
    return d, results


@pytest.mark.slow
def test_cli_sweep_reports_members_and_saves_the_best(cli_runs):
    d, results = cli_runs
    summary = json.loads(results["sweep"])
    assert {"dataset", "epochs", "train_loss", "val_accuracy", "test_accuracy", "seconds"} <= set(summary)
    members = summary["members"]
    assert [(m["seed"], m["learning_rate"]) for m in members] == [
        (0, 0.001),
        (1, 0.001),
        (0, 0.05),
        (1, 0.05),
    ]
    best = summary["best_member"]
    assert members[best]["val_accuracy"] == max(m["val_accuracy"] for m in members)
    assert summary["test_accuracy"] == pytest.approx(members[best]["test_accuracy"])
    saved = files.load_model(d / "sweep")
    assert saved.params["0/w"].shape == (2, 8) and "members" not in saved.meta  # one model, as a single run
    assert saved.meta["member"]["seed"] == members[best]["seed"]
    lines = [json.loads(line) for line in (d / "sweep" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({(r["member"], r["epoch"]) for r in lines}) == [(i, e) for i in range(4) for e in (1, 2, 3)]


@pytest.mark.slow
def test_cli_ensemble_predict_averages_the_members(cli_runs, tmp_path, capsys):
    d, _ = cli_runs
    saved = files.load_model(d / "ensemble")
    assert saved.meta["members"] == 3 and saved.params["0/w"].shape == (3, 2, 8)
    x = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert (
        cli.main(["predict", "--model", str(d / "ensemble"), "--data", str(tmp_path / "x.npz"), "--probabilities"]) == 0
    )
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    printed = np.array([[float(v) for v in row.split(",")[1:]] for row in rows])
    xs = (x - saved.mean) / saved.std
    model = arch.build_model(saved.meta)
    params = arch.bind(model, saved.params, saved.state, members=3).params
    apply = jax.vmap(model.apply, in_axes=(None, 0))
    probs = [jax.nn.softmax(apply(take_member(params, i), xs)) for i in range(3)]
    np.testing.assert_allclose(printed, np.mean(probs, axis=0), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--lr", "0.1,,0.2"), "'' is not a number"),
        (("--lr", "abc"), "'abc' is not a number"),
        (("--seeds", "0"), "must be a positive integer"),
        (("--weight-decay", "-1"), "--weight-decay must be 0 or more"),
        (("--seeds", "1000000000", "--lr", "0.1,0.2"), "members need about"),
    ],
)
def test_cli_rejects_bad_grids_in_one_line(args, message, capsys):
    assert cli.main([*COMMON, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnet: error:") and message in err and err.count("\n") == 1
