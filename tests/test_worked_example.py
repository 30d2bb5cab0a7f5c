"""The worked example against the hand-worked notes, a float64 chain rule and finite differences."""

import json
import math
import re

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from chain_rule import B, W, chain_rule, flatten, sigma
from jax.flatten_util import ravel_pytree

from jaxnet import half_sum_squares, init_state, make_update, mlp
from jaxnet.app.worked_example import (
    NOTES_LR,
    NOTES_TARGET,
    NOTES_X,
    check_inputs,
    format_worked_example,
    network,
    notes_params,
    worked_example,
)

X_FORWARD = [0.5, 0.5, 0.5]  # the input the notes' forward-pass numbers actually come from


def _close(got, want, rtol=1e-12, atol=1e-15):
    """Every number of two nested results agrees, key by key."""
    g, w = flatten(got), flatten(want)
    assert [p for p, _ in g] == [p for p, _ in w]
    np.testing.assert_allclose([v for _, v in g], [v for _, v in w], rtol=rtol, atol=atol)


def _within(value, printed, decimals):
    """``value`` rounds to ``printed`` at the notes' printed precision (half a unit in the last place)."""
    return abs(value - printed) <= 0.5 * 10.0**-decimals + 1e-12


# Every number the notes write, with the precision they print it at, and how to read it from the
# result for x = [0.5, 0.5, 0.5]. `correct` is None where the notes' number is right; otherwise the
# notes' number is a slip (documented in docs/worked-example.md) and `correct` is the right value at
# the same precision.
NOTES_NUMBERS = [
    # (quantity, notes' value, decimals, getter, correct value if a slip)
    ("z_1^1", 0.6, 1, lambda r: r["layers"][0]["z"][0], None),
    ("z_2^1", 0.7, 1, lambda r: r["layers"][0]["z"][1], None),
    ("a_1^1", 0.646, 3, lambda r: r["layers"][0]["a"][0], None),
    ("a_2^1", 0.668, 3, lambda r: r["layers"][0]["a"][1], None),
    ("z_1^2", 0.6544, 4, lambda r: r["layers"][1]["z"][0], 0.6542),  # from a^1 rounded to 3 decimals
    ("z_2^2", 0.5566, 4, lambda r: r["layers"][1]["z"][1], 0.5565),  # same
    ("a_1^2 = y_1", 0.658, 3, lambda r: r["layers"][1]["a"][0], None),
    ("a_2^2 = y_2", 0.636, 3, lambda r: r["layers"][1]["a"][1], None),
    ("w_11^2'", 0.604, 3, lambda r: r["updated"][1]["w"][0][0], None),
    ("w_21^2'", 0.491, 3, lambda r: r["updated"][1]["w"][1][0], 0.492),  # 0.49198 truncated, not rounded
    ("dz_1^1/dw_11^1 = x_1", 0.5, 1, lambda r: r["grads"][0]["w"][0][0] / r["grads"][0]["b"][0], None),
    ("dC/dw_11^1", 0.003, 3, lambda r: r["grads"][0]["w"][0][0], None),  # right only after rounding
    ("w_11^1'", 0.0997, 4, lambda r: r["updated"][0]["w"][0][0], None),
    # dz_1^2/da_1^1 and dz_2^2/da_1^1 are w_11^2 and w_21^2 before the update (checked by jacobian below)
    ("dz_1^2/da_1^1", 0.604, 3, lambda r: r["params"][1]["w"][0][0], 0.6),
    ("dz_2^2/da_1^1", 0.604, 3, lambda r: r["params"][1]["w"][1][0], 0.5),
    ("dz_2^2/da_1^1 (in dC/dw_11^1)", 0.491, 3, lambda r: r["params"][1]["w"][1][0], 0.5),
]


