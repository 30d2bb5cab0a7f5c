"""A GPT from jaxnet's layers: a decoder-only transformer over token ids, and its cached decoding.

:func:`gpt` is a model like any other (``apply`` takes one sequence ``(T,)`` of ids and returns
``(T, V)`` logits), so ``fit``, members, streaming and the loggers train it as they train an MLP.
It is GPT-2's architecture as nanoGPT writes it: token (and learned position) embeddings, ``layers``
pre-norm blocks of causal self-attention and a GELU MLP of width ``4 * dim``, a final layer norm
and a head tied to the token embedding (``tie_embeddings``); or rotary position embeddings
(``positions="rope"``, RoFormer) instead of learned ones. Initialization is GPT-2's: every weight
normal with std 0.02, the two residual projections of each block (``attn/o``, ``mlp/proj``) with
std ``0.02 / sqrt(2 * layers)``, biases zero, layer norms one and zero.

The params are a plain pytree whose paths name what they are (``blocks/attn/q/w``), so that
weight decay, freezing and sharding rules can select them by path. The blocks' params are stacked
(every leaf under ``blocks`` has a leading axis of the layers), and the blocks run as one
``lax.scan``: compile time does not grow with depth, and ``remat`` then keeps only each block's
input for the backward pass. :func:`decay_mask` is
minGPT's ``configure_optimizers`` choice: decay the matrices, not biases, norms or embeddings
(nanoGPT's decays every array of two or more dimensions, the embeddings too).

For generation (:func:`jaxnet.generate`) the model's ``apply`` (a :class:`GPT`) also carries
``prefill`` and ``decode``, which fill and extend a cache of the attention's keys and values, so
that each new token costs one position's work instead of the whole prefix's.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxnet import _checks as checks
from jaxnet.base import Context, Params, PRNGKey, StatefulModel
from jaxnet.layers import REMAT, attention, dense, embedding, layer_norm, rematted

POSITIONS = ("learned", "rope")
STD = 0.02


class GPTConfig(NamedTuple):
    """A GPT's sizes: ``vocab_size`` V, ``context`` (the most tokens it attends over), ``layers``,
    ``heads`` and ``dim`` (the width; ``dim / heads`` per head), ``dropout`` (on the embeddings and
    after each residual branch, in training), ``tie_embeddings`` and ``positions``."""

    vocab_size: int
    context: int
    layers: int
    heads: int
    dim: int
    dropout: float = 0.0
    tie_embeddings: bool = True
    positions: str = "learned"
    bias: bool = False
    eot: int | None = None
    remat: str = "none"


class Cache(NamedTuple):
    """The keys and values of every layer for ``context`` positions, ``(layers, C, heads, dim /
    heads)`` each, and ``length``: how many positions hold a token."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


def _check_config(c: GPTConfig) -> GPTConfig:
    for name in ("vocab_size", "context", "layers", "heads", "dim"):
        checks.integer(name, getattr(c, name))
    if c.dim % c.heads:
        raise ValueError(f"dim {c.dim} must be divisible by heads {c.heads}")
    if c.positions == "rope" and (c.dim // c.heads) % 2:
        raise ValueError(f"positions='rope' needs an even width per head, got dim / heads = {c.dim // c.heads}")
    checks.choice("positions", c.positions, POSITIONS)
    checks.choice("remat", c.remat, REMAT)  # the policies of jaxnet.layers.rematted
    checks.number("dropout", c.dropout, minimum=0.0)
    if c.dropout >= 1:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout!r}")
    if c.eot is not None:
        checks.integer("eot", c.eot, minimum=0, maximum=c.vocab_size - 1)  # an id of the vocabulary
    return c


def _normal(std: float) -> Callable:
    return jax.nn.initializers.normal(std)


