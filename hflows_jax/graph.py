"""The layer graph of any JAX function, traced: which channels couple, and what they cost.

``trace(fn, params, example)`` traces ``fn(params, x)`` with ``jax.make_jaxpr`` (inlining
``jit``, ``custom_jvp``/``custom_vjp`` and ``remat`` sub-programs) and gives every axis of
every value a *label*: the channel spaces it runs over. Values that must lose the same
channels share a space: the two operands of a residual add, a conv's output and the
BatchNorm scale multiplied into it, a kernel's input axis and the activation it reads, a
depthwise conv's input and output. A flatten gives an axis several factors (``H * W * C``:
the channel space ``C`` repeated over ``H * W`` positions), so a dense kernel after it loses
whole blocks of rows. The batch axis of ``x`` is one space of its own.

A space can be pruned (a *group*) unless something needs all of its channels: it reaches
the function's output, it is reduced over (LayerNorm, softmax), sliced, padded,
concatenated, split by a reshape into sub-axes (attention heads), or contracted between
two input-dependent values (attention scores). Those spaces are *frozen*, each with the
reason. An op the graph does not know is a :class:`GraphError` naming the op and the line
of the user's code it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.extend as jex
import numpy as np
from jax.tree_util import keystr

PyTree = Any
BATCH = 0  # the space of the batch axis of x

INLINE = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "custom_lin"}
ELEMENTWISE = {
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq",
    "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow",
    "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic", "lt", "max", "min",
    "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub",
    "tan", "tanh", "xor", "optimization_barrier",
}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
              "reduce_or", "argmax", "argmin"}
WINDOWS = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
CONTRACTIONS = {"conv_general_dilated", "dot_general"}
CUTS = {"slice", "pad", "concatenate", "rev"} | CUMULATIVE  # ops that cut or reorder axes


def cut_axes(eqn, shape: tuple) -> set:
    """The axes of its (first) operand, of ``shape``, that a slice, pad, concatenate,
    rev, split or cumulative op cuts or reorders; the others it carries whole."""
    p, n = eqn.params, len(shape)
    if eqn.name == "slice":
        strides = p["strides"] or (1,) * n
        return {d for d in range(n)
                if (p["start_indices"][d], p["limit_indices"][d], strides[d]) != (0, shape[d], 1)}
    if eqn.name == "pad":
        return {d for d, c in enumerate(p["padding_config"]) if tuple(c) != (0, 0, 0)}
    if eqn.name in ("concatenate",):
        return {p["dimension"]}
    if eqn.name == "rev":
        return set(p["dimensions"])
    return {p["axis"]}  # split and the cumulative ops


class GraphError(ValueError):
    """``fn`` holds an op the traced graph cannot take (named, with where it sits)."""


@dataclasses.dataclass
class Eqn:
    """One primitive application in the flattened program; ``ins`` are value ids or
    ``Literal``s, ``where`` the user's source line."""

    prim: Any
    ins: list
    outs: list
    params: dict
    where: str

    @property
    def name(self) -> str:
        return self.prim.name


UNKNOWN_PLACE = "an unknown place"
LIBRARIES = (os.sep + "site-packages" + os.sep, os.path.dirname(os.path.abspath(__file__)))


def _where(source_info, outer: str = UNKNOWN_PLACE) -> str:
    """The user's line an op comes from: its own, unless it has none or it lies in a
    library (an op inside ``jnp.where``'s jitted body), then its caller's (``outer``)."""
    try:
        from jax._src import source_info_util  # no public way to name a user's line
        where = source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001  (a location is a courtesy, never a failure)
        where = None
    if not where or (outer != UNKNOWN_PLACE and any(lib in where for lib in LIBRARIES)):
        return outer
    return where


# What to do about an op the graph cannot take, by the construct it comes from.
ADVICE = {
    "while": "A loop (lax.fori_loop, while_loop) is traced once for all its steps; write "
             "its steps out in Python, or compute it outside fn.",
    "cond": "A branch on a value (lax.cond, lax.switch) picks its layers at run time; "
            "select with jnp.where, or compute it outside fn.",
}
DEFAULT_ADVICE = "Compute it outside fn, or ask for it to be supported."


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
    return None


