"""Recipes by name against optax itself: optimizers, schedules, warmup, clipping, accumulation, smoothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import losses
from jaxnet.app import cli, recipes
from jaxnet.app import config as configlib
from jaxnet.app import run as runlib
from jaxnet.app.rundir import RunFolder
from jaxnet.step import learning_rate_of

SMALL = dict(dataset="moons", hidden=(4,), epochs=3, batch_size=128)
PARAMS = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}


def _grads(i):
    rng = np.random.default_rng(i)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)


def _run(tx, steps=4):
    params, state = PARAMS, tx.init(PARAMS)
    for i in range(steps):
        updates, state = tx.update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", recipes.OPTIMIZERS)
def test_every_optimizer_by_name_steps_as_optax_itself(name):
    got = _run(recipes.optimizer(name, {"learning_rate": 0.01}))
    options = {"weight_decay": 0.0} if recipes.takes(name, "weight_decay") else {}  # no decay unless asked
    want = _run(getattr(optax, name)(0.01, **options))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_momentum_and_nesterov_reach_the_optimizer():
    got = _run(recipes.optimizer("sgd", {"learning_rate": 0.1}, momentum=0.9, nesterov=True))
    want = _run(optax.sgd(0.1, momentum=0.9, nesterov=True))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "schedule, reference",
    [
        ("constant", lambda s: 1.0),
        ("cosine", lambda s: 0.5 * (1 + np.cos(np.pi * min(s, 90) / 90))),
        ("linear", lambda s: max(0.0, 1 - s / 90)),
        ("exponential", lambda s: 0.01 ** (s / 90)),
    ],
)
def test_schedules_after_a_linear_warmup(schedule, reference):
    scale = recipes.lr_scale(schedule, total_steps=100, warmup=10)
    for step in (0, 5, 10, 30, 55, 99):
        expected = step / 10 if step < 10 else reference(step - 10)
        assert float(scale(step)) == pytest.approx(expected, rel=1e-5, abs=1e-6), (schedule, step)
    onecycle = recipes.lr_scale("onecycle", total_steps=100)
    assert float(onecycle(30)) == pytest.approx(1.0, rel=1e-5) and float(onecycle(0)) < 0.1


def test_the_logged_rate_is_the_scheduled_rate_applied():
    tx = recipes.optimizer("adam", {"learning_rate": 0.1}, schedule="linear", total_steps=10)
    state = tx.init(PARAMS)
    for step in range(3):
        _, state = tx.update(_grads(step), state, PARAMS)
        assert float(learning_rate_of(state)) == pytest.approx(0.1 * (1 - step / 10), rel=1e-6)


def test_clipping_and_accumulation_match_hand_written_optax():
    got = _run(recipes.optimizer("sgd", {"learning_rate": 0.1}, clip_norm=0.5))
    want = _run(optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    accumulated = _run(recipes.optimizer("sgd", {"learning_rate": 0.1}, grad_accum=2), steps=4)
    params = PARAMS  # two SGD steps, each on the mean of two batches' gradients
    for pair in ((0, 1), (2, 3)):
        mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(pair[0]), _grads(pair[1]))
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    spec = losses.with_label_smoothing("cross_entropy", 0.1)
    logits, label = jnp.array([2.0, -1.0, 0.5]), jnp.array(0)
    target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    log_softmax = np.asarray(jax.nn.log_softmax(logits))
    assert float(spec.fn(logits, label)) == pytest.approx(-(target * log_softmax).sum(), rel=1e-6)
    assert losses.with_label_smoothing("cross_entropy", 0.0) is losses.get_loss("cross_entropy")
    with pytest.raises(ValueError, match="for softmax_cross_entropy"):
        losses.with_label_smoothing("mse", 0.1)


@pytest.mark.slow
def test_a_recipe_is_saved_and_honoured_on_resume_bitwise(tmp_path):
    recipe = dict(SMALL, optimizer="sgd", momentum=0.9, lr=0.05, lr_schedule="cosine", warmup=3)
    recipe.update(clip_norm=1.0, grad_accum=2, label_smoothing=0.1)
    straight = runlib.run(configlib.make_config(**recipe), out=tmp_path / "straight")

    def stop_after_first(state, record):
        return state.epoch == 1

    runlib.run(configlib.make_config(**recipe), out=tmp_path / "run", callbacks=[stop_after_first])
    resumed = runlib.resume(tmp_path / "run")
    assert resumed.state.epoch == 3
    for a, b in zip(jax.tree.leaves(resumed.model.params), jax.tree.leaves(straight.model.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    stored = configlib.TrainConfig.from_dict(RunFolder(tmp_path / "run").stored_config())
    assert (stored.lr_schedule, stored.warmup, stored.grad_accum, stored.label_smoothing) == ("cosine", 3, 2, 0.1)
    with pytest.raises(Exception, match="schedule spans its 3 epochs"):
        runlib.resume(tmp_path / "run", epochs=5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum is for optimizers that have one"),
        (["--optimizer", "foo"], "unknown --optimizer 'foo'"),
        (["--lr-schedule", "cos"], "unknown --lr-schedule 'cos'"),
        (["--lr-schedule", "onecycle", "--warmup", "5"], "onecycle warms up by itself"),
        (["--label-smoothing", "1"], "--label-smoothing must be below 1"),
        (["--loss", "mse", "--label-smoothing", "0.1"], "--label-smoothing is for softmax cross-entropy"),
        (["--clip-norm", "0"], "--clip-norm must be greater than 0"),
        (["--grad-accum", "0"], "--grad-accum"),
    ],
)
def test_bad_recipes_are_one_line_usage_errors(args, message, capsys):
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
