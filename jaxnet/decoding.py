"""Text from a language model: sampling new tokens with a key-value cache, in one compiled program.

:func:`generate` fills the model's cache with the prompt (one forward pass over it), then runs
``max_new_tokens`` steps in a ``lax.scan``: each samples a token from the last logits and feeds
it back through the model's :meth:`jaxnet.lm.GPT.decode`, which computes one position against the
cached keys and values instead of the whole prefix. When the cache is full (the sequence has
reached the model's context C), the window slides: the cache is filled again from the newest
``C // 2`` tokens, and decoding goes on from there (so past the context each token sees between
C/2 and C tokens before it; within the context it sees all of them, and greedy decoding equals
re-running the model on the whole prefix for every token). A model with an ``eot`` id (documents that
attention does not cross) starts afresh after each ``eot`` it generates, and a prompt is read from
its last ``eot`` on.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxnet import _checks as checks
from jaxnet._checks import ArgumentError
from jaxnet.base import Params, PRNGKey
from jaxnet.forward import check_params
from jaxnet.lm import GPT, Cache


def sample_logits(logits: jax.Array, key: PRNGKey, temperature, top_k: int | None = None, top_p=None) -> jax.Array:
    """One token id from ``logits`` ``(V,)``: ``argmax`` when ``temperature`` is 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ids and to the smallest
    set whose probability reaches ``top_p`` (nucleus sampling), when given."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits)[::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered))
        # the smallest prefix whose probability reaches top_p: its last logit is the threshold
        cutoff = ordered[jnp.minimum(jnp.sum(cumulative < top_p), ordered.shape[0] - 1)]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("decoder", "steps", "greedy", "top_k", "top_p", "on_token"))
def _program(decoder: GPT, params, window, length, key, temperature, *, steps, greedy, top_k, top_p, on_token):
    """The compiled generation: ``window`` ``(C,)`` holds the prompt's ``length`` ids, then padding."""
    context = window.shape[0]
    keep = context // 2
    logits, cache = decoder.prefill(params, window, length)
    layers = decoder.block_params(params)  # sliced once, outside the loop
    first = logits[length - 1]
    sequence = jnp.zeros((context + steps,), jnp.int32).at[:context].set(window)

    def slide(cache: Cache, sequence, end):
        """The cache refilled from the newest ``keep`` tokens, ``sequence[end - keep : end]``."""
        newest = jax.lax.dynamic_slice_in_dim(sequence, end - keep, keep)
        logits, cache = decoder.prefill(params, jnp.zeros((context,), jnp.int32).at[:keep].set(newest), keep)
        return logits[keep - 1], cache

    def restart(token):
        """A cache holding ``token`` (an ``eot``) alone, and the logits after it."""
        logits, cache = decoder.prefill(params, jnp.zeros((context,), jnp.int32).at[0].set(token), 1)
        return logits[0], cache

    def step(carry, i):
        cache, logits, sequence, key = carry
        key, draw = jax.random.split(key)
        token = sample_logits(logits, draw, 0 if greedy else temperature, top_k, top_p)
        if on_token is not None:
            io_callback(on_token, None, token, ordered=True)
        end = length + i + 1  # the sequence's length with this token
        sequence = jax.lax.dynamic_update_slice_in_dim(sequence, token[None], end - 1, axis=0)
        branch = jnp.where(cache.length < context, 0, 1)
        if decoder.config.eot is not None:  # a document's end: the next one sees nothing before it
            branch = jnp.where(token == decoder.config.eot, 2, branch)
        branches = [
            lambda c: decoder.decode(params, c, token, layers),
            lambda c: slide(c, sequence, end),
            lambda c: restart(token),
        ]
        logits, cache = jax.lax.switch(branch, branches, cache)
        return (cache, logits, sequence, key), token

    _, tokens = jax.lax.scan(step, (cache, first, sequence, key), jnp.arange(steps))
    return tokens


def generate(
    model,
    params: Params,
    prompt_ids,
    max_new_tokens: int,
    *,
    key: PRNGKey,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    on_token: Callable[[jax.Array], None] | None = None,
) -> np.ndarray:
    """``max_new_tokens`` new token ids after ``prompt_ids``, sampled from a language model.

    Args:
      model: a model from :func:`jaxnet.gpt` (its ``apply``, a :class:`jaxnet.lm.GPT`, carries the
        cached decoding).
      params: its params (one model's: take a member's with :func:`jaxnet.take_member`).
      prompt_ids: ``(P,)`` token ids, ``P >= 1``; a prompt longer than the context keeps its last
        ``context`` ids (say so to your users: :func:`prompt_window` tells).
      max_new_tokens: how many tokens to generate.
      key: the sampling's PRNG key (the same key and prompt give the same text).
      temperature: the logits are divided by it before sampling; 0 decodes greedily (argmax).
      top_k: sample among the ``top_k`` most likely tokens only.
      top_p: sample among the smallest set of tokens whose probability reaches ``top_p``.
      on_token: called with each token id, a 0-d int32 array (``int(token)``), as soon as it is
        produced (from inside the compiled program, in order), e.g. to print text as it comes.

    Returns:
      The new ids ``(max_new_tokens,)``, int32.
    """
    decoder = _decoder(model)
    steps, top_k, top_p = check_sampling(model, max_new_tokens, temperature, top_k, top_p)
    checks.key("key", key)
    check_params(model, params)
    window, length = prompt_window(prompt_ids, decoder.config.context, decoder.config.vocab_size, decoder.config.eot)
    greedy = temperature == 0
    tokens = _program(
        decoder, params, window, length, key, jnp.float32(temperature or 1.0), steps=steps, greedy=greedy,
        top_k=None if greedy else top_k, top_p=None if greedy or top_p is None else float(top_p), on_token=on_token,
    )  # fmt: skip
    return np.asarray(tokens)


def check_sampling(model, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> tuple:
    """``(max_new_tokens, top_k, top_p)`` of :func:`generate` checked for ``model`` (``top_k`` at
    most its vocabulary); raises ValueError/TypeError naming the argument, before anything runs."""
    vocab_size = _decoder(model).config.vocab_size
    steps = checks.integer("max_new_tokens", max_new_tokens)
    checks.number("temperature", temperature, minimum=0.0)
    if top_k is not None:
        top_k = min(checks.integer("top_k", top_k), vocab_size)
    if top_p is not None and not 0 < checks.number("top_p", top_p) <= 1:
        raise ArgumentError(f"{{0}} must be in (0, 1], got {checks.literal(top_p)}", "top_p")
    return steps, top_k, top_p


def _decoder(model) -> GPT:
    decoder = getattr(model, "apply", None)
    if not isinstance(decoder, GPT):
        raise TypeError("model: generate needs a language model from jaxnet.gpt (its apply decodes with a cache)")
    return decoder


def prompt_window(prompt_ids, context: int, vocab_size: int, eot: int | None = None) -> tuple[jax.Array, int]:
    """``(window (C,), length)``: the prompt's last ``context`` ids (at most), padded with zeros;
    with an ``eot`` id, from the prompt's last one on (the tokens before belong to other documents)."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a non-empty 1-d array of token ids, got shape {ids.shape} {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"prompt_ids must be in [0, {vocab_size}), got ids from {ids.min()} to {ids.max()}")
    if eot is not None and (ids == eot).any():
        ids = ids[np.flatnonzero(ids == eot)[-1] :]
    ids = ids[-context:].astype(np.int32)
    return jnp.zeros((context,), jnp.int32).at[: ids.shape[0]].set(ids), int(ids.shape[0])
