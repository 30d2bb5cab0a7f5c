"""Training part of a model: frozen parameters, parameter groups with their own learning rates,
and weight-decay masks, chosen by regular expressions over the params' paths.

A param's path names what it is (``blocks/attn/q/w``, ``0/b``, ``embed/table``:
:func:`jaxnet.sharding.path_name`). Everything here is optax: :func:`partition` labels each leaf
and ``optax.multi_transform`` gives each label its own transformation; a frozen label gets
``optax.set_to_zero()``, which keeps no state, so no optimizer state exists for frozen leaves and
their params stay bitwise unchanged.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import optax

from jaxnet import _checks as checks
from jaxnet import step
from jaxnet._checks import ArgumentError, escape, literal
from jaxnet.averaging import with_ema
from jaxnet.sharding import listed, path_name

FROZEN = "frozen"
DEFAULT = "default"


def matches(params, pattern: str):
    """A pytree of bools like ``params``: True where ``re.search(pattern, path)`` finds the leaf's path."""
    regex = _compile(pattern, "pattern")
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(path_name(path))), params)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ArgumentError(
            "{0} " + literal(pattern) + f" is not a valid regular expression: {escape(e)} (escape a literal character "
            "with a backslash)",
            what,
        ) from None


def partition(
    params, *, freeze: str | None = None, trainable: str | None = None, lr_mult: Mapping[str, float] | None = None
):
    """Each leaf's label: ``"frozen"`` where ``freeze`` matches its path (or ``trainable`` does
    not), else ``"x{F}"`` for the first ``lr_mult`` regex that matches (its multiplier F), else
    ``"default"``.

    Raises:
      ValueError: a regex matches no parameter, or the frozen ones are all of them (nothing
        would train); the message lists the parameters.
    """
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    part = _is_part(params)
    rules = list((lr_mult or {}).items())
    if freeze is not None and trainable is not None:
        raise ValueError("give freeze (what does not train) or trainable (what does), not both")
    if trainable is not None:  # "only these train": everything else is frozen
        keep = _compile(trainable, "trainable")
        if not any(keep.search(n) for n in names):
            raise _unmatched("trainable", trainable, names, part)
        freeze = "|".join(f"^{re.escape(n)}$" for n in names if not keep.search(n)) or None
        if freeze is None:
            return jax.tree.map(lambda _: DEFAULT, params) if not rules else partition(params, lr_mult=lr_mult)
    frozen = _compile(freeze, "freeze") if freeze is not None else None
    compiled = [(_compile(pattern, "lr_mult"), float(factor)) for pattern, factor in rules]
    for pattern, factor in rules:
        if not factor > 0:
            raise ValueError(f"lr_mult {pattern!r}: the multiplier must be positive, got {factor!r}")
    for what, regex in ([("freeze", frozen)] if frozen else []) + [("lr_mult", r) for r, _ in compiled]:
        if not any(regex.search(n) for n in names):
            raise _unmatched(what, regex.pattern, names, part)
    if frozen is not None and all(frozen.search(n) for n in names):
        given, inside = (f" it is given ({escape(listed(names))})", _INSIDE) if part else ("", "")
        raise ArgumentError(
            "{0} " + literal(frozen.pattern) + f" matches every parameter{given}: nothing would train{inside}", "freeze"
        )
    for regex, _ in compiled if frozen is not None else ():
        if all(frozen.search(n) for n in names if regex.search(n)):
            raise ArgumentError("{0} " + literal(regex.pattern) + " matches only frozen parameters ("
                                + escape(listed([n for n in names if regex.search(n)]))
                                + "): it would change nothing; drop it, or train them", "lr_mult")  # fmt: skip

    def label(path, _):
        name = path_name(path)
        if frozen is not None and frozen.search(name):
            return FROZEN
        return next((f"x{factor!r}" for regex, factor in compiled if regex.search(name)), DEFAULT)

    return jax.tree_util.tree_map_with_path(label, params)


def check_matches(what: str, pattern: str, params) -> None:
    """Refuses a regex ``pattern`` (the argument ``what``) that matches no path of ``params``."""
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not any(_compile(pattern, what).search(n) for n in names):
        raise _unmatched(what, pattern, names)


_INSIDE = (
    "; this optimizer sits inside another grouping (fit's trainable, or an outer jaxnet.grouped, "
    "jaxnet.groups.finetuning or optax.multi_transform), "
    "which gives it only those: give freeze or trainable, and lr_mult, to one grouping"
)


def _is_part(params) -> bool:
    """Whether ``params`` are one group's part of the whole (``optax.multi_transform`` masks the
    other groups' leaves): a grouping inside another sees only its group."""
    nodes = jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, optax.MaskedNode))
    return any(isinstance(n, optax.MaskedNode) for n in nodes)