class Spaces:
    """Union-find over channel spaces. A space may be *expanded*: defined as a product of
    other spaces (a param axis that turned out to read a flattened ``H * W * C``)."""

    def __init__(self):
        self.parent, self.size, self.frozen, self.expand = [BATCH], [-1], {}, {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def resolve(self, label: tuple) -> tuple:
        """A label's factors ``((size, root space), ...)``, expansions followed, size-1
        factors dropped."""
        out = []
        for size, s in label:
            r = self.find(s)
            if r in self.expand:
                out.extend(self.resolve(self.expand[r]))
            elif size != 1:
                out.append((size, r))
        return tuple(out)

    def freeze(self, label: tuple, why: str) -> None:
        for _, r in self.resolve(label):
            if r != BATCH:
                self.frozen.setdefault(r, why)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b == BATCH:
            a, b = b, a
        self.parent[b] = a
        if b in self.frozen:
            self.frozen.setdefault(a, self.frozen.pop(b))
        ea, eb = self.expand.pop(a, None), self.expand.pop(b, None)
        if ea is not None and eb is not None:
            self.unify(ea, eb)
        if (ea or eb) is not None and a != BATCH:
            self.expand[a] = ea or eb

    def unify(self, la: tuple, lb: tuple) -> None:
        """Make two labels of one axis (same total size) name the same channels."""
        fa, fb = list(self.resolve(la)), list(self.resolve(lb))
        while fa and fb:
            (na, sa), (nb, sb) = fa[0], fb[0]
            if na == nb:
                self.union(sa, sb)
                fa.pop(0), fb.pop(0)
                continue
            short, long_ = (fa, fb) if na < nb else (fb, fa)
            n, prod, k = long_[0][0], 1, 0
            while k < len(short) and prod < n:
                prod *= short[k][0]
                k += 1
            target = long_[0][1]
            if prod != n or target == BATCH or target in self.frozen:
                break
            self.expand[target] = tuple(short[:k])
            del short[:k]
            long_.pop(0)
        if fa or fb:
            self.freeze(tuple(fa) + tuple(fb), "its axis is reshaped two incompatible ways")


@dataclasses.dataclass
class Contraction:
    """A conv or dot_general with one input-dependent operand (``data``) and one that is
    not (``kernel``), by operand position; ``eqn`` is its index in the program.

    The axes, once: ``data_axes`` of the data are read through ``read_axes`` of the
    kernel (a depthwise conv: its channels, through the kernel's output axis);
    ``out_axes`` of the kernel index the output channels (none for depthwise);
    ``taps`` are the kernel axes each output entry sums over (in-feature and spatial);
    ``positions`` are the output axes that index the data's positions. ``param`` is the
    params leaf the kernel is (through dtype casts), or None; ``layer``: the kernel is
    that leaf's slice ``layer`` along its first axis (a scanned block's kernel), whose
    axes are then the leaf's axes less one (``param_axis``).
    """

    eqn: int
    data: int
    kernel: int
    data_axes: tuple
    read_axes: tuple
    out_axes: tuple
    taps: tuple
    positions: tuple
    depthwise: bool
    param: int | None
    layer: int | None = None

    def param_axis(self, axis: int) -> int:
        """The params leaf's axis that is ``axis`` of the kernel."""
        return axis if self.layer is None else axis + 1


def _contraction(graph, i: int, eqn: Eqn, data: int, origin: dict) -> Contraction:
    kernel = 1 - data
    k = eqn.ins[kernel]
    if eqn.name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        depthwise = _is_depthwise(graph, eqn)
        return Contraction(
            i, data, kernel, (dn.lhs_spec[1],),
            (dn.rhs_spec[0],) if depthwise else (dn.rhs_spec[1],),
            () if depthwise else (dn.rhs_spec[0],), tuple(dn.rhs_spec[1:]),
            tuple(dn.out_spec[2:]), depthwise, *origin.get(k, (None, None)))
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    dc, kc, kb = (lc, rc, rb) if data == 0 else (rc, lc, lb)
    free = tuple(d for d in range(len(graph.shapes[k])) if d not in kc and d not in kb)
    n_free = [len(graph.shapes[a]) - len(c) - len(b)
              for a, c, b in zip(eqn.ins, (lc, rc), (lb, rb))]
    start = len(lb) + (0 if data == 0 else n_free[0])
    return Contraction(i, data, kernel, tuple(dc), tuple(kc), free, tuple(kc),
                       tuple(range(start, start + n_free[data])), False,
                       *origin.get(k, (None, None)))


def _is_depthwise(graph, eqn: Eqn) -> bool:
    """A conv whose every input channel is its own group, with one output channel each."""
    dn = eqn.params["dimension_numbers"]
    groups = eqn.params["feature_group_count"]
    rhs, out = graph.shapes[eqn.ins[1]], graph.shapes[eqn.outs[0]]
    return groups > 1 and rhs[dn.rhs_spec[1]] == 1 and out[dn.out_spec[1]] == groups


@dataclasses.dataclass
class Graph:
    """A traced ``fn(params, x)``: the flat program, every value's shape and label, the
    channel spaces and which values depend on ``x``."""

    eqns: list
    shapes: dict  # value id -> shape
    dtypes: dict
    labels: dict  # value id -> per axis: tuple of (size, space) factors
    spaces: Spaces
    param_ids: list  # value ids of params' leaves, in jax.tree.leaves order
    param_paths: list  # their paths, "Conv_0/kernel"
    const_ids: list  # closed-over arrays (BatchNorm statistics, ...)
    consts: list
    x_id: int
    out_ids: list  # value ids or Literals
    out_tree: Any  # fn's output structure
    depends: set  # value ids that depend on x
    runtime: set  # value ids the program computes per call (depend on x or carry the batch)
    contractions: list
    strict: bool = True  # an op the graph does not know is an error (else: frozen around)

    def factors(self, v: int, axis: int) -> tuple:
        return self.spaces.resolve(self.labels[v][axis])

    @property
    def groups(self) -> dict[int, int]:
        """Prunable spaces: root -> channel count. A space is prunable when a conv or dense
        layer reads or writes it and nothing freezes it."""
        found = {}
        for c in self.contractions:
            eqn = self.eqns[c.eqn]
            sides = ((eqn.ins[c.data], c.data_axes), (eqn.ins[c.kernel], c.out_axes))
            for v, axes in sides:  # the channels it reads and those it writes
                for axis in axes:
                    for size, s in self.factors(v, axis):
                        if s != BATCH and s not in self.spaces.frozen:
                            found[s] = size
        return found

    def read_axes(self) -> set:
        """(params leaf, axis) pairs that a conv or dense layer contracts: its input side."""
        return {(c.param, c.param_axis(d)) for c in self.contractions if c.param is not None
                and not c.depthwise for d in c.read_axes}

    def per_example_shape(self, v: int) -> tuple:
        """A value's shape with its batch factors taken out."""
        return tuple(math.prod(n for n, s in self.factors(v, a) if s != BATCH)
                     for a in range(len(self.shapes[v])))

    def group_names(self) -> dict[int, str]:
        """Each group named after the first layer that writes it: its kernel's path without
        ``/kernel`` (``"Conv_3"``, ``"ResNetBlock_0/Conv_1"``); a group no layer writes
        (an embedding's features) after the first param that holds it."""
        groups = self.groups
        paths = dict(zip(self.param_ids, self.param_paths))
        names = {}
        for c in self.contractions:
            if c.param is None:
                continue
            for axis in c.out_axes or c.read_axes:  # depthwise: it writes what it reads
                for _, s in self.factors(c.param, c.param_axis(axis)):
                    if s in groups and s not in names:
                        name = paths[c.param].rsplit("/", 1)[0]  # a second group: + axis
                        names[s] = (name if name not in names.values()
                                    else f"{name}:{c.param_axis(axis)}")
        kernels = {c.param for c in self.contractions}
        for path, v in sorted(zip(self.param_paths, self.param_ids),  # an embedding's
                              key=lambda pv: pv[1] in kernels):  # table before its readers
            for axis in range(len(self.shapes[v])):
                for _, s in self.factors(v, axis):
                    if s in groups and s not in names:
                        name = path.rsplit("/", 1)[0]
                        names[s] = name if name not in names.values() else f"{name}:{axis}"
        return {s: names.get(s, f"group_{s}") for s in groups}

    def layer_name(self, c: Contraction) -> str:
        """A conv or dense layer's name: its kernel's path without ``/kernel``, with
        ``[i]`` for layer i of a scanned stack; else the op and where it is."""
        if c.param is None:
            eqn = self.eqns[c.eqn]
            return f"{eqn.name} at {eqn.where}"
        name = self.param_paths[self.param_ids.index(c.param)].rsplit("/", 1)[0]
        return name if c.layer is None else f"{name}[{c.layer}]"

    def leaf_axes(self) -> dict[str, tuple]:
        """Per param leaf (by path), per axis, the factors ``((size, space), ...)``."""
        return {p: tuple(self.factors(v, a) for a in range(len(self.shapes[v])))
                for p, v in zip(self.param_paths, self.param_ids)}

    def frozen_reasons(self) -> dict[int, str]:
        return dict(self.spaces.frozen)

    def macs(self, shape_of: Callable[[int], tuple] | None = None) -> int:
        """Multiply-adds per example of the conv and dense layers (contractions with a
        kernel), with per-example value shapes from ``shape_of`` (default: as traced)."""
        shape_of = shape_of or self.per_example_shape
        return sum(contraction_macs(self, c, shape_of) for c in self.contractions)


def masked_macs(graph: Graph, c: Contraction, present: int) -> int:
    """``contraction_macs`` on ``present`` of the kernel's entries: each one is read at
    every output position."""
    kernel = math.prod(graph.shapes[graph.eqns[c.eqn].ins[c.kernel]])
    return contraction_macs(graph, c, graph.per_example_shape) // kernel * int(present)


def contraction_macs(graph: Graph, c: Contraction, shape_of) -> int:
    """Multiply-adds per example of one contraction: its output entries times the kernel
    entries each reads (``shape_of``: per-example shapes)."""
    eqn = graph.eqns[c.eqn]
    kernel = shape_of(eqn.ins[c.kernel])
    return math.prod(shape_of(eqn.outs[0])) * math.prod(kernel[d] for d in c.taps)


# ---------------------------------------------------------------------------------------
# Tracing.

def _flatten(jaxpr, consts, in_ids, new_id, eqns, const_ids, const_vals, shapes, dtypes,
             outer: str = UNKNOWN_PLACE):
    """Append ``jaxpr``'s equations to ``eqns`` with fresh value ids, inlining calls."""
    env = {}

    def bind(var, vid):
        env[var] = vid

    def read(atom):
        return atom if isinstance(atom, jex.core.Literal) else env[atom]

    for var, val in zip(jaxpr.constvars, consts):
        vid = new_id(var.aval)
        const_ids.append(vid)
        const_vals.append(val)
        bind(var, vid)
    for var, vid in zip(jaxpr.invars, in_ids):
        bind(var, vid)
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        if eqn.primitive.name in INLINE and _sub_jaxpr(eqn) is not None:
            sub, sub_consts = _sub_jaxpr(eqn)
            lifted = _lifted(ins[-len(sub.invars):], new_id, const_ids, const_vals)
            outs = _flatten(sub, sub_consts, lifted, new_id, eqns, const_ids, const_vals,
                            shapes, dtypes, _where(eqn.source_info, outer))
            for var, vid in zip(eqn.outvars, outs):
                bind(var, vid)
            continue
        if eqn.primitive.name == "scan":
            outs = _unroll_scan(eqn, _lifted(ins, new_id, const_ids, const_vals), new_id, eqns,
                                const_ids, const_vals, shapes, dtypes,
                                _where(eqn.source_info, outer))
            for var, vid in zip(eqn.outvars, outs):
                bind(var, vid)
            continue
        outs = [new_id(v.aval) for v in eqn.outvars]
        for var, vid in zip(eqn.outvars, outs):
            bind(var, vid)
        eqns.append(Eqn(eqn.primitive, ins, outs, dict(eqn.params),
                        _where(eqn.source_info, outer)))
    return [read(a) for a in jaxpr.outvars]


def _lifted(ins, new_id, const_ids, const_vals) -> list:
    """Literals handed to a sub-program become values of their own."""
    lifted = []
    for a in ins:
        if isinstance(a, jex.core.Literal):
            vid = new_id(jax.typeof(a.val))
            const_ids.append(vid)
            const_vals.append(np.asarray(a.val))
            a = vid
        lifted.append(a)
    return lifted


def _unroll_scan(eqn, ins, new_id, eqns, const_ids, const_vals, shapes, dtypes, where):
    """A scan as its steps written out: step i reads slice i of every scanned input (a
    stacked param's layer i: a kernel of its own, ``Contraction.layer``), and the outputs
    it stacks are stacked back. ``nn.scan`` over blocks so becomes blocks in a row; a
    channel of the stack is one space across its layers (a slice carries its axes)."""
    p = eqn.params
    if p["length"] < 1:
        raise GraphError(f"hf.export cannot take a scan of length 0 (at {where}).")
    body, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]

    def inline(f, avals, args):
        closed = jax.make_jaxpr(f)(*avals)
        return _flatten(closed.jaxpr, closed.consts, args, new_id, eqns, const_ids,
                        const_vals, shapes, dtypes, where)

    ys = []
    for i in (reversed(range(p["length"])) if p["reverse"] else range(p["length"])):
        step_xs = [inline(lambda a, i=i: jax.lax.index_in_dim(a, i, keepdims=False),
                          [jax.ShapeDtypeStruct(shapes[x], dtypes[x])], [x])[0] for x in xs]
        outs = _flatten(body.jaxpr, body.consts, list(consts) + list(carry) + step_xs, new_id,
                        eqns, const_ids, const_vals, shapes, dtypes, where)
        outs = _lifted(outs, new_id, const_ids, const_vals)
        carry, y = outs[:n_carry], outs[n_carry:]
        ys.append(y)
    if p["reverse"]:
        ys.reverse()
    stack = lambda *parts: jax.lax.concatenate(  # noqa: E731  (ops the graph labels)
        [jax.lax.expand_dims(a, (0,)) for a in parts], 0)
    stacked = [inline(stack, [jax.ShapeDtypeStruct(shapes[v], dtypes[v]) for v in parts],
                      list(parts))[0] for parts in zip(*ys)]
    return list(carry) + stacked


