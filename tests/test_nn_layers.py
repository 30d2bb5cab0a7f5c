"""Layers for images and sequences, each against an independent reference: a NumPy loop written
from the definition, and PyTorch's layer on the same weights where PyTorch is installed."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import Context, apply_batch
from jaxnet import layers as L

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _same_pads(size, kernel, stride, dilation):
    """TensorFlow's SAME padding: output ceil(size / stride), the odd cell at the end."""
    span = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _conv_reference(x, w, b, stride, pads, dilation, groups):
    """Cross-correlation of one example (*spatial, c) by a loop over output cells and taps."""
    nd = x.ndim - 1
    x = np.pad(x, [*pads, (0, 0)])
    kernel, (c_group, out) = w.shape[:nd], w.shape[nd:]
    sizes = [(x.shape[a] - (kernel[a] - 1) * dilation[a] - 1) // stride[a] + 1 for a in range(nd)]
    y = np.zeros((*sizes, out), np.float64)
    per_group = out // groups
    for cell in itertools.product(*map(range, sizes)):
        for o in range(out):
            g = o // per_group
            total = b[o]
            for tap in itertools.product(*map(range, kernel)):
                where = tuple(cell[a] * stride[a] + tap[a] * dilation[a] for a in range(nd))
                total += np.dot(x[where][g * c_group : (g + 1) * c_group], w[tap][:, o])
            y[cell + (o,)] = total
    return y


CONV_CASES = [  # between them: SAME, VALID, ints, pairs; strides, dilations, groups; 1-D and 2-D
    pytest.param(2, dict(stride=2), marks=pytest.mark.slow),
    (2, dict(groups=2, stride=(1, 2), padding=1, dilation=2)),
    pytest.param(2, dict(padding=((0, 2), (1, 0)), kernel=(2, 3)), marks=pytest.mark.slow),
    (1, dict(stride=3)),
    (1, dict(groups=4, dilation=3, padding=(2, 1))),
]


@pytest.mark.parametrize("ndim,options", CONV_CASES)
def test_conv_matches_a_loop_over_its_definition(ndim, options):
    options = dict(options)
    kernel = options.pop("kernel", 3)
    layer = L.conv(4, 8, kernel, ndim=ndim, **options)
    params = layer.init(jax.random.key(1))
    params["b"] = jnp.asarray(_normal(8))
    x = _normal(*(9,) * ndim, 4)
    k = L._tuple(kernel, ndim, "k")
    stride, dilation = L._tuple(options.get("stride", 1), ndim, "s"), L._tuple(options.get("dilation", 1), ndim, "d")
    padding = L._padding(options.get("padding", "SAME"), ndim)
    if padding == "SAME":
        padding = [_same_pads(9, k[a], stride[a], dilation[a]) for a in range(ndim)]
    elif padding == "VALID":
        padding = [(0, 0)] * ndim
    want = _conv_reference(x, np.asarray(params["w"]), np.asarray(params["b"]), stride, padding, dilation,
                           options.get("groups", 1))  # fmt: skip
    got = jax.jit(layer.apply)(params, x)  # on CPU: the shifted-slices path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    layout = (stride, L._padding(options.get("padding", "SAME"), ndim), dilation, options.get("groups", 1))
    library = np.asarray(L._conv_by_library(jnp.asarray(x), params["w"], layout)) + np.asarray(params["b"])  # GPU path
    np.testing.assert_allclose(library, want, rtol=1e-5, atol=1e-5)


def test_conv_gradients_of_both_paths_agree():
    layer = L.conv2d(3, 5, 3, stride=2, dilation=1, padding="SAME")
    params, x = layer.init(jax.random.key(0)), jnp.asarray(_normal(7, 7, 3))
    layout = ((2, 2), "SAME", (1, 1), 1)
    g_shift = jax.grad(lambda w: jnp.sum(jnp.sin(L._conv_by_shifts(x, w, layout))))(params["w"])
    g_lib = jax.grad(lambda w: jnp.sum(jnp.sin(L._conv_by_library(x, w, layout))))(params["w"])
    np.testing.assert_allclose(g_shift, g_lib, rtol=1e-4, atol=1e-5)


def _pool_reference(x, window, stride, reduce):
    sizes = [(x.shape[a] - window[a]) // stride[a] + 1 for a in range(x.ndim - 1)]
    y = np.zeros((*sizes, x.shape[-1]))
    for cell in itertools.product(*map(range, sizes)):
        block = x[tuple(slice(c * s, c * s + w) for c, s, w in zip(cell, stride, window))]
        y[cell] = reduce(block.reshape(-1, x.shape[-1]), axis=0)
    return y


@pytest.mark.parametrize("window,stride", [(2, None), (3, 2), ((2, 3), (1, 2))])
def test_pooling_matches_a_loop(window, stride):
    x = _normal(8, 9, 3)
    w, s = L._tuple(window, 2, "w"), L._tuple(stride or window, 2, "s")
    np.testing.assert_allclose(L.max_pool(window, stride).apply({}, x), _pool_reference(x, w, s, np.max), rtol=1e-6)
    np.testing.assert_allclose(L.avg_pool(window, stride).apply({}, x), _pool_reference(x, w, s, np.mean), rtol=1e-5)
    seq = _normal(10, 2)
    got = L.max_pool(3, 2, ndim=1).apply({}, seq)
    np.testing.assert_allclose(got, _pool_reference(seq, (3,), (2,), np.max), rtol=1e-6)


def test_global_pools_flatten_and_reshape():
    x = _normal(4, 5, 3)
    np.testing.assert_allclose(L.global_avg_pool().apply({}, x), x.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(L.global_max_pool().apply({}, x), x.max(axis=(0, 1)))
    assert L.flatten().apply({}, x).shape == (60,)
    np.testing.assert_array_equal(L.reshape((8, 8, 1)).apply({}, np.arange(64.0)), np.arange(64.0).reshape(8, 8, 1))


def _bn_forward(layer, params, state, x, weight=None, train=True):
    return jax.jit(lambda p, s, x, w: apply_batch(layer, p, s, x, train=train, weight=w))(params, state, x, weight)


def test_batch_norm_uses_the_batch_in_training_and_running_statistics_in_eval():
    layer = L.batch_norm(3, momentum=0.8)
    params, state = layer.init(jax.random.key(0))
    params = {"scale": jnp.asarray([1.0, 2.0, 0.5]), "bias": jnp.asarray([0.0, 1.0, -1.0])}
    x = _normal(6, 4, 4, 3) * 3 + 1  # 6 examples of 4x4x3: statistics over examples and pixels
    y, new = _bn_forward(layer, params, state, x)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.8 + 0.2 * var, rtol=1e-5)
    y_eval, same = _bn_forward(layer, params, new, x, train=False)
    mean, var, scale, bias = (np.asarray(a) for a in (new["mean"], new["var"], params["scale"], params["bias"]))
    want_eval = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(y_eval, want_eval, rtol=1e-4, atol=1e-4)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, new))