def _init(c: GPTConfig) -> Callable[[PRNGKey], Params]:
    """GPT-2's initialization (see the module docstring)."""
    d = c.dim
    residual = STD / math.sqrt(2 * c.layers)
    linear = {name: dense(d, d, w_init=_normal(residual if name == "o" else STD)) for name in "qkvo"}
    fc, proj = dense(d, 4 * d, w_init=_normal(STD)), dense(4 * d, d, w_init=_normal(residual))
    norm = layer_norm(d)

    def biased(tree):  # without biases: drop the linear layers' "b" and the norms' "bias"
        return tree if c.bias else {k: v for k, v in tree.items() if k not in ("b", "bias")}

    def block(key):
        keys = jax.random.split(key, 6)
        attn = {name: biased(linear[name].init(k)) for name, k in zip("qkvo", keys[:4])}
        mlp = {"fc": biased(fc.init(keys[4])), "proj": biased(proj.init(keys[5]))}
        return {"ln1": biased(norm.init(key)), "attn": attn, "ln2": biased(norm.init(key)), "mlp": mlp}

    def init(key):
        keys = jax.random.split(key, c.layers + 3)
        params = {"embed": {"table": STD * jax.random.normal(keys[0], (c.vocab_size, d))}}
        if c.positions == "learned":
            params["pos"] = {"table": STD * jax.random.normal(keys[1], (c.context, d))}
        params["blocks"] = jax.vmap(block)(keys[3:])  # stacked: a leading axis of the layers
        params["ln_f"] = biased(norm.init(key))
        if not c.tie_embeddings:
            params["head"] = {"w": STD * jax.random.normal(keys[2], (d, c.vocab_size))}
        return params, {}

    return init


def _rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x`` ``(..., T, heads, h)`` at ``positions`` ``(T,)`` (RoFormer's
    pairs ``(x[i], x[i + h/2])`` rotated by ``position * 10000^(-2i/h)``)."""
    half = x.shape[-1] // 2
    frequencies = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * frequencies[None, :]  # (T, h/2)
    lead = (1,) * (x.ndim - 3)
    cos, sin = (jnp.reshape(f(angles), (*lead, angles.shape[0], 1, half)) for f in (jnp.cos, jnp.sin))
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


def _dropout(x: jax.Array, rate: float, ctx: Context | None, salt: int) -> jax.Array:
    if ctx is None or not ctx.train or rate == 0.0:
        return x
    if ctx.key is None:
        raise ValueError("gpt: dropout in training mode needs a PRNG key: train through jaxnet")
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _last(v: jax.Array, like: jax.Array) -> jax.Array:
    """``v`` ``(n,)`` shaped to broadcast over ``like``'s last axis (no implicit rank promotion)."""
    return jnp.reshape(v, (1,) * (like.ndim - 1) + v.shape)


def _linear(p: Params, x: jax.Array) -> jax.Array:
    """``x @ w (+ b)`` over the last axis of ``x``."""
    y = x @ p["w"]
    return y + _last(p["b"], y) if "b" in p else y


def _mlp(p: Params, x: jax.Array) -> jax.Array:
    hidden = jax.nn.gelu(_linear(p["fc"], x), approximate=True)  # GPT-2's tanh GELU
    return _linear(p["proj"], hidden)