def function_of(fn: Any, example: Any) -> tuple[Callable, jax.Array]:
    """``(fn(params, x), example batch)`` from what a caller has: a function and a batch,
    or a linen module and the shape of one input (our models' call). A module is applied
    with its other variables (BatchNorm statistics) at zero: a traced graph depends on
    shapes only."""
    if isinstance(example, tuple) and all(isinstance(n, int) for n in example):
        example = jax.numpy.zeros((2,) + example, jax.numpy.float32)
    example = jax.numpy.asarray(example)
    import flax.linen as nn  # only for this convenience

    if not isinstance(fn, nn.Module):
        return fn, example
    model = fn
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    rest = {k: jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), v)
            for k, v in shapes.items() if k != "params"}
    return (lambda p, x: model.apply({"params": p, **rest}, x)), example


def trace(fn: Callable, params: PyTree, example: jax.Array, strict: bool = True) -> Graph:
    """The graph of ``fn(params, x)`` for inputs shaped like ``example`` (axis 0: batch).

    ``strict=False`` takes any op, freezing every channel it touches: enough to count
    multiply-adds (``flops.forward_macs``), not to prune or export.
    """
    try:
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(params, example)
    except Exception as e:  # noqa: BLE001  (the user's fn: say where it failed, keep the cause)
        raise GraphError(f"fn(params, x) failed while tracing on these params and an "
                         f"example of shape {tuple(example.shape)}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    shapes, dtypes = {}, {}

    def new_id(aval):
        vid = len(shapes) + 1
        shapes[vid], dtypes[vid] = tuple(aval.shape), aval.dtype
        return vid

    leaves_with_path = jax.tree.leaves_with_path(params)
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != len(leaves_with_path) + 1:
        raise GraphError("fn(params, x) must take the params tree and one input array.")
    in_ids = [new_id(v.aval) for v in jaxpr.invars]
    eqns, const_ids, consts = [], [], []
    outs = _flatten(jaxpr, closed.consts, in_ids, new_id, eqns, const_ids, consts,
                    shapes, dtypes)
    if all(isinstance(o, jex.core.Literal) for o in outs):
        raise GraphError("fn returns only constants: nothing to trace.")
    graph = Graph(eqns, shapes, dtypes, {}, Spaces(), in_ids[:-1],
                  [keystr(p, simple=True, separator="/") for p, _ in leaves_with_path],
                  const_ids, [np.asarray(c) for c in consts], in_ids[-1], outs,
                  jax.tree.structure(out_shapes), set(), set(), [], strict)
    _label(graph)
    _classify(graph)
    return graph


# ---------------------------------------------------------------------------------------
# Labels: how channels flow.

def _fresh(graph: Graph, v: int) -> tuple:
    label = tuple(((n, graph.spaces.new(n)),) for n in graph.shapes[v])
    graph.labels[v] = label
    return label


def _label_of(graph: Graph, atom) -> tuple | None:
    return None if isinstance(atom, jex.core.Literal) else graph.labels[atom]


def _unify_axes(graph: Graph, out: int, ins: list) -> None:
    """Elementwise: every input of the output's rank runs over the output's axes."""
    lo, so = graph.labels[out], graph.shapes[out]
    for a in ins:
        la = _label_of(graph, a)
        if la is None or len(la) != len(lo):
            continue
        for axis, (fa, fo) in enumerate(zip(la, lo)):
            if graph.shapes[a][axis] == so[axis]:
                graph.spaces.unify(fa, fo)


def _reshape(graph: Graph, operand: int, out: int) -> None:
    """Axes that merge concatenate their factors; an axis split along its factors' bounds
    hands them on; splitting inside a factor freezes it (attention heads, maxout), while
    the axes around the split (the batch) keep their labels."""
    sp = graph.spaces
    src_shape, dst = graph.shapes[operand], graph.shapes[out]
    lead = 0  # axes kept one-to-one at both ends
    while lead < min(len(src_shape), len(dst)) and src_shape[lead] == dst[lead]:
        lead += 1
    tail = 0
    while (tail < min(len(src_shape), len(dst)) - lead
           and src_shape[-1 - tail] == dst[-1 - tail]):
        tail += 1
    middle = _split_factors(sp, graph.labels[operand][lead:len(src_shape) - tail],
                            dst[lead:len(dst) - tail])
    src = graph.labels[operand]
    graph.labels[out] = src[:lead] + middle + (src[len(src) - tail:] if tail else ())


def _split_factors(sp: Spaces, labels: tuple, sizes: tuple) -> tuple:
    """Labels for axes of ``sizes`` made of the factors of ``labels`` in order, a factor
    split in two where an axis ends inside it (and it may be); else fresh frozen ones."""
    factors = [f for label in labels for f in sp.resolve(label)]
    out, k = [], 0
    for n in sizes:
        if n == 1:
            out.append(((1, sp.new(1)),))
            continue
        take, prod = [], 1
        while k < len(factors) and prod < n:
            size, s = factors[k]
            part = n // prod
            if prod * size <= n:
                prod *= size
                take.append(factors[k])
                k += 1
            elif n % prod == 0 and size % part == 0 and s != BATCH and s not in sp.frozen:
                # a space cut into blocks (GroupNorm's groups): its channel c is channel
                # c % (size / part) of block c // (size / part)
                pieces = ((part, sp.new(part)), (size // part, sp.new(size // part)))
                sp.expand[s] = pieces
                factors[k:k + 1] = list(pieces)
            else:
                break
        if prod != n:
            break
        out.append(tuple(take))
    if len(out) == len(sizes) and k == len(factors):
        return tuple(out)
    why = "a reshape splits it into sub-axes (e.g. attention heads)"
    sp.freeze(tuple(factors), why)
    fresh = tuple(((n, sp.new(n)),) for n in sizes)
    for f in fresh:
        sp.freeze(f, why)
    return fresh


def _conv(graph: Graph, eqn: Eqn) -> None:
    lhs, rhs = eqn.ins
    out = eqn.outs[0]
    sp = graph.spaces
    dn = eqn.params["dimension_numbers"]
    ll, lr, lo = graph.labels[lhs], graph.labels[rhs], _fresh(graph, out)
    sp.unify(ll[dn.lhs_spec[0]], lo[dn.out_spec[0]])
    groups = eqn.params["feature_group_count"]
    if eqn.params["batch_group_count"] != 1:
        raise GraphError(f"hf.export cannot take a conv with batch_group_count > 1 at "
                         f"{eqn.where}.")
    if groups == 1:
        sp.unify(ll[dn.lhs_spec[1]], lr[dn.rhs_spec[1]])
        sp.unify(lr[dn.rhs_spec[0]], lo[dn.out_spec[1]])
    elif _is_depthwise(graph, eqn):  # channel c in is channel c out
        sp.unify(ll[dn.lhs_spec[1]], lr[dn.rhs_spec[0]])
        sp.unify(lr[dn.rhs_spec[0]], lo[dn.out_spec[1]])
    else:  # channel g * Cg + c is channel c of group g: pruned in every group alike
        why = f"the groups of a grouped conv ({eqn.where})"
        per_in = graph.shapes[rhs][dn.rhs_spec[1]]
        per_out = graph.shapes[rhs][dn.rhs_spec[0]] // groups
        ins, outs = (groups, sp.new(groups)), (groups, sp.new(groups))
        sp.freeze((ins, outs), why)
        read, written = (per_in, sp.new(per_in)), (per_out, sp.new(per_out))
        sp.unify(ll[dn.lhs_spec[1]], (ins, read))
        sp.unify(lr[dn.rhs_spec[1]], (read,))
        sp.unify(lr[dn.rhs_spec[0]], (outs, written))
        sp.unify(lo[dn.out_spec[1]], (outs, written))
    for labels, spec in ((ll, dn.lhs_spec), (lr, dn.rhs_spec), (lo, dn.out_spec)):
        for d in spec[2:]:
            sp.freeze(labels[d], "a spatial axis of a conv")


def _dot(graph: Graph, eqn: Eqn) -> None:
    lhs, rhs = eqn.ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ll, lr, lo = graph.labels[lhs], graph.labels[rhs], _fresh(graph, eqn.outs[0])
    sp = graph.spaces
    for a, b in zip(lc, rc):
        sp.unify(ll[a], lr[b])
    free_l = [d for d in range(len(ll)) if d not in lc and d not in lb]
    free_r = [d for d in range(len(lr)) if d not in rc and d not in rb]
    for i, (a, b) in enumerate(zip(lb, rb)):
        sp.unify(ll[a], lo[i])
        sp.unify(lr[b], lo[i])
    for i, d in enumerate(free_l + free_r):
        src = ll[d] if i < len(free_l) else lr[d]
        sp.unify(src, lo[len(lb) + i])


def _label_eqn(graph: Graph, eqn: Eqn) -> None:
    name, sp, p = eqn.name, graph.spaces, eqn.params
    ins = eqn.ins
    first = ins[0] if ins else None
    if name in ELEMENTWISE:
        for o in eqn.outs:
            _fresh(graph, o)
            _unify_axes(graph, o, ins)
    elif name == "broadcast_in_dim":
        lo = _fresh(graph, eqn.outs[0])
        la = _label_of(graph, first)
        if la is not None:
            for j, d in enumerate(p["broadcast_dimensions"]):
                if graph.shapes[first][j] == graph.shapes[eqn.outs[0]][d]:
                    sp.unify(la[j], lo[d])
    elif name == "reshape":
        _reshape(graph, first, eqn.outs[0])
    elif name == "squeeze":
        la = graph.labels[first]
        graph.labels[eqn.outs[0]] = tuple(f for i, f in enumerate(la)
                                          if i not in set(d % len(la) for d in p["dimensions"]))
    elif name == "transpose":
        la = graph.labels[first]
        graph.labels[eqn.outs[0]] = tuple(la[d] for d in p["permutation"])
    elif name in REDUCTIONS:
        la = graph.labels[first]
        axes = set(p["axes"])
        for d in axes:
            if any(s == BATCH for _, s in sp.resolve(la[d])):
                raise GraphError(f"hf.export cannot take `{name}` over the batch axis (at "
                                 f"{eqn.where}): fn must treat each example on its own.")
            sp.freeze(la[d], f"it is reduced over ({name} at {eqn.where})")
        graph.labels[eqn.outs[0]] = tuple(f for i, f in enumerate(la) if i not in axes)
    elif name in WINDOWS:
        la, lo = graph.labels[first], _fresh(graph, eqn.outs[0])
        pads = p["padding"]
        for d, (w, s) in enumerate(zip(p["window_dimensions"], p["window_strides"])):
            if w == 1 and s == 1 and tuple(pads[d]) == (0, 0):
                sp.unify(la[d], lo[d])
            else:
                sp.freeze(la[d], "a pooling window runs over it")
                sp.freeze(lo[d], "a pooling window runs over it")
    elif name == "conv_general_dilated":
        _conv(graph, eqn)
    elif name == "dot_general":
        _dot(graph, eqn)
    elif name == "split":  # every output is a piece of the split axis; the others carried
        for o in eqn.outs:
            lo = _fresh(graph, o)
            for axis, (fa, fo) in enumerate(zip(graph.labels[first], lo)):
                if axis in cut_axes(eqn, graph.shapes[first]):
                    sp.freeze(fa, f"split at {eqn.where} cuts it")
                    sp.freeze(fo, f"split at {eqn.where} cuts it")
                else:
                    sp.unify(fa, fo)
    elif name in CUTS:
        lo = _fresh(graph, eqn.outs[0])
        cut = cut_axes(eqn, graph.shapes[first])
        operands = ins if name == "concatenate" else ins[:1]
        for a in operands:
            la = graph.labels[a]
            for d in range(len(lo)):
                if d in cut:
                    sp.freeze(la[d], f"{name} at {eqn.where} cuts or reorders it")
                    sp.freeze(lo[d], f"{name} at {eqn.where} cuts or reorders it")
                else:
                    sp.unify(la[d], lo[d])
    elif name == "gather":
        _gather(graph, eqn)
    elif name == "iota":
        _fresh(graph, eqn.outs[0])
    elif name == "sort":  # every operand sorted along one axis, the others carried
        d = p["dimension"]
        for o in eqn.outs:
            lo = _fresh(graph, o)
            for a in ins:
                for axis, (fa, fo) in enumerate(zip(graph.labels[a], lo)):
                    if axis == d:
                        sp.freeze(fa, f"sort at {eqn.where} reorders it")
                        sp.freeze(fo, f"sort at {eqn.where} reorders it")
                    else:
                        sp.unify(fa, fo)
    elif not graph.strict:  # counting only: whatever it touches stays whole
        why = f"`{name}` at {eqn.where}, which the graph does not know"
        for o in eqn.outs:
            lo = _fresh(graph, o)
            for a in ins:
                la = _label_of(graph, a)
                if la is not None and graph.shapes[a] == graph.shapes[o]:
                    for fa, fo in zip(la, lo):
                        sp.unify(fa, fo)
                for f in la or ():
                    sp.freeze(f, why)
            for f in lo:
                sp.freeze(f, why)
    else:
        raise GraphError(
            f"hf.export cannot take `{name}` (at {eqn.where}): the traced graph does not "
            f"know how channels flow through it. {ADVICE.get(name, DEFAULT_ADVICE)}")
    for o in eqn.outs:  # ops that write no label of their own (an unused output)
        if o not in graph.labels:
            _fresh(graph, o)


def gathered_axes(eqn: Eqn, shape: tuple) -> list:
    """Per operand axis of a gather, the output axis it is carried whole to, or None
    where the gather indexes or slices it (an embedding's vocabulary, resized rows)."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    indexed = set(dn.collapsed_slice_dims) | set(dn.start_index_map) | set(
        dn.operand_batching_dims)
    kept = [d for d in range(len(shape)) if d not in set(dn.collapsed_slice_dims)
            | set(dn.operand_batching_dims)]
    out = dict(zip(kept, dn.offset_dims))
    return [out[d] if d not in indexed and sizes[d] == shape[d] else None
            for d in range(len(shape))]


def _gather(graph: Graph, eqn: Eqn) -> None:
    """An embedding lookup (``nn.Embed``: a table's rows picked by token ids) or a
    nearest-neighbour resize (rows of x picked by a constant): the axes taken whole (an
    embedding's features, x's batch and channels) flow through; those indexed do not.
    The output's other axes are the indices' (their last axis is the index vector)."""
    sp, (operand, indices) = graph.spaces, eqn.ins[:2]
    lo = _fresh(graph, eqn.outs[0])
    lop, li = graph.labels[operand], graph.labels[indices]
    dn = eqn.params["dimension_numbers"]
    batch_out = [d for d in range(len(lo)) if d not in dn.offset_dims]
    for d, o in zip(range(len(li) - 1), batch_out):
        sp.unify(li[d], lo[o])
    per_example = dict(zip(dn.operand_batching_dims, dn.start_indices_batching_dims))
    carried = gathered_axes(eqn, graph.shapes[operand])
    for d, o in enumerate(carried):
        if o is not None:
            sp.unify(lop[d], lo[o])
        elif d in per_example:  # take_along_axis: example i picks from its own row
            sp.unify(lop[d], lo[batch_out[per_example[d]]])
        elif graph.strict and any(s == BATCH for _, s in sp.resolve(lop[d])):
            raise GraphError(f"hf.export cannot take a gather that picks along the batch "
                             f"axis (at {eqn.where}): fn must treat each example on its own.")
        else:
            sp.freeze(lop[d], f"gather at {eqn.where} indexes it")
    for d in set(range(len(lo))) - set(dn.offset_dims) - set(batch_out):
        sp.freeze(lo[d], f"gather at {eqn.where} writes it")
    for o in dn.offset_dims:  # sliced, not carried: the output's own
        if o not in carried:
            sp.freeze(lo[o], f"gather at {eqn.where} slices it")


def _label(graph: Graph) -> None:
    sp = graph.spaces
    for v in graph.param_ids + graph.const_ids:
        _fresh(graph, v)
    lx = _fresh(graph, graph.x_id)
    sp.union(BATCH, lx[0][0][1])
    for f in lx[1:]:
        sp.freeze(f, "an axis of the input x")
    for eqn in graph.eqns:
        _label_eqn(graph, eqn)
    for o in graph.out_ids:
        for f in _label_of(graph, o) or ():
            sp.freeze(f, "it reaches fn's output")


def _classify(graph: Graph) -> None:
    """Which values depend on x or carry the batch axis; the contractions with a kernel."""
    depends = {graph.x_id}
    runtime = {graph.x_id}
    # value -> (the params leaf it is, through casts; None, or the slice of its first axis)
    origin = {v: (v, None) for v in graph.param_ids}
    sliced = {}  # value -> (leaf, i): a leaf's entries i:i+1 of its first axis
    sp = graph.spaces
    for i, eqn in enumerate(graph.eqns):
        first = eqn.ins[0] if eqn.ins and not isinstance(eqn.ins[0], jex.core.Literal) else None
        if eqn.name in ("convert_element_type", "copy", "copy_p") and first in origin:
            origin[eqn.outs[0]] = origin[first]
        elif eqn.name == "slice" and first in origin and origin[first][1] is None:
            shape, p = graph.shapes[first], eqn.params
            if (p["limit_indices"][0] - p["start_indices"][0] == 1
                    and all(s == 1 for s in p["strides"] or ())
                    and tuple(p["start_indices"][1:]) == (0,) * (len(shape) - 1)
                    and tuple(p["limit_indices"][1:]) == shape[1:]):
                sliced[eqn.outs[0]] = (origin[first][0], p["start_indices"][0])
        elif eqn.name == "squeeze" and first in sliced and tuple(eqn.params["dimensions"]) == (0,):
            origin[eqn.outs[0]] = sliced[first]
        dyn = [a for a in eqn.ins if not isinstance(a, jex.core.Literal) and a in depends]
        if dyn:
            depends.update(eqn.outs)
        if dyn or any(a in runtime for a in eqn.ins if not isinstance(a, jex.core.Literal)) \
                or any(s == BATCH for o in eqn.outs for f in graph.labels[o]
                       for _, s in sp.resolve(f)):
            runtime.update(eqn.outs)
        if eqn.name in CONTRACTIONS:
            a, b = eqn.ins
            a_dyn = not isinstance(a, jex.core.Literal) and a in depends
            b_dyn = not isinstance(b, jex.core.Literal) and b in depends
            if a_dyn and b_dyn:
                _freeze_contracted(graph, eqn)
            elif a_dyn != b_dyn:
                graph.contractions.append(_contraction(graph, i, eqn, 0 if a_dyn else 1,
                                                       origin))
    graph.depends, graph.runtime = depends, runtime


def _freeze_contracted(graph: Graph, eqn: Eqn) -> None:
    why = f"two input-dependent values are contracted over it ({eqn.name} at {eqn.where})"
    lhs = graph.labels[eqn.ins[0]]
    if eqn.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
    else:
        lc = [eqn.params["dimension_numbers"].lhs_spec[1]]
    for d in lc:
        graph.spaces.freeze(lhs[d], why)
