"""Checks of argument values, each raising ``ValueError``/``TypeError`` that names the argument.

Every value a user gives (to the API or, through the config, to the command line) is checked once,
by one of these functions; the command line translates the argument names into its flags.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np


class ArgumentError(ValueError):
    """A bad argument value; the message names the argument(s) through ``template``.

    ``str(error)`` names the Python arguments; :meth:`render` lets a front end (the command line)
    spell them its own way: ``template.format(*names)`` with each name respelled.
    """

    def __init__(self, template: str, *names: str):
        self.template, self.names = template, names
        super().__init__(template.format(*names))

    def render(self, spell) -> str:
        return self.template.format(*(spell(name) for name in self.names))


def escape(text: str) -> str:
    """``text`` made safe inside an :class:`ArgumentError` template (braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def literal(value) -> str:
    """``repr(value)``, made safe inside an :class:`ArgumentError` template."""
    return escape(repr(value))


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for Python and numpy real numbers (integers included), False for bools."""
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``.

    Examples:
      >>> integer("epochs", 3)
      3
      >>> integer("epochs", 0)
      Traceback (most recent call last):
      ...
      jaxnet._checks.ArgumentError: epochs must be a positive integer, got 0
    """
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        else:
            what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ArgumentError(f"{{0}} must be {what}, got {literal(value)}", name)
    return int(value)


def optional_integer(name: str, value, minimum: int = 1) -> int | None:
    """None, or ``value`` checked by :func:`integer`."""
    return None if value is None else integer(name, value, minimum)


def number(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float, ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ArgumentError(f"{{0}} must be a finite number, got {literal(value)}", name)
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentError(f"{{0}} must be a finite number, got {literal(value)}", name)
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        bound = f"greater than {minimum:g}" if strict else f"{minimum:g} or more"
        raise ArgumentError(f"{{0}} must be {bound}, got {literal(value)}", name)
    return value


def fraction(name: str, value) -> float:
    """``value`` as a float in ``[0, 1)``."""
    value = number(name, value)
    if not 0 <= value < 1:
        raise ArgumentError(f"{{0}} must be a fraction in [0, 1), got {literal(value)}", name)
    return value


def choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ArgumentError(f"unknown {{0}} {literal(value)}: use one of {escape(', '.join(map(str, choices)))}", name)
    return value


def key(name: str, value) -> None:
    """Refuses a ``value`` that is not a JAX PRNG key (a typed key array, or raw ``uint32`` key
    data): an integer seed given where a key goes would fail deep inside JAX."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.uint32):
        raise TypeError(f"{name} must be a JAX PRNG key, e.g. jax.random.key(0) (a seed is not one); got {value!r}")


def boolean(name: str, value) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def field_problem(document: dict, fields: dict) -> str | None:
    """What is wrong with the fields of a JSON ``document`` read from a file, or None:
    ``fields`` maps each name to ``(allowed types, required)`` (a bool is no int here)."""
    for name, (types, required) in fields.items():
        if name not in document:
            if required:
                return f"lacks the field {name!r}"
            continue
        value = document[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            return f"has {name!r} of type {type(value).__name__}"
    return None
