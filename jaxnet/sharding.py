"""Sharded parameters: meshes with named axes, and the rules that lay each parameter out on them.

A mesh has up to three named axes (:func:`make_mesh`): ``"data"`` and ``"fsdp"`` split each batch
(the example axis over ``data x fsdp``), ``"fsdp"`` also splits the parameters and the optimizer
state (fully sharded data parallel, as big_vision, Levanter and MaxText do), and ``"model"`` splits
the matrices of dense, attention and MLP layers (tensor parallelism, as Megatron lays it out).

:func:`param_specs` gives each parameter its ``PartitionSpec``, by its path in the params pytree
(``blocks/attn/q/w``), from three sources, the first that applies winning:

1. the caller's rules, ``{regex: spec}``: the first regex found (``re.search``) in a path gives the
   whole spec of that leaf;
2. on a ``"model"`` axis, tensor-parallel rules for jaxnet's layers (:data:`TENSOR_PARALLEL`, on
   a leaf's last dimensions, so that they hold for stacked layers too):
   queries, keys, values and the MLP's first layer split by columns, the attention's output and
   the MLP's second layer by rows (so each block needs one all-reduce), embedding tables by rows;
   other 2-d ``w`` by columns;
3. on an ``"fsdp"`` axis, FSDP: a leaf of at least ``min_size`` elements has its largest dimension
   that the axis divides (and no other rule uses) split over ``"fsdp"``.

Rules 2 and 3 skip what they cannot divide (the leaf stays replicated on that axis); the caller's
rules are checked: a rule that matches no parameter, an axis the mesh lacks, a spec longer than
the leaf or a dimension its axes do not divide is refused with the param's path, before anything
compiles. The optimizer state follows its params (:func:`state_shardings`). Everything else is
JAX's own: ``NamedSharding``, ``jax.jit(out_shardings=...)`` and XLA's SPMD partitioner, which
inserts the collectives.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet._checks import ArgumentError
from jaxnet.base import TrainState, path_name
from jaxnet.forward import init_model

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14
"""Leaves with fewer elements stay replicated under the FSDP rule (their shards would cost more
in collectives than they save in memory)."""

TENSOR_PARALLEL: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)(q|k|v|fc)/w$", (None, "model")),
    (r"(^|/)(q|k|v|fc)/b$", ("model",)),
    (r"(^|/)(o|proj)/w$", ("model", None)),
    (r"(^|/)table$", ("model", None)),
    (r"(^|/)w$", (None, "model")),
)
"""The tensor-parallel rules for jaxnet's layers on a ``"model"`` axis: ``(regex, spec)``, the first
match wins (see the module docstring). Biases of row-split layers stay whole."""


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, *, devices=None) -> Mesh:
    """A mesh with the named axes ``("data", "fsdp", "model")`` over ``devices``.

    The product of the sizes must be the number of devices; one size may be ``-1``, which takes
    what the others leave. Axes are ``AxisType.Auto``: XLA propagates the shardings of the inputs
    (batch and params) through the step and inserts the collectives.

    Args:
      data, fsdp, model: the axes' sizes (see the module docstring for what each splits).
      devices: the devices (default: every device of every process), in mesh order.

    Examples:
      >>> make_mesh(data=-1).shape  # doctest: +SKIP
      OrderedDict([('data', 8), ('fsdp', 1), ('model', 1)])
    """
    chosen = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ArgumentError(f"{{0}} must be a positive integer or -1 (fills), got {size!r}", name)
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill), got {', '.join(fill)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(chosen) % known:
            raise ValueError(f"{len(chosen)} devices do not divide into axes of sizes {_spelled(sizes)}")
        sizes[fill[0]] = len(chosen) // known
    if math.prod(sizes.values()) != len(chosen):
        raise ValueError(
            f"a mesh of {_spelled(sizes)} needs {math.prod(sizes.values())} devices, but there are {len(chosen)}: "
            "make the sizes multiply to the device count (or give one as -1)"
            + ("; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N emulates N" if len(chosen) == 1 else "")
        )
    shape = tuple(sizes[a] for a in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=chosen)


def one_device_mesh() -> Mesh:
    """A :func:`make_mesh` of the first device alone (of the first process)."""
    return make_mesh(devices=jax.devices()[:1])


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (for :func:`make_mesh`); unknown axes refused.

    Examples:
      >>> parse_mesh("fsdp=-1")
      {'fsdp': -1}
    """
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {text!r}: the axes are {', '.join(AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name} needs an integer size, as {name}=4, got {part!r}") from None
    if not sizes:
        raise ValueError(f"no mesh axes in {text!r}: give sizes as data=2,fsdp=4")
    return sizes


def parse_spec(text: str) -> P:
    """A PartitionSpec from ``"fsdp,None"``, ``"None,model"``, ``"data+fsdp"`` (two axes on one dim)
    or ``""`` (replicated).

    Examples:
      >>> parse_spec("None,model") == P(None, "model")
      True
    """
    dims = []
    for part in (p.strip() for p in text.split(",")) if text.strip() else ():
        if part.lower() in ("none", "-", ""):
            dims.append(None)
            continue
        names = tuple(n.strip() for n in part.split("+"))
        for name in names:
            if name not in AXES:
                raise ValueError(f"unknown mesh axis {name!r} in the spec {text!r}: the axes are {', '.join(AXES)}")
        dims.append(names[0] if len(names) == 1 else names)
    return P(*dims)


def listed(names) -> str:
    """The first 12 of ``names``, comma separated, and how many there are in all: for errors that
    show what a pattern could have matched."""
    names = list(names)
    return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")


def _spelled(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _axes_of(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _fits(shape: tuple, spec: tuple, mesh: Mesh) -> bool:
    return all(shape[i] % math.prod(mesh.shape[a] for a in _axes_of(e)) == 0 for i, e in enumerate(spec))


def spec_text(spec: P) -> str:
    """A spec as :func:`parse_spec` reads it: ``fsdp,None``, ``data+fsdp``; ``""`` replicated."""
    return ",".join("None" if e is None else "+".join(_axes_of(e)) for e in spec)


def _check_rule(name: str, shape: tuple, spec: P, mesh: Mesh, pattern: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"sharding rule {pattern!r} gives {name} {shape} the spec {spec_text(spec)}, longer than its rank: give "
            f"at most {len(shape)} entries"
        )
    for i, entry in enumerate(spec):
        for axis in _axes_of(entry):
            if axis not in mesh.shape:
                raise ValueError(f"sharding rule {pattern!r}: the mesh has no axis {axis!r} (for {name})")
        size = math.prod(mesh.shape[a] for a in _axes_of(entry))
        if shape[i] % size:
            raise ValueError(
                f"sharding rule {pattern!r}: dimension {i} of {name} {shape} is not divisible by "
                f"{spec_text(P(entry))} of size {size}: shard another dimension, or leave it whole (None)"
            )


def _default_spec(shape: tuple, mesh: Mesh, name: str, min_size: int) -> P:
    spec: list = [None] * len(shape)
    if mesh.shape.get("model", 1) > 1:
        for pattern, rule in TENSOR_PARALLEL:
            aligned = (None,) * (len(shape) - len(rule)) + rule  # on the last dims (stacked layers first)
            if re.search(pattern, name) and len(rule) <= len(shape) and _fits(shape, aligned, mesh):
                spec = list(aligned)
                break
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= min_size:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_specs(params, mesh: Mesh, rules=None, *, min_size: int = MIN_SHARDED_SIZE):
    """The ``PartitionSpec`` of each leaf of ``params`` on ``mesh`` (see the module docstring).

    Args:
      params: a params pytree (arrays or ``jax.ShapeDtypeStruct``).
      mesh: from :func:`make_mesh`.
      rules: ``{regex: spec}`` or ``[(regex, spec), ...]`` (spec: a ``PartitionSpec``, a tuple, or
        a string for :func:`parse_spec`), searched in order in each leaf's path; they win over the
        built-in rules.
      min_size: the FSDP rule leaves smaller leaves replicated.

    Returns:
      A pytree of ``PartitionSpec`` of the structure of ``params``.

    Raises:
      ValueError: a rule that matches no parameter, names an axis the mesh lacks, is longer than
        its leaf or does not divide it (the message names the path).
    """
    table = [(pattern, _rule_spec(pattern, spec)) for pattern, spec in _items(rules)]
    for pattern, _ in table:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"sharding rule {pattern!r} is not a valid regular expression: {e} (escape a literal character "
                "with a backslash)"
            ) from None
    used = set()

    def spec_of(path, leaf):
        name, shape = path_name(path), tuple(np.shape(leaf))
        for pattern, spec in table:
            if re.search(pattern, name):
                used.add(pattern)
                _check_rule(name, shape, spec, mesh, pattern)
                return spec
        return _default_spec(shape, mesh, name, min_size)

    specs = jax.tree_util.tree_map_with_path(spec_of, params)
    unused = [pattern for pattern, _ in table if pattern not in used]
    if unused:
        names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"sharding rule {unused[0]!r} matches no parameter; the parameters are: {listed(names)}")
    return specs


def _items(rules) -> list:
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        return list(rules.items())
    items = list(rules)
    if not all(isinstance(item, tuple) and len(item) == 2 for item in items):
        raise TypeError("sharding rules must be {regex: spec} or a list of (regex, spec) pairs")
    return items


def _rule_spec(pattern: str, spec) -> P:
    """The spec of the rule ``pattern``, its errors naming the rule."""
    try:
        return _as_spec(spec)
    except ValueError as e:
        raise ValueError(f"sharding rule {pattern!r}: {e}") from None


def _as_spec(spec) -> P:
    if isinstance(spec, P):
        return spec
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, (tuple, list)):
        return P(*spec)
    raise TypeError(f"a sharding spec is a PartitionSpec, a tuple or a string such as 'fsdp,None', got {spec!r}")