def test_batch_norm_leaves_padding_examples_out_of_its_statistics():
    layer = L.batch_norm(2, momentum=0.0)  # the running statistics become the batch's
    params, state = layer.init(jax.random.key(0))
    x = _normal(5, 2)
    x[3:] = 1e3  # padding rows of extreme values
    _, new = _bn_forward(layer, params, state, x, jnp.asarray([1.0, 1, 1, 0, 0]))
    np.testing.assert_allclose(new["mean"], x[:3].mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], x[:3].var(0), rtol=1e-4)


def test_batch_norm_refuses_a_single_example_without_the_batch():
    layer = L.batch_norm(2)
    params, state = layer.init(jax.random.key(0))
    with pytest.raises(ValueError, match="whole batch"):
        layer.apply(params, state, jnp.ones(2), Context(train=True))


def test_dropout_zeroes_a_fraction_and_scales_the_rest_only_in_training():
    layer = L.dropout(0.25)
    x = jnp.ones((400, 50))
    y, _ = jax.jit(lambda x, k: apply_batch(layer, {}, {}, x, train=True, key=k))(x, jax.random.key(3))
    kept = np.asarray(y) != 0
    assert 0.72 < kept.mean() < 0.78
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert not np.array_equal(kept[0], kept[1])  # each example draws its own mask
    y_eval, _ = apply_batch(layer, {}, {}, x)
    np.testing.assert_array_equal(y_eval, x)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        layer.apply({}, {}, jnp.ones(3), Context(train=True))
    with pytest.raises(ValueError, match="rate"):
        L.dropout(1.0)