@pytest.mark.parametrize("name, notes, decimals, get, correct", NOTES_NUMBERS, ids=[n[0] for n in NOTES_NUMBERS])
def test_every_number_in_the_notes(name, notes, decimals, get, correct):
    value = get(worked_example(x=X_FORWARD))
    if correct is None:
        assert _within(value, notes, decimals), f"{name}: computed {value}, notes {notes}"
    else:
        assert not _within(value, notes, decimals), f"{name}: the notes' {notes} is listed as a slip"
        assert _within(value, correct, decimals), f"{name}: computed {value}, documented {correct}"


def test_notes_forward_numbers_come_from_x_half_half_half():
    r = worked_example()  # the stated input [0.5, 0.5, 0.1]
    assert r["x"] == list(NOTES_X)
    np.testing.assert_allclose(r["layers"][0]["z"], [0.4, 0.5], atol=1e-15)
    assert not _within(r["layers"][0]["z"][0], 0.6, 1)
    # With x_1 = x_2 = 0.5 as stated (and used for dz_1^1/dw_11^1), each of the notes' z^1 fixes x_3:
    # z_j^1 = w_j1 x_1 + w_j2 x_2 + w_j3 x_3 + b_j. Both neurons give x_3 = 0.5.
    for j, z in enumerate([0.6, 0.7]):
        x3 = (z - B[0][j] - W[0][j][0] * 0.5 - W[0][j][1] * 0.5) / W[0][j][2]
        assert math.isclose(x3, 0.5, abs_tol=1e-12)
    # and that input reproduces every forward number the notes print
    r = worked_example(x=X_FORWARD)
    assert [round(v, 3) for v in r["layers"][0]["a"] + r["layers"][1]["a"]] == [0.646, 0.668, 0.658, 0.636]


def test_backprop_uses_weights_before_the_update():
    # dz^2/da^1 is the output layer's weight matrix before the step: w_11^2 = 0.6 and w_21^2 = 0.5,
    # not the updated 0.604 and 0.491 the notes plug in.
    with jax.enable_x64(True):
        p = notes_params(jnp.float64)[1]
        a1 = jnp.asarray(worked_example(x=X_FORWARD)["layers"][0]["a"])
        jac = jax.jacobian(lambda a: a @ p["w"] + p["b"])(a1)  # jac[i, j] = dz_i^2/da_j^1
    assert float(jac[0, 0]) == pytest.approx(0.6, abs=1e-15)
    assert float(jac[1, 0]) == pytest.approx(0.5, abs=1e-15)

    # The notes' formula for dC/dw_11^1 with the right weights gives the autodiff gradient;
    # with the updated weights it gives 0.00321 instead of 0.00336.
    r = worked_example(x=X_FORWARD)
    (a11, _), (a12, a22) = r["layers"][0]["a"], r["layers"][1]["a"]
    t1, t2 = NOTES_TARGET

    def notes_formula(w11, w21):
        back = w11 * a12 * (1 - a12) * (a12 - t1) + w21 * a22 * (1 - a22) * (a22 - t2)
        return 0.5 * a11 * (1 - a11) * back

    assert notes_formula(0.6, 0.5) == pytest.approx(r["grads"][0]["w"][0][0], rel=1e-12)
    assert notes_formula(0.604, 0.491) == pytest.approx(0.00320, abs=5e-6)
    assert abs(notes_formula(0.604, 0.491) - r["grads"][0]["w"][0][0]) > 1e-4


def test_dC_dw21_output_uses_a_1_not_a_2():
    # The notes' update formula for w_21^2 writes a_2^1 but plugs in 0.646 = a_1^1, which is right:
    # w_21^2 connects hidden neuron 1 to output neuron 2.
    r = worked_example(x=X_FORWARD)
    delta_2 = r["grads"][1]["b"][1]
    assert r["grads"][1]["w"][1][0] == pytest.approx(delta_2 * r["layers"][0]["a"][0], rel=1e-12)
    assert abs(r["grads"][1]["w"][1][0] - delta_2 * r["layers"][0]["a"][1]) > 1e-3


CASES = [
    (list(NOTES_X), list(NOTES_TARGET), NOTES_LR),
    (X_FORWARD, list(NOTES_TARGET), NOTES_LR),
    ([-1.5, 2.0, 0.25], [0.0, 1.0], 0.5),
    ([3.0, -2.0, 7.5], [1.0, 0.0], 2.0),
]