def _projections(c: GPTConfig, p: Params, h: jax.Array, shape: tuple, positions: jax.Array):
    """Queries, keys and values ``(b, T, heads, dim / heads)`` of the normed input ``h`` ``(b * T, dim)``."""
    q, k, v = (jnp.reshape(_linear(p[n], h), (*shape, c.heads, c.dim // c.heads)) for n in "qkv")
    if c.positions == "rope":
        q, k = _rope(q, positions), _rope(k, positions)
    return q, k, v


def _norm(p: Params, x: jax.Array) -> jax.Array:
    """Layer normalization over the last axis (as :func:`jaxnet.layer_norm`), its bias optional."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + 1e-5)
    y = y * _last(p["scale"], y)
    return y + _last(p["bias"], y) if "bias" in p else y


def _embed(c: GPTConfig, params: Params, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Token (and learned position) embeddings of ``ids`` ``(..., T)``: ``(..., T, dim)``."""
    x = embedding(c.vocab_size, c.dim).apply(params["embed"], ids)
    if c.positions == "learned":
        table = params["pos"]["table"][positions]
        x = x + jnp.reshape(table, (1,) * (x.ndim - 2) + table.shape)
    return x


def _logits(c: GPTConfig, params: Params, x: jax.Array) -> jax.Array:
    x = _norm(params["ln_f"], x)
    head = params["embed"]["table"].T if c.tie_embeddings else params["head"]["w"]
    return x @ head


def _documents(c: GPTConfig, ids: jax.Array) -> jax.Array | None:
    """With an ``eot`` id: the attention mask ``(b, 1, T, T)`` that keeps each token to the earlier
    tokens of its own document (a document begins at its ``eot``, which ends the one before); None
    (plain causal attention) without."""
    if c.eot is None:
        return None
    segment = jnp.cumsum(ids == c.eot, axis=-1)  # (b, T)
    same = segment[:, :, None] == segment[:, None, :]
    causal = jnp.tril(jnp.ones((ids.shape[-1], ids.shape[-1]), bool))[None]
    return (same & causal)[:, None]


def _block(c: GPTConfig, p: Params, x, shape: tuple, positions, mask, ctx: Context | None, salt):
    """One block on ``x`` ``(b * T, dim)``: ``x + attention(ln1(x))``, then ``+ mlp(ln2(x))``."""
    q, k, v = _projections(c, p["attn"], _norm(p["ln1"], x), shape, positions)
    out = attention(q, k, v, causal=mask is None, mask=mask)  # (b, T, heads, h)
    attn = _linear(p["attn"]["o"], jnp.reshape(out, x.shape))
    x = x + _dropout(attn, c.dropout, ctx, 2 * salt + 1)
    x = x + _dropout(_mlp(p["mlp"], _norm(p["ln2"], x)), c.dropout, ctx, 2 * salt + 2)
    return x, (k, v)


def _blocks(c: GPTConfig, shape: tuple, ctx: Context | None) -> Callable:
    """The scan body of the blocks of a ``(b, T)`` batch (``shape``): ``((x, positions, mask), (p,
    i)) -> (carry, (k, v))`` for block ``i`` with params ``p``; under ``jax.checkpoint`` with
    ``c.remat``'s policy: ``"dots"`` keeps the matmul outputs and recomputes the rest (norms, GELU,
    softmax) in the backward pass, ``"full"`` keeps only each block's input."""

    def body(carry, layer):
        x, positions, mask = carry
        (p, i) = layer
        x, kv = _block(c, p, x, shape, positions, mask, ctx, i)
        return (x, positions, mask), kv

    return rematted(body, c.remat)


def _forward(c: GPTConfig, params: Params, ids: jax.Array, ctx: Context | None):
    """``(logits, (keys, values))`` of one sequence ``ids`` ``(T,)`` -> ``(T, V)``, ``(layers, T,
    heads, h)`` each; or of a batch ``(b, T)`` -> ``(b, T, V)``, ``(layers, b, T, heads, h)``. The
    tokens of a batch are one ``(b * T, dim)`` matrix for every projection: XLA's CPU backward runs
    such matmuls 1.5x faster than the ``(b, T, dim)`` ones of a vmapped sequence."""
    single = ids.ndim == 1
    batch = ids[None] if single else ids
    if batch.ndim != 2:
        raise ValueError(f"gpt: token ids (T,) or a batch of them (b, T), got shape {ids.shape}")
    (b, t), positions = batch.shape, jnp.arange(batch.shape[1])
    if t > c.context:
        raise ValueError(f"gpt: {t} tokens exceed the context of {c.context}")
    x = _dropout(jnp.reshape(_embed(c, params, batch, positions), (b * t, c.dim)), c.dropout, ctx, 0)
    layers = (params["blocks"], jnp.arange(c.layers))
    unroll = c.layers if c.remat == "none" else 1
    (x, _, _), kv = jax.lax.scan(_blocks(c, (b, t), ctx), (x, positions, _documents(c, batch)), layers, unroll=unroll)
    logits = jnp.reshape(_logits(c, params, x), (b, t, -1))
    return (logits[0], (kv[0][:, 0], kv[1][:, 0])) if single else (logits, kv)


def gpt(
    vocab_size: int,
    context: int,
    layers: int,
    heads: int,
    dim: int,
    *,
    dropout: float = 0.0,
    tie_embeddings: bool = True,
    positions: str = "learned",
    bias: bool = False,
    eot: int | None = None,
    remat: str = "none",
) -> StatefulModel:
    """A GPT language model: one sequence of ids ``(T,)`` (``T <= context``) -> next-token logits ``(T, V)``.

    Its ``apply`` also takes a batch ``(b, T)`` in one call, and the model is marked ``batched``,
    so that ``fit`` gives it whole batches: every projection is then one ``(b * T, dim)`` matmul
    (on XLA's CPU backend the step runs 1.5x faster than vmapping the sequence's). The result is the
    same as applying it to each sequence; dropout draws one mask for the batch from the context's key.

    Train it with ``loss="softmax_cross_entropy"`` on targets ``(T,)``, the inputs shifted by one
    (:func:`jaxnet.text.windows`); generate with :func:`jaxnet.generate`.

    Args:
      vocab_size: V, the token ids' range.
      context: the most tokens one sequence holds (learned positions: that many rows).
      layers, heads, dim: the blocks, attention heads and width (``dim % heads == 0``).
      dropout: on the embeddings and each residual branch in training (0: none).
      tie_embeddings: the output head is the token embedding's transpose (GPT-2), else its own.
      positions: ``"learned"`` (GPT-2) or ``"rope"`` (rotary, applied to queries and keys).
      bias: biases in the linear layers and layer norms (GPT-2 has them; nanoGPT leaves them out
        by default, as here: a little better and faster).
      eot: the id that separates documents packed into one sequence: attention then never crosses
        a document (each token sees the earlier tokens of its own; an ``eot`` begins the next
        document). None: plain causal attention over the whole sequence.
      remat: recompute each block's activations in the backward pass instead of keeping them
        (``jax.checkpoint``): ``"none"``, ``"dots"`` (keep the matmul outputs) or ``"full"`` (keep
        only each block's input). Same gradients, less memory, more compute.

    Examples:
      >>> import jax
      >>> net = gpt(vocab_size=50, context=16, layers=2, heads=2, dim=32)
      >>> params, state = net.init(jax.random.key(0))  # state: {} (dropout's keys come from ctx)
      >>> logits, _ = net.apply(params, state, jax.numpy.arange(10), Context(train=False))
      >>> logits.shape
      (10, 50)
    """
    sizes = (vocab_size, context, layers, heads, dim)
    c = _check_config(GPTConfig(*sizes, dropout, tie_embeddings, positions, bias, eot, remat))
    return StatefulModel(_init(c), GPT(c), batched=True)


class GPT(NamedTuple):
    """A GPT's ``apply``: ``(params, state, ids: (T,) or (b, T), ctx) -> (logits: (T, V) or (b, T, V),
    state)`` (state ``{}``; a batched :class:`jaxnet.StatefulModel`, for dropout's keys), with the cached decoding that
    :func:`jaxnet.generate` runs beside it: :meth:`prefill` and :meth:`decode`."""

    config: GPTConfig

    def __call__(self, params: Params, state, ids: jax.Array, ctx: Context):
        return _forward(self.config, params, ids, ctx)[0], state

    def prefill(self, params: Params, ids: jax.Array, length) -> tuple[jax.Array, Cache]:
        """Logits ``(C, V)`` of a window ``ids`` ``(C,)`` whose first ``length`` ids are real (the
        rest padding, never attended to by them), and the cache holding those ``length`` positions."""
        logits, (k, v) = _forward(self.config, params, ids, None)
        return logits, Cache(k, v, jnp.asarray(length, jnp.int32))

    def decode(self, params: Params, cache: Cache, token: jax.Array, layers=None) -> tuple[jax.Array, Cache]:
        """The next-token logits ``(V,)`` after ``token``, placed at position ``cache.length`` (which
        must be below the context), and the cache with it. ``layers``: :meth:`block_params` of ``params``,
        made once outside a loop that decodes (slices of the stacked blocks taken inside the loop
        are copies, made again at every token: 500 tokens on 2 CPU cores took 1.46x as long), at the
        cost of a second copy of the blocks' weights while decoding."""
        layers = self.block_params(params) if layers is None else layers
        c, position = self.config, cache.length
        visible = (jnp.arange(cache.k.shape[1]) <= position)[None, None, :]  # (1, 1, C): keys up to here
        x = _embed(c, params, jnp.reshape(token, (1,)), position[None])
        keys, values = cache.k, cache.v  # (layers, C, heads, h), updated in place inside a loop
        for i, p in enumerate(layers):
            q, k, v = (a[0] for a in _projections(c, p["attn"], _norm(p["ln1"], x), (1, 1), position[None]))
            keys = jax.lax.dynamic_update_slice(keys, k[None], (i, position, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v[None], (i, position, 0, 0))
            out = attention(q, keys[i], values[i], mask=visible)
            x = x + _linear(p["attn"]["o"], jnp.reshape(out, (1, c.dim)))
            x = x + _mlp(p["mlp"], _norm(p["ln2"], x))
        return _logits(c, params, x)[0], Cache(keys, values, position + 1)

    def block_params(self, params: Params) -> list:
        """The params of each block, one dict per layer (``params["blocks"]`` is stacked)."""
        return [jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(self.config.layers)]


def decay_mask(params: Params) -> Params:
    """True for the leaves weight decay should touch: the matrices of the attention and MLP
    projections and an untied head; False for biases, layer norms and embeddings (minGPT's
    ``configure_optimizers``; nanoGPT's decays the embeddings too). Give it to
    ``optax.adamw(..., mask=decay_mask)``."""

    def decays(path, leaf) -> bool:  # by name: the blocks' leaves are stacked, a norm's scale is (layers, dim)
        return getattr(path[-1], "key", None) == "w"

    return jax.tree_util.tree_map_with_path(decays, params)