def test_layer_norm_embedding_and_residual():
    x = _normal(5, 6)
    layer = L.layer_norm(6)
    params = {"scale": jnp.arange(1.0, 7.0), "bias": jnp.full((6,), 0.5)}
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * np.arange(1, 7) + 0.5
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-4, atol=1e-5)
    table = L.embedding(10, 4)
    p = table.init(jax.random.key(0))
    ids = jnp.asarray([3, 0, 9])
    np.testing.assert_array_equal(table.apply(p, ids), np.asarray(p["table"])[[3, 0, 9]])
    assert np.isnan(table.apply(p, jnp.asarray([10]))).all()  # never a silently clamped row
    with pytest.raises(TypeError, match="integers"):
        table.apply(p, jnp.ones(2))
    block = L.residual(L.dense(6, 6, "tanh"))
    q = block.init(jax.random.key(1))
    w, b = np.asarray(q[0]["w"]), np.asarray(q[0]["b"])
    np.testing.assert_allclose(block.apply(q, x[0]), x[0] + np.tanh(x[0] @ w + b), rtol=1e-5)


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attention_reference(p, x, heads, causal):
    """Self-attention by a loop over heads and positions."""
    length, dim = x.shape
    head = dim // heads
    q, k, v = (x @ np.asarray(p[n]["w"]) + np.asarray(p[n]["b"]) for n in "qkv")
    out = np.zeros_like(x, dtype=np.float64)
    for h in range(heads):
        cols = slice(h * head, (h + 1) * head)
        for i in range(length):
            visible = i + 1 if causal else length
            weights = _softmax(q[i, cols] @ k[:visible, cols].T / np.sqrt(head))
            out[i, cols] = weights @ v[:visible, cols]
    return out @ np.asarray(p["o"]["w"]) + np.asarray(p["o"]["b"])


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_a_loop(causal):
    layer = L.multi_head_attention(8, 2, causal=causal)
    params = layer.init(jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(_normal(*a.shape)), params)  # non-zero biases
    x = _normal(5, 8)
    np.testing.assert_allclose(layer.apply(params, x), _attention_reference(params, x, 2, causal), rtol=1e-4, atol=1e-5)
    if causal:  # the first position sees only itself: changing later ones leaves it as it was
        x2 = x.copy()
        x2[1:] += 1
        np.testing.assert_allclose(layer.apply(params, x2)[0], layer.apply(params, x)[0], rtol=1e-6)


def test_transformer_block_is_its_two_residual_branches():
    block = L.transformer_block(8, 2, 16, causal=True)
    params = block.init(jax.random.key(0))
    x = _normal(4, 8)
    (ln1, attn), (ln2, up, down) = params

    def norm(a, p):
        scale, bias = np.asarray(p["scale"]), np.asarray(p["bias"])
        return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5) * scale + bias

    h = x + _attention_reference(attn, norm(x, ln1), 2, True)
    hidden = np.asarray(jax.nn.gelu(norm(h, ln2) @ np.asarray(up["w"]) + np.asarray(up["b"])))
    want = h + hidden @ np.asarray(down["w"]) + np.asarray(down["b"])
    np.testing.assert_allclose(block.apply(params, x), want, rtol=1e-4, atol=1e-4)
    assert isinstance(L.transformer_block(8, 2, 16, dropout_rate=0.1), L.StatefulModel)