def _unmatched(what: str, pattern: str, names: Sequence[str], part: bool = False) -> ArgumentError:
    if part:
        return ArgumentError("{0} " + literal(pattern) + " matches none of the parameters it is given ("
                             + escape(listed(names)) + ")" + _INSIDE, what)  # fmt: skip
    return ArgumentError("{0} " + literal(pattern) + " matches no parameter; the parameters are: "
                         + escape(listed(names)), what)  # fmt: skip


def grouped(
    optimizer: optax.GradientTransformation,
    *,
    freeze: str | None = None,
    trainable: str | None = None,
    lr_mult: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """``optimizer`` that trains only the params ``freeze`` does not match (or ``trainable`` does), each group of
    ``lr_mult`` (``{regex: F}``) with its updates times F (for SGD exactly F times the learning
    rate; for Adam-like optimizers, whose update is normalized, likewise), the rest as given.

    Frozen leaves get ``optax.set_to_zero()``: their params never change and the optimizer keeps
    no state for them. Each multiplier group has its own state of ``optimizer``.

    The labels are found from the params when the optimizer is initialized, so a regex that
    matches nothing is refused then (before anything trains).

    Args:
      optimizer: any optax optimizer.
      freeze, trainable: a regex over the params' paths (:func:`partition`); give one.
      lr_mult: ``{regex: factor}``; the first regex that matches a path gives its factor.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
      >>> opt = grouped(optax.sgd(0.1), freeze="body")
      >>> updates, _ = opt.update({"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}, opt.init(params))
      >>> updates["body"]["w"].tolist(), updates["head"]["w"].tolist()
      ([0.0, 0.0], [-0.10000000149011612, -0.10000000149011612])
    """
    if freeze is None and trainable is None and not lr_mult:
        return optimizer
    for factor in (lr_mult or {}).values():
        if not checks.is_real(factor) or not factor > 0:
            raise ValueError(f"lr_mult: a multiplier must be a positive number, got {factor!r}")
    transforms = {FROZEN: optax.set_to_zero(), DEFAULT: optimizer}
    for factor in (lr_mult or {}).values():
        transforms[f"x{float(factor)!r}"] = optax.chain(optimizer, optax.scale(float(factor)))

    def labels(params):
        return partition(params, freeze=freeze, trainable=trainable, lr_mult=lr_mult)

    return optax.multi_transform(transforms, labels)


def trainable_count(params, *, freeze: str | None = None, trainable: str | None = None) -> int:
    """The number of parameters that train (all but the frozen ones of :func:`partition`)."""
    labels = partition(params, freeze=freeze, trainable=trainable)
    return sum(leaf.size for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if label != FROZEN)


def decay_mask_except(pattern: str | None, base: Callable | None = None) -> Callable | None:
    """A weight-decay mask (a function of the params) that is ``base``'s (default: every leaf)
    except where ``pattern`` matches the path (``--no-decay``; :func:`check_matches` it against
    the whole params: the mask also sees each group's part alone)."""
    if pattern is None:
        return base
    regex = _compile(pattern, "no_decay")

    def mask(params):
        start = base(params) if base is not None else jax.tree.map(lambda _: True, params)
        return jax.tree_util.tree_map_with_path(
            lambda path, keep: bool(keep) and not regex.search(path_name(path)), start
        )

    return mask


def finetuning(
    optimizer: optax.GradientTransformation,
    *,
    freeze: str | None = None,
    trainable: str | None = None,
    lr_mult: Mapping[str, float] | None = None,
    ema: float | None = None,
    skip_spikes: tuple[int, float] | None = None,
) -> optax.GradientTransformation:
    """``optimizer`` with the choices of a fine-tuning run, innermost first: only some params
    train, groups with their own rates (:func:`grouped`), a moving average of the weights
    (:func:`jaxnet.with_ema`), loss spikes skipped (:func:`jaxnet.skip_spikes`, ``(window,
    factor)``). ``fit(trainable=, ema=, skip_spikes=)`` and ``jaxnet train`` both build it here."""
    optimizer = grouped(optimizer, freeze=freeze, trainable=trainable, lr_mult=lr_mult)
    if ema is not None:
        optimizer = with_ema(optimizer, ema)
    if skip_spikes is not None:
        if not isinstance(skip_spikes, (tuple, list)) or len(skip_spikes) != 2:
            raise ValueError(f"skip_spikes must be (window, factor), such as (100, 6.0), got {skip_spikes!r}")
        optimizer = step.skip_spikes(optimizer, *skip_spikes)
    return optimizer
