"""The GPT (jaxnet.lm) against a float64 NumPy forward pass, and cached generation
(jaxnet.decoding) against re-running the model on the whole prefix for every token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import layers as L
from jaxnet.base import Context
from jaxnet.lm import _rope

V, C = 23, 12


def _small(**options):
    return jn.gpt(V, C, layers=2, heads=2, dim=16, **{"bias": True, **options})


def _apply(net, params, ids):
    return net.apply(params, {}, jnp.asarray(ids, jnp.int32), Context(train=False))[0]


def _norm(x, p):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]


def _reference(params, ids, heads):
    """GPT-2's forward pass in float64 NumPy, one loop per head and position."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["table"][ids] + p["pos"]["table"][: len(ids)]
    layers = len(p["blocks"]["ln1"]["scale"])  # stacked: a leading axis of the layers
    for b in (jax.tree.map(lambda a: a[i], p["blocks"]) for i in range(layers)):
        h = _norm(x, b["ln1"])
        q, k, v = (h @ b["attn"][n]["w"] + b["attn"][n]["b"] for n in "qkv")
        width = x.shape[1] // heads
        out = np.zeros_like(x)
        for head in range(heads):
            cols = slice(head * width, (head + 1) * width)
            for i in range(len(ids)):
                scores = q[i, cols] @ k[: i + 1, cols].T / math.sqrt(width)
                weights = np.exp(scores - scores.max())
                out[i, cols] = (weights / weights.sum()) @ v[: i + 1, cols]
        x = x + out @ b["attn"]["o"]["w"] + b["attn"]["o"]["b"]
        h = _norm(x, b["ln2"]) @ b["mlp"]["fc"]["w"] + b["mlp"]["fc"]["b"]
        gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        x = x + gelu @ b["mlp"]["proj"]["w"] + b["mlp"]["proj"]["b"]
    return _norm(x, p["ln_f"]) @ p["embed"]["table"].T