def follow_params(tree, params, specs):
    """Specs for ``tree`` (an optimizer state, say) whose leaves follow the params they belong to:
    a leaf whose path ends with a param's path and has its shape gets that param's spec; any other
    leaf (counts, scalars) is replicated, ``P()``."""
    by_name = {}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), spec in zip(leaves, jax.tree.leaves(specs, is_leaf=_is_spec)):
        by_name[path_name(path)] = (tuple(np.shape(leaf)), spec)

    def spec_of(path, leaf):
        name, shape = path_name(path), tuple(np.shape(leaf))
        parts = name.split("/")
        for start in range(len(parts)):
            found = by_name.get("/".join(parts[start:]))
            if found is not None and found[0] == shape:
                return found[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def shardings(specs, mesh: Mesh):
    """``NamedSharding``s on ``mesh`` for a pytree of ``PartitionSpec``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def check_mesh(mesh) -> None:
    """Refuses a ``mesh`` that is not a ``jax.sharding.Mesh`` with axes among :data:`AXES` (one
    whose axes jaxnet does not know would leave each batch unsplit, every device doing all of it)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, e.g. jaxnet.make_mesh(fsdp=8); got {mesh!r}")
    unknown = [a for a in mesh.axis_names if a not in AXES]
    if unknown:
        raise ValueError(
            f"mesh has the axis {unknown[0]!r}: jaxnet splits batches over 'data' and 'fsdp' and layers over 'model'; "
            "name the axes so (jaxnet.make_mesh(data=..., fsdp=..., model=...))"
        )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` that split each batch: ``"data"`` and ``"fsdp"``, those it has."""
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_devices(mesh: Mesh) -> int:
    """How many ways each batch is split: the product of the sizes of :func:`batch_axes`."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def bytes_per_device(tree) -> int:
    """The largest number of bytes of ``tree``'s arrays that one device holds, counted from the
    arrays' addressable shards."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values(), default=0)


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def state_shardings(state, mesh: Mesh, rules=None):
    """The shardings of a :class:`jaxnet.base.TrainState` (arrays or shapes) on ``mesh``: params by
    :func:`param_specs`, the optimizer state following them, the key, step and model state
    replicated."""
    specs = param_specs(state.params, mesh, rules)
    whole = replicated(mesh)
    return TrainState(
        params=shardings(specs, mesh),
        opt_state=shardings(follow_params(state.opt_state, state.params, specs), mesh),
        key=whole,
        step=whole,
        model_state=jax.tree.map(lambda _: whole, state.model_state),
    )


def put(tree, placements):
    """Places each array of ``tree`` with its sharding in ``placements`` (a pytree of
    ``NamedSharding`` of the same structure). Works across processes: each process passes the same
    values; a global array (of every process) is resharded in a compiled copy. PRNG key arrays
    are placed as their key data and re-wrapped."""

    def one(a, sharding):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(a)
            return jax.random.wrap_key_data(one(jax.random.key_data(a), sharding), impl=impl)
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.jit(lambda v: v, out_shardings=sharding)(a)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, placements)


def constrain_outputs(fn, mesh: Mesh, rules=None):
    """``fn`` whose outputs are laid out on ``mesh``: each :class:`~jaxnet.base.TrainState` in them
    by :func:`state_shardings`, every other array replicated (so the host reads it in any process).
    Used inside ``jax.jit``, in place of ``out_shardings`` that would need the outputs' structure."""
    whole = replicated(mesh)

    def lay_out(node):
        if isinstance(node, TrainState):
            return jax.lax.with_sharding_constraint(node, state_shardings(node, mesh, rules))
        return jax.lax.with_sharding_constraint(node, whole)

    def constrained(*args):
        return jax.tree.map(lay_out, fn(*args), is_leaf=lambda n: isinstance(n, TrainState))

    return constrained


def placed_inputs(compiled, mesh: Mesh):
    """``compiled`` (a jitted function of arrays laid out on ``mesh``) with every input array not
    yet on ``mesh`` (one made on the host's default device: a fresh epoch's running sums, a
    resumed position's copies) placed on it replicated first, so that every call has the input
    shardings of the calls before it and the program compiles once, not once per new layout."""
    whole = replicated(mesh)

    def lay_in(a):  # a global array (of every process) keeps its own layout, as put_replicated keeps it
        if not isinstance(a, jax.Array) or not a.is_fully_addressable:
            return a
        on_mesh = isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
        return a if on_mesh else put(a, whole)

    def call(*args):
        return compiled(*jax.tree.map(lay_in, args))

    return call


def init_sharded(model, key, mesh: Mesh, rules=None):
    """``(params, model_state)`` of ``model`` created already sharded on ``mesh`` (``init`` compiled
    with ``out_shardings``), so that a model too large for one device never exists whole on one.

    Args:
      model: a :class:`jaxnet.Model` or :class:`jaxnet.StatefulModel`.
      key: the PRNG key of the initialization.
      mesh, rules: as in :func:`param_specs`.
    """
    shapes = jax.eval_shape(lambda k: init_model(model, k), key)
    params_sharding = shardings(param_specs(shapes[0], mesh, rules), mesh)
    whole = replicated(mesh)
    model_sharding = jax.tree.map(lambda _: whole, shapes[1])
    return jax.jit(lambda k: init_model(model, k), out_shardings=(params_sharding, model_sharding))(key)