def test_serial_of_stateful_layers_threads_state_and_folds_keys():
    net = L.serial(L.dense(3, 4), L.batch_norm(4), L.dropout(0.5), L.dense(4, 2))
    assert isinstance(net, L.StatefulModel)
    params, state = net.init(jax.random.key(0))
    assert [type(s).__name__ for s in state] == ["dict"] * 4 and set(state[1]) == {"mean", "var"}
    x = jnp.asarray(_normal(16, 3))
    y, new = apply_batch(net, params, state, x, train=True, key=jax.random.key(1))
    assert y.shape == (16, 2) and not np.allclose(new[1]["mean"], 0)
    y1, _ = apply_batch(net, params, state, x, train=True, key=jax.random.key(1))
    np.testing.assert_array_equal(y, y1)  # the same key, the same masks
    y_eval, _ = apply_batch(net, params, new, x)
    y_eval2, _ = apply_batch(net, params, new, x)
    np.testing.assert_array_equal(y_eval, y_eval2)  # eval mode: deterministic


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by groups"):
        L.conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding"):
        L.conv2d(3, 4, 3, padding="FULL")
    with pytest.raises(ValueError, match="kernel_size needs 2"):
        L.conv2d(3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        L.multi_head_attention(10, 3)
    with pytest.raises(ValueError, match="expected one example"):
        L.conv2d(1, 2, 3).apply(L.conv2d(1, 2, 3).init(jax.random.key(0)), jnp.ones((4, 8, 8, 1)))


def _torch():
    return pytest.importorskip("torch")


def test_conv_and_pool_match_pytorch():
    torch = _torch()
    layer = L.conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    params = layer.init(jax.random.key(0))
    x = _normal(9, 9, 4)
    ref = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(params["w"]).transpose(3, 2, 0, 1).copy()))
        ref.bias.zero_()
        want = ref(torch.from_numpy(x.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
        pooled = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(2, 0, 1))[None], 3, 2)
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.max_pool(3, 2).apply({}, x), pooled[0].numpy().transpose(1, 2, 0), rtol=1e-6)


def test_batch_norm_matches_pytorch_in_training():
    torch = _torch()
    layer = L.batch_norm(3, momentum=0.9)
    params, state = layer.init(jax.random.key(0))
    x = _normal(8, 5, 5, 3)
    ref = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
    ref.train()
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    y, new = _bn_forward(layer, params, state, x)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    n = 8 * 5 * 5  # PyTorch keeps the unbiased variance; jaxnet the biased one (as Flax and Equinox)
    biased = (ref.running_var.numpy() - 0.9) * (n - 1) / n + 0.9
    np.testing.assert_allclose(new["var"], biased, rtol=1e-4)


def test_attention_matches_pytorch():
    torch = _torch()
    layer = L.multi_head_attention(8, 2, causal=True)
    params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(_normal(*a.shape)), layer.init(jax.random.key(0)))
    x = _normal(5, 8)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.from_numpy(np.concatenate([np.asarray(params[n]["w"]).T for n in "qkv"]).copy()))
        ref.in_proj_bias.copy_(torch.from_numpy(np.concatenate([np.asarray(params[n]["b"]) for n in "qkv"])))
        ref.out_proj.weight.copy_(torch.from_numpy(np.asarray(params["o"]["w"]).T.copy()))
        ref.out_proj.bias.copy_(torch.from_numpy(np.array(params["o"]["b"])))
        t = torch.from_numpy(x)[None]
        mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
        want = ref(t, t, t, attn_mask=mask, need_weights=False)[0][0].numpy()
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-4, atol=1e-5)