def _perturbed(params):
    """Params with every leaf moved off its initial value (non-zero biases, norms not at 1 and 0)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_the_gpt_equals_a_float64_numpy_forward_pass():
    net = _small()
    params = _perturbed(net.init(jax.random.key(0))[0])
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    np.testing.assert_allclose(_apply(net, params, ids), _reference(params, ids, heads=2), rtol=2e-4, atol=2e-5)


def test_attention_through_dot_product_attention_equals_the_einsum_it_replaced():
    def einsum_attention(params, x, heads, causal):  # multi_head_attention's apply until 0.1.0
        length, dim = x.shape
        q, k, v = (jnp.reshape(x @ params[n]["w"] + params[n]["b"][None], (length, heads, dim // heads)) for n in "qkv")
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim // heads)
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((1, length, length), bool)), scores, -jnp.inf)
        out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
        return jnp.reshape(out, (length, dim)) @ params["o"]["w"] + params["o"]["b"][None]

    x = jax.random.normal(jax.random.key(1), (7, 12))
    for causal in (False, True):
        layer = L.multi_head_attention(12, 3, causal=causal)
        params = _perturbed(layer.init(jax.random.key(0)))
        np.testing.assert_allclose(layer.apply(params, x), einsum_attention(params, x, 3, causal), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_on_the_cpu_equals_dot_product_attention_and_so_do_its_gradients(dtype):
    q, k, v = (jax.random.normal(key, (3, 9, 2, 8)).astype(dtype) for key in jax.random.split(jax.random.key(0), 3))
    segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(1), 0.2, (3, 9)), axis=-1)
    documents = ((segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((1, 9, 9), bool)))[:, None]
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == jnp.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    cases = [  # (q, k, v, options): causal, a documents mask, one sequence, one query over a cache
        ((q, k, v), {"causal": True}),
        ((q, k, v), {"mask": documents}),
        ((q, k, v), {}),
        ((q[0], k[0], v[0]), {"causal": True}),
        ((q[0, :1], k[0], v[0]), {"mask": (jnp.arange(9) <= 4)[None, None, :]}),
    ]
    for args, options in cases:

        def ours(q, k, v, options=options):  # what the CPU runs: the heads-first einsums
            out = L._heads_first_attention(q, k, v, options.get("causal", False), options.get("mask"))
            return jnp.sum(jnp.sin(out).astype(jnp.float32))

        def reference(q, k, v, options=options):
            causal, mask = options.get("causal", False), options.get("mask")
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, mask=mask)
            return jnp.sum(jnp.sin(out).astype(jnp.float32))

        found = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(*args)  # compiled: op by op takes 3x longer
        expected = jax.jit(jax.value_and_grad(reference, (0, 1, 2)))(*args)
        for a, b in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.float32(a), np.float32(b), **tolerance)
        picked = L.attention(*args, **options)  # on the CPU, attention picks the heads-first einsums
        np.testing.assert_array_equal(picked, L._heads_first_attention(*args, options.get("causal", False),
                                                                       options.get("mask")))  # fmt: skip


def test_gpt2_initialization():
    layers, dim = 4, 64
    params, state = jn.gpt(500, 32, layers=layers, heads=4, dim=dim, bias=True).init(jax.random.key(0))
    assert state == {}
    stds = {
        "embed": np.std(params["embed"]["table"]),
        "q": np.std(params["blocks"]["attn"]["q"]["w"]),
        "o": np.std(params["blocks"]["attn"]["o"]["w"]),
        "proj": np.std(params["blocks"]["mlp"]["proj"]["w"]),
    }
    np.testing.assert_allclose(stds["embed"], 0.02, rtol=0.03)
    np.testing.assert_allclose(stds["q"], 0.02, rtol=0.03)
    np.testing.assert_allclose(stds["o"], 0.02 / math.sqrt(2 * layers), rtol=0.05)
    np.testing.assert_allclose(stds["proj"], 0.02 / math.sqrt(2 * layers), rtol=0.05)
    assert params["blocks"]["attn"]["q"]["w"].shape == (layers, dim, dim)  # stacked blocks
    assert not np.any(params["blocks"]["attn"]["q"]["b"])
    assert "head" not in params  # tied to the token embedding
    plain, _ = jn.gpt(500, 32, layers=1, heads=4, dim=dim).init(jax.random.key(0))  # nanoGPT's default: no biases
    assert plain["blocks"]["attn"]["q"].keys() == {"w"} and plain["ln_f"].keys() == {"scale"}


def test_decay_mask_decays_matrices_but_not_norms_biases_or_embeddings():
    params, _ = jn.gpt(V, C, layers=1, heads=2, dim=8, tie_embeddings=False, bias=True).init(jax.random.key(0))
    mask = jn.decay_mask(params)
    assert mask["blocks"]["attn"]["q"] == {"w": True, "b": False}
    assert mask["blocks"]["ln1"] == {"scale": False, "bias": False}  # (layers, dim) each: not matrices
    assert mask["embed"] == {"table": False} and mask["pos"] == {"table": False} and mask["head"] == {"w": True}
    opt = optax.adamw(0.1, weight_decay=0.5, mask=jn.decay_mask)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    assert not np.any(updates["embed"]["table"]) and np.any(updates["blocks"]["attn"]["q"]["w"])


def test_rope_scores_depend_on_the_distance_alone():
    q = jax.random.normal(jax.random.key(0), (1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 8))

    def score(i, j):
        return float(jnp.sum(_rope(q, jnp.array([i])) * _rope(k, jnp.array([j]))))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def _next_token(net):
    """``next(params, ids) -> id``: the argmax after ``ids`` (at most C) from the whole sequence's
    forward pass (padded to C, compiled once: causal attention keeps the padding out of it)."""
    forward = jax.jit(lambda params, window: _apply(net, params, window))

    def next_token(params, ids):
        window = np.zeros(C, np.int32)
        window[: len(ids)] = ids
        return int(jnp.argmax(forward(params, window)[len(ids) - 1]))

    return next_token


def _greedy_uncached(net, params, prompt, steps):
    """Greedy decoding that re-runs the model on the whole sequence for every token."""
    ids, next_token = list(prompt), _next_token(net)
    for _ in range(steps):
        ids.append(next_token(params, ids))
    return np.array(ids[len(prompt) :])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_greedy_decoding_equals_rerunning_the_prefix(positions):
    net = _small(positions=positions)
    params = _perturbed(net.init(jax.random.key(0))[0])
    prompt = np.array([4, 8, 15])
    out = jn.generate(net, params, prompt, C - len(prompt), key=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(out, _greedy_uncached(net, params, prompt, C - len(prompt)))


def test_past_the_context_the_window_slides_by_half_a_context():
    net = _small()
    params = _perturbed(net.init(jax.random.key(0))[0])
    prompt, steps = np.array([1, 2, 3, 4, 5]), 3 * C
    out = jn.generate(net, params, prompt, steps, key=jax.random.key(0), temperature=0)
    ids, start = list(prompt), 0  # the documented rule: the model sees the tokens since the last slide
    next_token = _next_token(net)
    for _ in range(steps):
        if len(ids) - start > C:
            start = len(ids) - C // 2
        ids.append(next_token(params, ids[start:]))
    np.testing.assert_array_equal(out, np.array(ids[len(prompt) :]))


def test_sampling_options():
    net = _small()
    params = _perturbed(net.init(jax.random.key(0))[0])
    prompt, key = np.array([7]), jax.random.key(3)
    greedy = jn.generate(net, params, prompt, 8, key=key, temperature=0)
    np.testing.assert_array_equal(jn.generate(net, params, prompt, 8, key=key, top_k=1), greedy)
    np.testing.assert_array_equal(jn.generate(net, params, prompt, 8, key=key, top_p=1e-6), greedy)
    a = jn.generate(net, params, prompt, 20, key=key, temperature=1.5)
    np.testing.assert_array_equal(a, jn.generate(net, params, prompt, 20, key=key, temperature=1.5))
    assert not np.array_equal(a, jn.generate(net, params, prompt, 20, key=jax.random.key(4), temperature=1.5))
    seen = []
    out = jn.generate(net, params, prompt, 6, key=key, top_k=5, on_token=seen.append)
    assert [int(t) for t in seen] == out.tolist()


def test_bad_generation_arguments_name_the_argument():
    net = _small()
    params, _ = net.init(jax.random.key(0))
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="model"):
        jn.generate(jn.mlp([2, 2]), params, np.array([1]), 3, key=key)
    with pytest.raises(ValueError, match="prompt_ids"):
        jn.generate(net, params, np.array([V]), 3, key=key)
    with pytest.raises(ValueError, match="top_p"):
        jn.generate(net, params, np.array([1]), 3, key=key, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jn.generate(net, params, np.array([1]), 0, key=key)


def test_a_gpt_with_dropout_trains_through_fit():
    rng = np.random.default_rng(0)
    text = np.tile(np.arange(V, dtype=np.int32), 40)  # a cycle: each token predicts the next
    starts = rng.integers(0, len(text) - C - 1, 128)
    x = np.stack([text[s : s + C] for s in starts])
    y = np.stack([text[s + 1 : s + C + 1] for s in starts])
    net = _small(dropout=0.1)
    params, state = net.init(jax.random.key(0))
    result = jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.adamw(3e-3, mask=jn.decay_mask),
        epochs=15, batch_size=16, key=jax.random.key(1), model_state=state, validation=(x[:32], y[:32]),
    )  # fmt: skip
    assert result.history[0]["train_loss"] > 2.0 and result.history[-1]["val_loss"] < 0.2


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_a_batch_in_one_call_equals_each_sequence_alone(positions):
    net = _small(positions=positions)
    params = _perturbed(net.init(jax.random.key(0))[0])
    ids = jax.random.randint(jax.random.key(1), (3, C), 0, V)
    whole = net.apply(params, {}, ids, Context(train=False))[0]
    assert net.batched and whole.shape == (3, C, V)
    for i in range(3):
        np.testing.assert_allclose(whole[i], _apply(net, params, ids[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_attention_never_crosses_a_document_with_an_eot_id(positions):
    eot = V - 1
    net = _small(positions=positions, eot=eot)
    params = _perturbed(net.init(jax.random.key(0))[0])
    first, second = [3, 1, 4, 1, 5], [eot, 2, 6, 5, 3, 5]
    ids = np.array(first + second)
    other = np.array([7, 7, 2, 8, 9] + second)  # another first document: the second's logits stay
    logits, again = _apply(net, params, ids), _apply(net, params, other)
    np.testing.assert_allclose(logits[5:], again[5:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[:5], again[:5])
    if positions == "rope":  # relative positions only: the document alone gives the same logits
        np.testing.assert_allclose(logits[5:], _apply(net, params, np.array(second)), rtol=1e-5, atol=1e-5)
    plain = _small(positions=positions)  # without the eot id, attention crosses
    assert not np.allclose(_apply(plain, params, ids)[5:], _apply(plain, params, other)[5:])


def test_a_prompt_is_read_from_its_last_eot():
    from jaxnet.decoding import prompt_window

    window, length = prompt_window(np.array([1, 2, 9, 3, 4, 9, 5]), 8, 10, eot=9)
    assert length == 2 and window[:2].tolist() == [9, 5]
    window, length = prompt_window(np.array([1, 2, 9, 3]), 8, 10)
    assert length == 4