@pytest.mark.parametrize("x, target, lr", CASES)
def test_autodiff_equals_hand_written_chain_rule_float64(x, target, lr):
    got = worked_example(x=x, target=target, lr=lr, dtype=jnp.float64)
    _close(got, chain_rule(x, target, lr), rtol=1e-12)


@pytest.mark.parametrize("x, target, lr", CASES[:2])
def test_float32_agrees_with_float64(x, target, lr):
    # float32 has eps ~1.2e-7; a handful of operations on numbers of order 1 stay within 1e-6.
    got = worked_example(x=x, target=target, lr=lr, dtype=jnp.float32)
    _close(got, chain_rule(x, target, lr), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x", [list(NOTES_X), X_FORWARD])
def test_gradients_match_central_finite_differences(x):
    # Central differences in float64 with h = 1e-6: the truncation error is h^2/6 |C'''| ~ 1e-13 (the
    # third derivatives of this sigmoid network are of order 1 here), the rounding error about
    # 2 eps |C| / h ~ 1e-10 (|C| ~ 0.17). atol = 1e-8 is 100x above both and 1e5x below the
    # smallest gradient (~5e-4), so a wrong gradient cannot pass.
    h = 1e-6
    r = worked_example(x=x, dtype=jnp.float64)
    with jax.enable_x64(True):
        model = network(jnp.float64)
        flat, unravel = ravel_pytree(notes_params(jnp.float64))
        xs, t = jnp.asarray(x, jnp.float64), jnp.asarray(NOTES_TARGET, jnp.float64)
        loss = jax.jit(lambda v: half_sum_squares(model.apply(unravel(v), xs), t))
        eye = np.eye(flat.size)
        fd = np.array([(loss(flat + h * e) - loss(flat - h * e)) / (2 * h) for e in eye])
        grads = [{"w": jnp.asarray(g["w"]).T, "b": jnp.asarray(g["b"])} for g in r["grads"]]
        ad = np.asarray(ravel_pytree(grads)[0])
        assert float(np.min(np.abs(ad))) > 1e-4
        np.testing.assert_allclose(ad, fd, rtol=0, atol=1e-8)
    if x == X_FORWARD:  # jax's own checker (first order, reverse mode) agrees too
        with jax.enable_x64(True):
            jax.test_util.check_grads(loss, (flat,), order=1, modes=["rev"])


def test_step_is_sgd_and_library_step_agrees():
    r = worked_example(x=X_FORWARD, lr=0.3, dtype=jnp.float64)
    for p, g, u in zip(r["params"], r["grads"], r["updated"]):
        np.testing.assert_allclose(u["w"], np.array(p["w"]) - 0.3 * np.array(g["w"]), rtol=0, atol=1e-15)
        np.testing.assert_allclose(u["b"], np.array(p["b"]) - 0.3 * np.array(g["b"]), rtol=0, atol=1e-15)
    # The final activations are what jaxnet's mlp computes with the notes' weights.
    with jax.enable_x64(True):
        y = network(jnp.float64).apply(notes_params(jnp.float64), jnp.asarray(X_FORWARD))
    np.testing.assert_allclose(np.asarray(y), r["layers"][-1]["a"], rtol=1e-15)
    # and the library's compiled float32 step moves the weights the same way
    net = network(jnp.float32)
    opt = optax.sgd(0.3)
    step = jax.jit(make_update(net, "half_sse", opt))
    state, metrics = step(
        init_state(net.init(jax.random.key(0)), opt, jax.random.key(1)),
        (jnp.asarray([X_FORWARD]), jnp.asarray([NOTES_TARGET])),
    )
    assert float(metrics["loss"]) == pytest.approx(r["loss"], rel=1e-6)
    for p, u in zip(state.params, r["updated"]):
        np.testing.assert_allclose(np.asarray(p["w"]).T, u["w"], rtol=1e-6, atol=1e-7)


def test_params_layout_w_jk_is_w_kj_in_dense_params():
    params = notes_params()
    assert [p["w"].shape for p in params] == [(3, 2), (2, 2)]
    assert float(params[0]["w"][2, 0]) == pytest.approx(0.5)  # w_13^1: input 3 -> hidden neuron 1
    assert float(params[0]["w"][0, 1]) == pytest.approx(0.4)  # w_21^1: input 1 -> hidden neuron 2
    assert float(params[1]["w"][1, 0]) == pytest.approx(0.1)  # w_12^2: hidden 2 -> output 1
    expected = jax.eval_shape(mlp([3, 2, 2]).init, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(expected)


def test_result_is_json_ready_with_the_issue_layout():
    r = worked_example()
    assert json.loads(json.dumps(r)) == r
    assert set(r) == {"x", "target", "lr", "layers", "loss", "params", "grads", "updated"}
    assert [len(layer["z"]) for layer in r["layers"]] == [2, 2]
    for key in ("params", "grads", "updated"):
        assert [np.shape(layer["w"]) for layer in r[key]] == [(2, 3), (2, 2)]  # w[j][k]
        assert [len(layer["b"]) for layer in r[key]] == [2, 2]


def test_text_uses_the_notes_notation_and_values():
    r = worked_example(x=X_FORWARD)
    text = format_worked_example(r)
    assert "z_1^1 = 0.1*0.5 + 0.2*0.5 + 0.5*0.5 + 0.2 = 0.6" in text
    assert "a_2^1 = sigma(z_2^1) = 0.668188" in text
    names = re.findall(r"(w_\d\d\^\d|b_\d\^\d)' = .* = (\S+)$", text, flags=re.M)
    assert len(names) == 6 + 2 + 4 + 2  # every weight and bias, updated
    got = dict(names)
    assert float(got["w_11^2"]) == pytest.approx(r["updated"][1]["w"][0][0], rel=1e-5)
    assert float(got["w_21^2"]) == pytest.approx(r["updated"][1]["w"][1][0], rel=1e-5)
    assert float(got["b_2^1"]) == pytest.approx(r["updated"][0]["b"][1], rel=1e-5)
    grads = dict(re.findall(r"(dC/dw_\d\d\^\d) = \S+ = (\S+)", text))
    assert len(grads) == 10
    assert float(grads["dC/dw_11^1"]) == pytest.approx(r["grads"][0]["w"][0][0], rel=1e-5)


def test_sigma_reference_is_the_logistic():
    assert sigma(0.6) == pytest.approx(0.6456563062, abs=1e-10)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"x": [0.5, 0.5]}, ValueError, "x must have 3 numbers"),
        ({"x": [[0.5, 0.5, 0.5]]}, ValueError, "x must have 3 numbers"),
        ({"x": [0.5, float("nan"), 0.5]}, ValueError, "x must be finite"),
        ({"x": [0.5, 0.5, float("inf")]}, ValueError, "x must be finite"),
        ({"x": "0.5 0.5 0.5"}, TypeError, "x must be 3 numbers"),
        ({"x": [0.5, "a", 0.5]}, TypeError, "x must be 3 numbers"),
        ({"x": [0.5, [1, 2], 0.5]}, ValueError, "x must be a flat list"),
        ({"target": [0.9]}, ValueError, "target must have 2 numbers"),
        ({"target": [0.9, -float("inf")]}, ValueError, "target must be finite"),
        ({"lr": 0.0}, ValueError, "lr must be greater than 0"),
        ({"lr": -0.1}, ValueError, "greater than 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
        ({"lr": "0.1"}, TypeError, "lr must be a number"),
        ({"lr": [0.1]}, TypeError, "lr must be a number"),
    ],
)
def test_bad_input_raises_with_a_clear_message(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        worked_example(**kwargs)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        worked_example(dtype=jnp.float16)


def test_check_inputs_defaults_are_the_notes():
    x, t, lr = check_inputs()
    assert x.tolist() == [0.5, 0.5, 0.1] and t.tolist() == [0.9, 0.1] and lr == 0.1
