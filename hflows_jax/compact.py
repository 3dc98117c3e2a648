"""``hf.export``: any pruned JAX function made smaller, by a rewrite of its own traced program.

``compact = hf.export(fn, params, masks, example)`` traces ``fn(params, x)``
(``hflows_jax.graph``), decides which channels of each coupling group can go, and re-runs
the traced program on smaller arrays:

- a channel is *unread* when every conv or dense kernel that reads it has only zero
  (pruned) weights from it to the channels that stay (a depthwise conv passes its
  channels on: the readers of its output decide);
- a channel is *constant* when it does not depend on ``x`` where it is read (every weight
  that fed it is pruned). Its contribution to each reader is computed once, from its
  value on ``example``, and added to the reader's output. Behind a padded conv that
  contribution changes at the border: ``border="keep"`` keeps such a channel,
  ``border="map"`` adds the exact per-position map instead.

Everything that does not depend on ``x`` (kernels, BatchNorm statistics, a hypernetwork's
generated weights) is computed once and stored, sliced. Dense layers whose kernel has
rows of zeros read only the inputs they need; very sparse ones can run as
``jax.experimental.sparse.BCSR`` (``bcsr=``), faster on CPU from batch ``BCSR_MIN_BATCH``
on (measurements below).

``tune=`` replaces such rules by measurements made at export, on the machine that
exports: per batch size the fastest of the compact, padded and masked dense programs,
each conv as XLA's conv or as a matmul of its patches (``Route``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import keystr

from hflows_jax import graph as graph_lib
from hflows_jax.masking import prunable_leaves, unwrap_nnx

PyTree = Any
BORDERS = ("keep", "map")
NO_MASKS = "this run has no masks: it is dense-only; nothing to export"
# bcsr=None: on the CPU backend, dense layers at most this dense run as BCSR; small kernels
# (at most BCSR_SMALL_KERNEL entries) up to BCSR_SMALL_DENSITY. Measured on the 2-core CPU
# (jit, median of 300), dense / BCSR ms at batch 16, 32, 256 -- 784x300: density 10 %
# 0.096/0.087, 0.070/0.084, 0.403/0.274; 15 % 0.123/0.128, 0.086/0.124, 0.427/0.423; 512x512
# at 15 %: 0.092/0.119, 0.128/0.132, 0.640/0.609; 168x79 at 20 %: 0.023/0.013, 0.022/0.015,
# 0.082/0.054; 300x100 at 20 %: 0.029/0.023, 0.066/0.026, 0.185/0.134, at 30 % 0.146/0.239
# at batch 256. Not measured on GPU or TPU.
BCSR_AUTO_DENSITY = 0.1
BCSR_SMALL_KERNEL = 32_768
BCSR_SMALL_DENSITY = 0.2
# bcsr=None: below this batch size the dense kernels run (LeNet-300-100 at 98 %, serialized,
# median of 100 calls: batch 1 BCSR 0.092 ms vs dense kernels 0.032 ms; batch 32: 0.120 vs
# 0.162 ms; batch 256: 0.252 vs 0.434 ms). Batches 2 to 15 were not measured.
BCSR_MIN_BATCH = 16
# What a BCSR matmul lowers to on CPU (jax 0.10): registered by importing
# jax.experimental.sparse, which a reader of an exported file with BCSR layers needs too.
BCSR_CUSTOM_CALL = "cpu_csr_sparse_dense_ffi"
MAX_ROUNDS = 50
# export(..., tune=): the channel multiple of the "padded" candidate (XLA:CPU's convs run
# thin odd channel counts slower than wider multiples of 8: experiments.conv_speed).
PADDED_MULTIPLE = 8
TUNE_REPEATS = 20  # timed calls per program and batch size, at most ...
TUNE_SECONDS = 5.0  # ... and about this long in all (at least 3 calls each)


def _is_none(x) -> bool:
    return x is None


def _is_literal(a) -> bool:
    return isinstance(a, jex.core.Literal)


def _evaluate(graph: graph_lib.Graph, env: dict, which: set | None = None) -> dict:
    """Run the traced program's equations (those writing ``which``) on ``env``'s values."""
    env = dict(env)
    for eqn in graph.eqns:
        if which is not None and not any(o in which for o in eqn.outs):
            continue
        args = [a.val if _is_literal(a) else env[a] for a in eqn.ins]
        outs = eqn.prim.bind(*args, **eqn.params)
        for o, val in zip(eqn.outs, outs if eqn.prim.multiple_results else [outs]):
            env[o] = val
    return env


# ---------------------------------------------------------------------------------------
# Which channels go.

def _axis_index(factors: tuple, keep: dict) -> np.ndarray | None:
    """Flat indices of an axis's kept entries (its factors' kept channels, row-major);
    None when it keeps all."""
    if not any(s in keep and not keep[s].all() for _, s in factors):
        return None
    sets = [np.flatnonzero(keep[s]) if s in keep else np.arange(n) for n, s in factors]
    grids = np.meshgrid(*sets, indexing="ij")
    return np.ravel_multi_index(grids, [n for n, _ in factors]).ravel()


def _per_channel(array: np.ndarray, axis: int, factors: tuple, space: int) -> np.ndarray:
    """``any`` of a boolean array over everything but one factor of one axis."""
    sizes = [n for n, _ in factors]
    j = [s for _, s in factors].index(space)
    moved = np.moveaxis(array, axis, -1)
    moved = moved.reshape(moved.shape[:-1] + tuple(sizes))
    moved = np.moveaxis(moved, moved.ndim - len(sizes) + j, -1)
    return moved.reshape(-1, sizes[j]).any(axis=0)


def _channel_vector(vector: dict, factors: tuple, default: float):
    """A per-entry vector over an axis from per-channel vectors of its factors (product;
    numpy or jax arrays alike)."""
    out = np.ones((), np.float32)
    for n, s in factors:
        v = vector[s] if s in vector else np.full(n, default, np.float32)
        out = (out[..., None] * v).reshape(-1)
    return out


def _one_example(graph: graph_lib.Graph, v: int, value) -> np.ndarray | None:
    """``value`` at the first example, its batch axis kept at size 1; None when the batch
    is not an axis of its own (merged with tokens, say)."""
    axes = [a for a in range(len(graph.shapes[v]))
            if any(s == graph_lib.BATCH for _, s in graph.factors(v, a))]
    if len(axes) != 1 or len(graph.factors(v, axes[0])) != 1:
        return None
    return np.take(np.asarray(value, np.float64), [0], axis=axes[0])


def _along(array_shape: tuple, axis: int, vec: np.ndarray) -> np.ndarray:
    shape = [1] * len(array_shape)
    shape[axis] = array_shape[axis]
    return vec.reshape(shape)


class _Analysis:
    """The fixed point of "a channel goes when every reader can do without it"."""

    def __init__(self, graph: graph_lib.Graph, static: dict, values: dict, border: str):
        self.graph, self.static, self.values, self.border = graph, static, values, border
        self.groups = graph.groups
        self.readers = graph.contractions
        self.keep = {s: np.ones(n, bool) for s, n in self.groups.items()}
        self.forced = {s: np.zeros(n, bool) for s, n in self.groups.items()}
        self.deltas = {}

    def factors(self, v, axis):
        return self.graph.factors(v, axis)

    def kernel_nonzero(self, r: graph_lib.Contraction) -> np.ndarray:
        """The kernel's nonzero pattern, its output axes cut to the kept channels."""
        k = self.graph.eqns[r.eqn].ins[r.kernel]
        nz = np.asarray(self.static[k]) != 0
        for axis in r.out_axes:
            index = _axis_index(self.factors(k, axis), self.keep)
            if index is not None:
                nz = np.take(nz, index, axis=axis)
        return nz

    @functools.cached_property
    def _dependence(self):
        """``keep -> {reader's data value: where it depends on x}``, compiled once."""
        g = self.graph
        readers = {r.eqn: r for r in self.readers}
        wanted = {g.eqns[r.eqn].ins[r.data] for r in self.readers}
        nonzero = {i: jnp.asarray(np.asarray(self.static[g.eqns[i].ins[r.kernel]]) != 0,
                                  jnp.float32) for i, r in readers.items()}

        def run(keep):
            dep = {g.x_id: jnp.ones(g.shapes[g.x_id], jnp.float32)}
            for i, eqn in enumerate(g.eqns):
                if not any(o in g.runtime for o in eqn.outs):
                    continue
                ins = [None if _is_literal(a) or a not in dep else dep[a] for a in eqn.ins]
                shape = g.shapes[eqn.outs[0]]
                if all(a is None for a in ins):
                    res = jnp.zeros(shape, jnp.float32)
                elif i in readers:
                    r = readers[i]
                    data, v = ins[r.data], eqn.ins[r.data]
                    if data is None:
                        res = jnp.zeros(shape, jnp.float32)
                    else:
                        for axis in r.data_axes:  # removed channels feed nothing
                            vec = _channel_vector(keep, self.factors(v, axis), 1.0)
                            data = data * _along(data.shape, axis, vec)
                        args = [None, None]
                        args[r.data], args[r.kernel] = data, nonzero[i]
                        res = (eqn.prim.bind(*args, **dict(
                            eqn.params, preferred_element_type=jnp.float32)) > 0)
                elif eqn.name in graph_lib.CONTRACTIONS:  # x on both sides
                    res = jnp.ones(shape, jnp.float32)
                else:
                    res = self._structural(eqn, ins, shape)
                for o in eqn.outs:
                    dep[o] = (res.astype(jnp.float32).reshape(g.shapes[o])
                              if len(eqn.outs) == 1 else jnp.ones(g.shapes[o], jnp.float32))
            return {v: dep[v] > 0 for v in wanted}

        return jax.jit(run)

    def dependence(self) -> dict:
        """Per reader's data value, where it depends on x, the removed channels cut."""
        keep = {s: jnp.asarray(k, jnp.float32) for s, k in self.keep.items()}
        return {v: np.asarray(d) for v, d in self._dependence(keep).items()}

    def _structural(self, eqn, ins, out_shape):
        """Where an op's output depends on x: the op itself run on 0/1 dependence maps
        (a max where it would take a min or an index)."""
        name = eqn.name
        if name in graph_lib.ELEMENTWISE:
            out = jnp.zeros(out_shape, jnp.float32)
            for a in ins:
                if a is not None:
                    out = jnp.maximum(out, jnp.broadcast_to(a, out_shape))
            return out
        x = ins[0] if ins[0] is not None else jnp.zeros(self.graph.shapes[eqn.ins[0]],
                                                         jnp.float32)
        params = dict(eqn.params)
        prim = eqn.prim
        if name in graph_lib.REDUCTIONS:
            return jnp.max(x, axis=tuple(params["axes"])) if x.ndim else x
        if name in graph_lib.WINDOWS:
            return lax.reduce_window(
                x, 0.0, lax.max, params["window_dimensions"], params["window_strides"],
                params["padding"], params.get("base_dilation"), params.get("window_dilation"))
        if name in graph_lib.CUMULATIVE:
            return lax.cummax(x, axis=params["axis"], reverse=params["reverse"])
        if name == "pad":
            return prim.bind(x, jnp.zeros((), jnp.float32), **params)
        if name == "concatenate":
            parts = [a if a is not None else jnp.zeros(self.graph.shapes[v], jnp.float32)
                     for a, v in zip(ins, eqn.ins)]
            return prim.bind(*parts, **params)
        if name == "broadcast_in_dim":
            return prim.bind(x, *ins[1:], **params)
        if name == "gather":  # picked by x (an embedding): wherever x is; else as picked
            if ins[1] is not None:
                return jnp.ones(out_shape, jnp.float32)
            return prim.bind(x, jnp.asarray(self.static[eqn.ins[1]]), **params)
        if name == "sort":  # a sorted position may come from anywhere along the axis
            return jnp.broadcast_to(jnp.max(x, axis=params["dimension"], keepdims=True),
                                    out_shape)
        return prim.bind(x, **params)

    def step(self) -> bool:
        """One round: recompute which channels go; True when nothing changed."""
        dep = self.dependence()
        removable = {s: ~self.forced[s] for s in self.groups}
        const_read = []
        for r in self.readers:
            if r.depthwise:  # channel c in is channel c out, in the same group: its fate
                continue  # is the readers' of the output
            eqn = self.graph.eqns[r.eqn]
            v = eqn.ins[r.data]
            nz = self.kernel_nonzero(r)
            for d_axis, k_axis in zip(r.data_axes, r.read_axes):
                factors = self.factors(v, d_axis)
                for _, s in factors:
                    if s not in self.groups:
                        continue
                    reads = _per_channel(nz, k_axis, self.factors(eqn.ins[r.kernel], k_axis), s)
                    depends = _per_channel(dep[v], d_axis, factors, s)
                    removable[s] &= ~reads | ~depends
                    const_read.append((r, d_axis, s, reads & ~depends))
        changed = any((~removable[s] != self.keep[s]).any() for s in self.groups)
        self.keep = {s: ~removable[s] for s in self.groups}
        if changed:
            return False
        return not self._fold(const_read)

    def _fold(self, const_read) -> bool:
        """Each reader's contribution from the constant channels it loses; True when a
        channel must come back (``border="keep"``)."""
        by_reader = {}
        for r, d_axis, s, const in const_read:
            by_reader.setdefault(id(r), (r, []))[1].append((d_axis, s, const & ~self.keep[s]))
        self.deltas, forced = {}, False
        for r, parts in by_reader.values():
            eqn = self.graph.eqns[r.eqn]
            v = eqn.ins[r.data]
            if not any(c.any() for _, _, c in parts):
                continue
            data = _one_example(self.graph, v, self.values[v])
            if data is None:  # the batch shares an axis: no per-example constant to add
                for _, s, const in parts:
                    self.forced[s] |= const & ~self.keep[s]
                forced = True
                continue
            mask = np.ones(data.shape, bool)
            for d_axis, s, const in parts:
                vec = _channel_vector({s: const.astype(np.float32)}, self.factors(v, d_axis),
                                      1.0)
                mask = mask & (_along(data.shape, d_axis, vec) > 0)
            args = [None, None]
            args[r.data] = jnp.asarray(np.where(mask, data, 0.0), jnp.float32)
            args[r.kernel] = jnp.asarray(self.static[eqn.ins[r.kernel]], jnp.float32)
            delta = np.asarray(eqn.prim.bind(*args, **dict(
                eqn.params, preferred_element_type=jnp.float32)), np.float32)
            delta = self._collapse(eqn.outs[0], delta, r.positions)
            if delta is None:  # varies along a spatial axis: the border
                for d_axis, s, const in parts:
                    nonzero = _per_channel(np.where(mask, data, 0.0) != 0, d_axis,
                                           self.factors(v, d_axis), s)
                    self.forced[s] |= const & ~self.keep[s] & nonzero
                forced = True
            elif np.any(delta != 0):
                self.deltas[r.eqn] = delta
        return forced

    def _collapse(self, out: int, delta: np.ndarray, axes: list) -> np.ndarray | None:
        """``delta`` reduced to size 1 along the output axes that come from the data (a
        conv's spatial axes) where it is uniform; None where it is not and
        ``border="keep"``."""
        for axis in axes:
            factors = self.factors(out, axis)
            if delta.shape[axis] == 1 or any(s == graph_lib.BATCH for _, s in factors):
                continue
            first = np.take(delta, [0], axis=axis)
            scale = max(float(np.max(np.abs(delta))), 1e-30)
            if np.allclose(delta, first, rtol=1e-5, atol=1e-6 * scale):
                delta = first
            elif self.border == "keep":
                return None
        return delta


# ---------------------------------------------------------------------------------------
# The compact program.

@dataclasses.dataclass(frozen=True)
class Route:
    """From ``batch`` examples on (up to the next route's), the compact model runs
    ``program`` (``"compact"``, ``"padded"``: channel counts rounded up to
    ``PADDED_MULTIPLE``, ``"dense"``: the masked model as traced), its BCSR layers as
    BCSR matrices when ``sparse``, and the convs at the step indices ``im2col`` as
    ``conv_as_matmul``."""

    batch: int
    program: str = "compact"
    sparse: bool = False
    im2col: tuple = ()  # the program's convs (step indices) run as patches times a matrix

    @property
    def name(self) -> str:
        return (self.program + ("+bcsr" if self.sparse else "")
                + (f"+im2col({len(self.im2col)})" if self.im2col else ""))


@dataclasses.dataclass(frozen=True, eq=False)
class Compact:
    """A compact model: ``compact(x)`` gives ``fn``'s outputs on ``x`` (any batch size).

    ``params``: the arrays it runs on (by param path where an array is one, a kernel
    with the BatchNorm scale after it folded in; ``<kernel path>/bias`` or
    ``"delta/<n>"`` what is added to a layer's output; else ``"const/<n>"``; a second
    program's are prefixed ``"padded:"`` or ``"dense:"``);
    ``macs``/``dense_macs``: multiply-adds per example of the conv and dense layers,
    compact and as traced; ``groups``: channels kept per coupling group; ``routes``: which
    program runs from which batch size on, ``timings`` the measurements that chose them
    (``export(..., tune=...)``: batch -> program -> median ms); ``exported()``: a
    ``jax.export.Exported`` with a symbolic batch size.
    """

    params: dict
    macs: int
    dense_macs: int
    groups: dict  # group name -> (kept, total)
    programs: dict = dataclasses.field(repr=False)  # name -> program
    example: jax.ShapeDtypeStruct = dataclasses.field(repr=False)
    routes: tuple = (Route(0),)
    layers: tuple = ()  # Layer per conv or dense layer
    params_compact: int = 0  # entries stored (BCSR: its nonzeros; not index arrays)
    params_dense: int = 0  # entries of fn's params and of the arrays it closes over
    params_nonzero: int = 0  # ... that the masks keep
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def has_bcsr(self) -> bool:
        """Whether some batch size runs BCSR layers (a reader needs jax.experimental.sparse)."""
        return any(r.sparse for r in self.routes)

    @property
    def masked_macs(self) -> int:
        """Multiply-adds per example on the masked model's nonzero kernel entries."""
        return sum(r.masked for r in self.layers)

    def route(self, batch: int) -> Route:
        """The route a batch of ``batch`` examples takes."""
        return [r for r in self.routes if r.batch <= batch][-1]

    def summary(self) -> str:
        """A per-layer table of multiply-adds per example, and the routes by batch size."""
        lines = [f"{'layer':<40} {'dense':>12} {'masked':>12} {'compact':>12}"]
        for r in self.layers:
            name = r.name + (" (BCSR)" if r.bcsr else "")
            if len(name) > 40:  # keep the end: an op's file and line
                name = "..." + name[-37:]
            lines.append(f"{name:<40} {r.dense:>12} {r.masked:>12} {r.compact:>12}")
        lines.append(f"{'total':<40} {self.dense_macs:>12} {self.masked_macs:>12} "
                     f"{self.macs:>12}")
        if len(self.routes) > 1 or self.routes[0].name != "compact":
            lines.append("runs: " + ", ".join(f"{r.name} from batch {max(r.batch, 1)}"
                                              for r in self.routes))
        return "\n".join(lines)

    def forward(self, params: dict, x: jax.Array):
        """``compact(x)`` with the arrays as an argument (for jit, export, sharding)."""
        runs = [functools.partial(_run, self.programs[r.program], params, x, r.sparse,
                                  frozenset(r.im2col)) for r in self.routes]
        batch = x.shape[0]
        if len(runs) == 1:
            return runs[0]()
        if isinstance(batch, int):
            return runs[self.routes.index(self.route(batch))]()
        index = sum((jnp.asarray(batch) >= r.batch).astype(jnp.int32) for r in self.routes[1:])
        return lax.switch(index, runs)  # on the symbolic batch: one branch once it is known

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self.forward)

    def __call__(self, x: jax.Array):
        return self._jitted(self.params, x)

    def exported(self, batch: str = "b") -> jax.export.Exported:
        """The compact model for ``jax.export.serialize``; arrays inside, batch symbolic.

        With BCSR layers on CPU, the file holds ``BCSR_CUSTOM_CALL``: a reader needs
        ``import jax.experimental.sparse`` (which registers it) and a jaxlib like this one.
        """
        (b,) = jax.export.symbolic_shape(batch)
        spec = jax.ShapeDtypeStruct((b,) + tuple(self.example.shape[1:]), self.example.dtype)
        checks = []
        if self.has_bcsr:
            checks = [jax.export.DisabledSafetyCheck.custom_call(BCSR_CUSTOM_CALL)]
        return jax.export.export(jax.jit(functools.partial(self.forward, self.params)),
                                 disabled_checks=checks)(spec)


@dataclasses.dataclass(frozen=True)
class _Step:
    eqn: graph_lib.Eqn
    ins: tuple  # ("v", id) | ("p", name) | ("lit", value)
    params: tuple  # key -> value, or a _Shape for shape params
    delta: str | None = None
    rows: str | None = None  # dense layer: gather these inputs first
    sparse: str | None = None  # dense layer: this BCSR matrix of the transposed kernel
    outs: tuple | None = None  # where it writes, if not eqn.outs (affine ops folded in)


@dataclasses.dataclass(frozen=True)
class _Shape:
    dims: tuple  # per axis: (fixed part, batch power)


def _shape(shape: _Shape, batch) -> tuple:
    return tuple(n * batch ** k if k else n for n, k in shape.dims)


def _run(program: tuple, params: dict, x, sparse: bool, im2col: frozenset = frozenset(),
         inputs: dict | None = None):
    """The program on ``x``; ``inputs``, if given, gets each conv's arguments."""
    env = {"x": x}
    batch = x.shape[0]
    outs = None
    for i, step in enumerate(program):
        if isinstance(step, tuple):  # ("outputs", refs, tree): the last step
            leaves = [env[ref] if kind == "v" else params[ref] if kind == "p" else ref
                      for kind, ref in step[1]]
            outs = jax.tree.unflatten(step[2], leaves)
            continue
        use_sparse = step.sparse is not None and sparse
        args = []
        for kind, ref in step.ins[:1] if use_sparse else step.ins:
            args.append(env[ref] if kind == "v" else params[ref] if kind == "p" else ref)
        kw = {k: (_shape(v, batch) if isinstance(v, _Shape) else v) for k, v in step.params}
        if use_sparse:
            data = args[0] if step.rows is None else jnp.take(args[0], params[step.rows],
                                                              axis=-1)
            lead = data.shape[:-1]
            flat = data.reshape((-1, data.shape[-1]))
            y = (params[step.sparse] @ flat.T).T
            out = y.reshape(lead + (y.shape[-1],)).astype(kw.get(
                "preferred_element_type") or data.dtype)
        elif i in im2col:
            out = conv_as_matmul(*args, **kw)
        else:
            if step.rows is not None:
                args[0] = jnp.take(args[0], params[step.rows], axis=-1)
            if inputs is not None and step.eqn.name == "conv_general_dilated":
                inputs[i] = (args, kw)
            out = step.eqn.prim.bind(*args, **kw)
        if step.delta is not None:
            out = out + params[step.delta]
        results = out if step.eqn.prim.multiple_results else [out]
        for o, val in zip(step.outs or step.eqn.outs, results):
            env[o] = val
    return outs


def conv_as_matmul(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, precision=None, preferred_element_type=None,
                   **unused):
    """A 2-D conv (one feature group) as its input's patches times the kernel as a
    matrix: the same sums, one matmul. XLA:CPU runs some convs far slower than that
    matmul (512 to 512 channels on a 2x2 image: 13.6 ms against 1.6 ms at batch 1)."""
    del unused
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nhwc = lhs.transpose(lhs_spec[0], lhs_spec[2], lhs_spec[3], lhs_spec[1])
    ihwo = rhs.transpose(rhs_spec[1], rhs_spec[2], rhs_spec[3], rhs_spec[0])
    patches = lax.conv_general_dilated_patches(
        nhwc, ihwo.shape[1:3], window_strides, padding, lhs_dilation, rhs_dilation,
        ("NHWC", "HWIO", "NHWC"), precision, preferred_element_type)  # features: C major
    out = jnp.matmul(patches, ihwo.reshape(-1, ihwo.shape[-1]), precision=precision,
                     preferred_element_type=preferred_element_type)
    source = {out_spec[0]: 0, out_spec[2]: 1, out_spec[3]: 2, out_spec[1]: 3}
    return out.transpose([source[axis] for axis in range(4)])


def _matmul_convs(program: tuple, params: dict, x, sparse: bool, repeats: int,
                  verdicts: dict) -> tuple:
    """The step indices of ``program``'s convs that run faster as ``conv_as_matmul`` on
    ``x``'s batch, each timed alone on its own input's shape, here (by 10 % at least);
    ``verdicts`` keeps each shape's answer for the next call."""
    inputs = {}
    jax.eval_shape(functools.partial(_run, program, inputs=inputs, sparse=sparse), params, x)
    faster = []
    for i, (args, kw) in sorted(inputs.items()):
        if (program[i].eqn.params["feature_group_count"] != 1
                or program[i].eqn.params["batch_group_count"] != 1 or args[0].ndim != 4
                or program[i].ins[1][0] != "p"):
            continue
        rhs = params[program[i].ins[1][1]]
        key = (args[0].shape, args[0].dtype, rhs.shape, repr(sorted(kw.items())))
        if key not in verdicts:  # a ResNet repeats its blocks' shapes
            lhs = jax.random.normal(jax.random.key(i), args[0].shape, args[0].dtype)
            conv = jax.jit(functools.partial(program[i].eqn.prim.bind, **kw))
            matmul = jax.jit(functools.partial(conv_as_matmul, **kw))
            ms = median_ms({"conv": functools.partial(conv, lhs, rhs),
                            "matmul": functools.partial(matmul, lhs, rhs)}, repeats,
                           budget_s=TUNE_SECONDS / 4)
            verdicts[key] = ms["matmul"] < 0.9 * ms["conv"]
        if verdicts[key]:
            faster.append(i)
    return tuple(faster)


def _aligned_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``masks`` in the structure of ``params``, matched by path (an ``nnx.State`` of masks
    fits a dict of params and the other way round); a clear error where they differ."""
    if masks is None or not prunable_leaves(masks):
        raise ValueError(NO_MASKS)
    path = lambda p: keystr(p, simple=True, separator="/")  # noqa: E731
    by_path = {path(p): m for p, m in jax.tree.leaves_with_path(masks, is_leaf=_is_none)}
    shapes = {path(p): np.shape(x) for p, x in jax.tree.leaves_with_path(params)}
    problems = [f"no mask for {k}" for k in shapes if k not in by_path]
    problems += [f"a mask for {k}, which params lack" for k in by_path if k not in shapes]
    problems += [f"mask {k} has shape {np.shape(m)}, its param {shapes[k]}"
                 for k, m in by_path.items() if m is not None and k in shapes
                 and np.shape(m) != shapes[k]]
    if problems:
        raise ValueError("masks do not match params: " + "; ".join(problems[:6])
                         + (" ..." if len(problems) > 6 else ""))
    return jax.tree.map_with_path(lambda p, _: by_path[path(p)], params)


def export(fn: Callable, params: PyTree, masks: PyTree, example: jax.Array, *,
           border: str = "keep", bcsr: bool | None = None,
           channel_multiple: int = 1, tune: Sequence[int] | None = None) -> Compact:
    """The compact model of ``fn(params, x)`` under ``masks``.

    Args:
      fn: a pure function ``fn(params, x) -> outputs`` (eval mode): e.g.
        ``lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=False)``,
        or ``lambda p, x: nnx.merge(graphdef, p, rest)(x)``.
      params: its params, masked or not (the masks decide).
      masks: ``hf.masks(opt_state)``, or the same tree of 0/1 arrays; ``None`` leaves are
        not pruned.
      example: an input batch (axis 0 is the batch; any size).
      border: ``"keep"`` or ``"map"``: what happens to a constant channel that a padded
        conv reads (see the module docstring).
      bcsr: run dense layers as BCSR matrices: ``True`` always, ``False`` never, ``None``
        on CPU for kernels at most ``BCSR_AUTO_DENSITY`` dense, from batch
        ``BCSR_MIN_BATCH`` on.
      channel_multiple: round every group's compact channel count up to a multiple of
        this (at most its dense count) with channels of zeros, in every array: they
        compute 0 and add nothing. Convs with odd channel counts can run slower on
        XLA:CPU than wider ones with multiples of 8 (``experiments.conv_speed``); the
        compact model's ``macs`` count the zeros too.
      tune: batch sizes to measure at, here, now: at each (and up to the next) the
        compact model runs the fastest of its programs -- compact with its BCSR layers
        dense or sparse, channel counts padded to ``PADDED_MULTIPLE``, or the masked dense
        model -- so that no batch size runs slower than dense (``Compact.routes``,
        ``Compact.timings``); in each, every conv as XLA's conv or as a matmul of its
        patches (``conv_as_matmul``), as its own timing here says. Timing makes export
        slower: up to ``TUNE_SECONDS`` per program and batch size, and a quarter of that
        per conv shape. ``None``: the compact program, BCSR layers by ``bcsr``.

    Raises:
      ValueError: without masks, for mismatched trees, a bad ``border``.
      hflows_jax.graph.GraphError: for an op the traced graph cannot take.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}.")
    if int(channel_multiple) != channel_multiple or channel_multiple < 1:
        raise ValueError(f"channel_multiple must be a positive integer, got "
                         f"{channel_multiple!r}.")
    if tune is not None and (isinstance(tune, (int, str)) or not tune
                             or any(int(b) != b or b < 1 for b in tune)):
        raise ValueError(f"tune must be a sequence of positive batch sizes, got {tune!r}.")
    params = unwrap_nnx(params)
    masks = _aligned_masks(params, unwrap_nnx(masks))
    masked = jax.tree.map(lambda x, m: x if m is None else jnp.where(
        jnp.asarray(m, bool), x, jnp.zeros((), x.dtype)), params, masks, is_leaf=_is_none)
    nonzero = sum(int(np.size(x)) if m is None else int(np.count_nonzero(m)) for x, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=_is_none)))
    example = jnp.asarray(example)
    if example.ndim == 0:
        raise ValueError("example must be a batch of inputs (axis 0: batch).")
    if example.shape[0] == 1:  # a batch of 1 cannot tell the batch axis from a size-1 axis
        example = jnp.concatenate([example, example])
    graph = graph_lib.trace(fn, masked, example)

    leaves = jax.tree.leaves(masked)
    env = dict(zip(graph.param_ids, leaves))
    env.update(zip(graph.const_ids, [jnp.asarray(c) for c in graph.consts]))
    static = jax.jit(lambda env: _evaluate(graph, env, {
        o for e in graph.eqns for o in e.outs if o not in graph.runtime}))(env)
    readers = {graph.eqns[c.eqn].ins[c.data] for c in graph.contractions}
    values = jax.jit(lambda env: {v: e for v, e in _evaluate(graph, env, graph.runtime).items()
                                  if v in readers})({**static, graph.x_id: example})

    analysis = _Analysis(graph, static, values, border)
    for _ in range(MAX_ROUNDS):
        if analysis.step():
            break
    else:
        raise RuntimeError("hf.export: the channel analysis did not settle; please report.")
    zeros = _padding(analysis.keep, int(channel_multiple))
    compact = _build(graph, analysis, static, example, bcsr, nonzero, zeros)
    if tune is None:
        return compact
    return _tune(compact, graph, analysis, static, example, tune, bcsr,
                 int(channel_multiple), TUNE_REPEATS)


def _padding(keep: dict, multiple: int) -> dict:
    """Per group, the removed channels to keep as zeros, so that every count of kept
    channels is a multiple of ``multiple`` (or the group's whole size)."""
    zeros = {}
    for s, k in keep.items():
        kept = int(k.sum())
        want = min(k.size, -(-kept // multiple) * multiple)
        pad = np.zeros(k.size, bool)
        pad[np.flatnonzero(~k)[:want - kept]] = True
        zeros[s] = pad
    return zeros


def _compact_shape(graph, keep, v) -> _Shape:
    dims = []
    for axis in range(len(graph.shapes[v])):
        n, k = 1, 0
        for size, s in graph.factors(v, axis):
            if s == graph_lib.BATCH:
                k += 1
            else:
                n *= int(keep[s].sum()) if s in keep else size
        dims.append((n, k))
    return _Shape(tuple(dims))


def _slice(graph, keep, v, value, zeros: dict | None = None) -> np.ndarray:
    """``value`` cut to the ``keep`` channels of its axes; entries of the ``zeros``
    channels (kept as padding) set to 0."""
    value = np.asarray(value)
    for axis in range(value.ndim):
        factors = graph.factors(v, axis)
        index = _axis_index(factors, keep)
        if index is not None:
            value = np.take(value, index, axis=axis)
            if zeros and any(s in zeros and zeros[s].any() for _, s in factors):
                sets = [zeros.get(s, np.zeros(n, bool)) for n, s in factors]
                flags = np.logical_or.reduce(np.meshgrid(*sets, indexing="ij")).ravel()
                value = np.where(_along(value.shape, axis, flags[index]), 0, value)
    return value


SHAPE_PARAMS = {"reshape": "new_sizes", "broadcast_in_dim": "shape", "iota": "shape"}


def _program(graph, keep, zeros, deltas, static, bcsr, prefix="") -> tuple[dict, list, bool]:
    """``(arrays, program, has_bcsr)``: the traced program's per-call steps on arrays cut
    to ``keep`` (``zeros``: kept channels set to 0), with ``deltas`` added to the readers
    of removed constant channels; array names start with ``prefix``."""
    names = {v: prefix + p for v, p in zip(graph.param_ids, graph.param_paths)}
    names.update({graph.eqns[c.eqn].ins[c.kernel]:  # a scanned stack's kernel i: "path[i]"
                  f"{names[c.param]}[{c.layer}]" for c in graph.contractions
                  if c.layer is not None})
    arrays, program = {}, []
    readers = {r.eqn: r for r in graph.contractions}
    on_cpu = jax.default_backend() == "cpu"
    has_bcsr = False

    def ref(a):
        if _is_literal(a):
            return ("lit", a.val)
        if a == graph.x_id:
            return ("v", "x")
        if a in graph.runtime:
            return ("v", a)
        name = names.get(a, f"{prefix}const/{a}")
        if name not in arrays:
            arrays[name] = jnp.asarray(_slice(graph, keep, a, static[a], zeros))
        return ("p", name)

    for i, eqn in enumerate(graph.eqns):
        if not any(o in graph.runtime for o in eqn.outs):
            continue
        params = dict(eqn.params)
        out = eqn.outs[0]
        if eqn.name in SHAPE_PARAMS:
            params[SHAPE_PARAMS[eqn.name]] = _compact_shape(graph, keep, out)
            if eqn.name == "reshape":
                params["dimensions"] = None
        if eqn.name == "gather":  # slices as wide as the compact axes it takes whole
            operand = _compact_shape(graph, keep, eqn.ins[0]).dims
            params["slice_sizes"] = _Shape(tuple(
                operand[d] if o is not None else (params["slice_sizes"][d], 0)
                for d, o in enumerate(graph_lib.gathered_axes(eqn, graph.shapes[eqn.ins[0]]))))
        if eqn.name in graph_lib.CUTS or eqn.name == "split":
            _check_batch_untouched(graph, eqn)
        if eqn.name == "slice":  # uncut axes run over their compact sizes
            cut = graph_lib.cut_axes(eqn, graph.shapes[eqn.ins[0]])
            dims = _compact_shape(graph, keep, eqn.ins[0]).dims
            params["limit_indices"] = _Shape(tuple(
                (params["limit_indices"][d], 0) if d in cut else dims[d]
                for d in range(len(dims))))
        r = readers.get(i)
        if r is not None and r.depthwise:  # as many groups as its compact channels
            dn = params["dimension_numbers"]
            params["feature_group_count"] = _compact_shape(
                graph, keep, eqn.ins[0]).dims[dn.lhs_spec[1]][0]
        ins = [ref(a) for a in eqn.ins]
        step = dict(delta=None, rows=None, sparse=None)
        if i in deltas:
            name = f"{prefix}delta/{i}"
            arrays[name] = jnp.asarray(_slice(graph, keep, out, deltas[i], zeros),
                                       graph.dtypes[out])
            step["delta"] = name
        if r is not None and eqn.name == "dot_general" and _is_dense_layer(graph, eqn, r):
            kernel = np.asarray(arrays[ins[1][1]])
            rows = np.flatnonzero((kernel != 0).any(axis=1))
            name = ins[1][1]
            if len(rows) < kernel.shape[0]:  # read only the inputs it has weights for
                arrays[f"{name}/rows"] = jnp.asarray(rows, jnp.int32)
                arrays[f"{name}/read"] = jnp.asarray(kernel[rows])
                ins[1] = ("p", f"{name}/read")
                step["rows"], kernel = f"{name}/rows", kernel[rows]
            entries = int(np.count_nonzero(kernel))
            density = BCSR_SMALL_DENSITY if kernel.size <= BCSR_SMALL_KERNEL else BCSR_AUTO_DENSITY
            sparse = (on_cpu and entries <= density * kernel.size) if bcsr is None else bool(bcsr)
            if sparse and entries > 0:
                from jax.experimental.sparse import BCSR
                arrays[f"{name}/bcsr"] = BCSR.fromdense(jnp.asarray(kernel.T))
                step["sparse"], has_bcsr = f"{name}/bcsr", True
                if bcsr:  # always sparse: the dense kernel is never read
                    ins[1] = ("lit", None)
        program.append(_Step(eqn, tuple(ins), tuple(params.items()), **step))
    outputs = ("outputs", tuple(ref(o) for o in graph.out_ids), graph.out_tree)
    program = _fold_affine(program, arrays, outputs, graph)
    return arrays, program + [outputs], has_bcsr


AFFINE = ("add", "sub", "mul")


def _feature_axes(graph, step: _Step) -> tuple[int, int] | None:
    """(output axis, kernel axis) of a conv or dense layer's output channels, if its
    kernel (second operand) is a stored array; None for other steps."""
    if step.sparse is not None or len(step.ins) < 2 or step.ins[1][0] != "p":
        return None
    if step.eqn.name == "conv_general_dilated":
        dn = step.eqn.params["dimension_numbers"]
        return dn.out_spec[1], dn.rhs_spec[0]
    if step.eqn.name == "dot_general" and _is_dense_contraction(graph, step.eqn):
        return len(graph.shapes[step.eqn.outs[0]]) - 1, 1
    return None


def _fold_affine(program: list, arrays: dict, outputs: tuple, graph) -> list:
    """``program`` with every add, sub or mul of a stored per-channel array that follows
    a conv or dense layer folded into its kernel and the bias added to its output
    (``delta``): BatchNorm and the layer's own bias, as inference runs them. Only where
    nothing else reads the value in between; ``arrays`` gets the folded arrays."""
    uses: dict = {}  # value or array -> how many steps read it
    for step in program + [outputs]:
        for kind, ref in (step.ins if isinstance(step, _Step) else step[1]):
            if kind != "lit":
                uses[kind, ref] = uses.get((kind, ref), 0) + 1
    folded, open_layers = [], {}  # value -> (index in folded, out axis, kernel axis)
    for step in program:
        var = next((ref for kind, ref in step.ins if kind == "v" and ref in open_layers),
                   None)
        layer = open_layers.pop(var, None)
        other = [a for a in step.ins if a != ("v", var)]
        vector = None
        if (layer is not None and uses[("v", var)] == 1 and step.eqn.name in AFFINE
                and len(other) == 1 and other[0][0] == "p"
                and (step.eqn.name != "sub" or step.ins[0] == ("v", var))):
            i, axis, kernel_axis = layer
            vector = np.asarray(arrays[other[0][1]])
            ndim = len(graph.shapes[var])
            per_channel = vector.ndim == ndim and all(
                d == 1 for a, d in enumerate(vector.shape) if a != axis)
            delta = folded[i].delta
            if not per_channel or (delta is not None and np.ndim(arrays[delta]) != ndim):
                vector = None
        if vector is None:
            folded.append(step)
            axes = _feature_axes(graph, step)
            if axes is not None:
                open_layers[step.eqn.outs[0]] = (len(folded) - 1,) + axes
            continue
        layer_step = folded[i]
        out = step.eqn.outs[0]
        delta = None if layer_step.delta is None else np.asarray(arrays[layer_step.delta])
        ins = layer_step.ins
        if step.eqn.name == "mul":
            kernel = np.asarray(arrays[ins[1][1]])
            shape = [1] * kernel.ndim
            shape[kernel_axis] = -1
            column = np.broadcast_to(vector.reshape(-1), (kernel.shape[kernel_axis],))
            name = ins[1][1]  # rewritten in place, unless another step reads it too
            if uses[ins[1]] > 1:
                name = f"{name}/folded/{out}"
                uses[("p", name)] = 1
            arrays[name] = jnp.asarray(kernel * column.reshape(shape), kernel.dtype)
            ins = (ins[0], ("p", name)) + ins[2:]
            delta = None if delta is None else delta * vector
        else:
            sign = -1 if step.eqn.name == "sub" else 1
            delta = sign * vector if delta is None else delta + sign * vector
        name = layer_step.delta or f"{ins[1][1]}/bias"  # the step's own: rewritten in place
        if delta is not None:
            arrays[name] = jnp.asarray(delta, graph.dtypes[out])
        folded[i] = dataclasses.replace(layer_step, ins=ins, outs=(out,),
                                        delta=None if delta is None else name)
        open_layers[out] = layer
    return folded


def _used(programs) -> set:
    """The names of the arrays ``programs`` read."""
    used = set()
    for program in programs:
        for step in program[:-1]:
            used |= {name for kind, name in step.ins if kind == "p"}
            used |= {n for n in (step.delta, step.rows, step.sparse) if n is not None}
        used |= {name for kind, name in program[-1][1] if kind == "p"}
    return used


def _build(graph, analysis, static, example, bcsr, nonzero, zeros) -> Compact:
    keep = {s: k | zeros[s] for s, k in analysis.keep.items()}
    arrays, program, has_bcsr = _program(graph, keep, zeros, analysis.deltas, static, bcsr)
    layers = _layer_counts(graph, keep, program, arrays, static, has_bcsr and bcsr is not False)
    groups = {name: (int(keep[s].sum()), int(keep[s].size))
              for s, name in graph.group_names().items()}
    arrays = {k: v for k, v in arrays.items() if k in _used([program])}
    example_spec = jax.ShapeDtypeStruct(example.shape, example.dtype)
    params_stored = sum(math.prod(graph.shapes[v]) for v in graph.param_ids)
    dense_stored = params_stored + sum(math.prod(graph.shapes[v]) for v in graph.const_ids)
    twins = {step.ins[1][1] for step in program if isinstance(step, _Step)
             and step.sparse is not None and step.ins[1][0] == "p"}
    stored = sum(int(a.nse) if hasattr(a, "nse") else int(np.size(a))
                 for name, a in arrays.items() if name not in twins
                 and (hasattr(a, "nse") or jnp.issubdtype(a.dtype, jnp.floating)))
    if not has_bcsr:
        routes = (Route(0),)
    elif bcsr:
        routes = (Route(0, sparse=True),)
    else:  # bcsr=None: the constant rule, until export(..., tune=) measures
        routes = (Route(0), Route(BCSR_MIN_BATCH, sparse=True))
    return Compact(arrays, sum(r.compact for r in layers), graph.macs(), groups,
                   {"compact": tuple(program)}, example_spec, routes, layers, stored,
                   dense_stored, nonzero + dense_stored - params_stored)


def _tune(compact: Compact, graph, analysis, static, example, batches, bcsr, multiple,
          repeats) -> Compact:
    """``compact`` serving, at each batch size of ``batches`` and up to the next, the
    fastest of its candidate programs as measured here: compact (its BCSR layers dense
    and sparse), padded to ``PADDED_MULTIPLE`` channels (where ``multiple`` is 1 and
    that changes a count), and the masked dense model. So no batch size runs slower than
    dense, to the measurements' noise."""
    programs, params = dict(compact.programs), dict(compact.params)
    sparse = any(step.sparse for step in programs["compact"][:-1])
    candidates = [Route(0, sparse=s) for s in ((True,) if bcsr and sparse else
                                               (False, True) if sparse else (False,))]
    if multiple == 1 and graph.groups:
        zeros = _padding(analysis.keep, PADDED_MULTIPLE)
        if any(z.any() for z in zeros.values()):
            keep = {s: k | zeros[s] for s, k in analysis.keep.items()}
            arrays, program, _ = _program(graph, keep, zeros, analysis.deltas, static,
                                          False, "padded:")
            programs["padded"], params = tuple(program), {**params, **arrays}
            candidates.append(Route(0, "padded"))
    keep_all = {s: np.ones(n, bool) for s, n in graph.groups.items()}
    arrays, program, _ = _program(graph, keep_all, {}, {}, static, False, "dense:")
    programs["dense"], params = tuple(program), {**params, **arrays}
    candidates.append(Route(0, "dense"))

    timings, chosen, verdicts = {}, [], {}
    for batch in sorted({int(b) for b in batches}):
        x = jnp.asarray(np.resize(np.asarray(example), (batch,) + example.shape[1:]))
        routes = [dataclasses.replace(r, im2col=_matmul_convs(
            programs[r.program], params, x, r.sparse, repeats, verdicts)) for r in candidates]
        runs = {r.name: jax.jit(functools.partial(_run, programs[r.program], sparse=r.sparse,
                                                  im2col=frozenset(r.im2col))) for r in routes}
        ms = median_ms({name: functools.partial(run, params, x) for name, run in runs.items()},
                       repeats, budget_s=TUNE_SECONDS)
        timings[batch] = ms
        best = min(routes, key=lambda r: ms[r.name])
        if not chosen or dataclasses.replace(chosen[-1], batch=0) != best:
            chosen.append(dataclasses.replace(best, batch=batch if chosen else 0))
    used = _used(programs[r.program] for r in chosen)
    return dataclasses.replace(
        compact, params={k: v for k, v in params.items() if k in used},
        programs={r.program: programs[r.program] for r in chosen}, routes=tuple(chosen),
        timings=timings)


def median_ms(calls: dict, repeats: int, warmup: int = 2,
              budget_s: float | None = None) -> dict:
    """Median milliseconds per call of each of ``calls`` (name -> function of nothing),
    interleaved, each waited for, after ``warmup`` untimed rounds (compilation, caches).
    With ``budget_s``, fewer rounds (at least 3) where ``repeats`` would take longer."""
    times = {name: [] for name in calls}
    rounds, i = warmup + repeats, 0
    while i < rounds:
        started_round = time.perf_counter()
        for name, call in calls.items():
            started = time.perf_counter()
            jax.block_until_ready(call())
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - started))
        if budget_s is not None and i == warmup:  # one timed round: how long is a round?
            rounds = warmup + max(3, min(repeats, int(budget_s / max(
                time.perf_counter() - started_round, 1e-9))))
        i += 1
    return {name: float(np.median(t)) for name, t in times.items()}


def _is_dense_layer(graph, eqn, r) -> bool:
    return r.kernel == 1 and _is_dense_contraction(graph, eqn)


def _is_dense_contraction(graph, eqn) -> bool:
    """``x @ W``: a 2-D second operand contracting its first axis with ``x``'s last."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kernel = graph.shapes[eqn.ins[1]]
    data = graph.shapes[eqn.ins[0]]
    return (len(kernel) == 2 and tuple(rc) == (0,) and tuple(lc) == (len(data) - 1,)
            and not lb and not rb)


def _check_batch_untouched(graph, eqn) -> None:
    """A clear error for an op that cuts the batch axis: its sizes are the example's."""
    a = eqn.ins[0]
    for axis in graph_lib.cut_axes(eqn, graph.shapes[a]):
        if any(s == graph_lib.BATCH for _, s in graph.factors(a, axis)):
            raise graph_lib.GraphError(f"hf.export cannot take `{eqn.name}` over the batch "
                                       f"axis (at {eqn.where}).")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv or dense layer's multiply-adds per example: as traced (``dense``), on its
    kernel's nonzero entries (``masked``), and in the compact model (``compact``; a BCSR
    layer counts its stored entries)."""

    name: str
    dense: int
    masked: int
    compact: int
    bcsr: bool


def _layer_counts(graph, keep, program, arrays, static, sparse) -> tuple:
    by_eqn = {id(step.eqn): step for step in program if isinstance(step, _Step)}
    shape_of = functools.partial(_static_shape, graph, keep)
    layers = []
    for c in graph.contractions:
        eqn = graph.eqns[c.eqn]
        name = graph.layer_name(c)
        dense = graph_lib.contraction_macs(graph, c, graph.per_example_shape)
        masked = graph_lib.masked_macs(graph, c, np.count_nonzero(static[eqn.ins[c.kernel]]))
        step = by_eqn.get(id(eqn))
        bcsr = step is not None and step.sparse is not None and sparse
        if step is None:  # everything it computes is constant
            compact = 0
        elif bcsr:
            compact = math.prod(shape_of(eqn.outs[0])[:-1]) * int(arrays[step.sparse].nse)
        elif step.rows is not None:
            compact = math.prod(shape_of(eqn.outs[0])) * int(arrays[step.rows].shape[0])
        else:
            compact = graph_lib.contraction_macs(graph, c, shape_of)
        layers.append(Layer(name, dense, masked, compact, bcsr))
    return tuple(layers)


def _static_shape(graph, keep, v) -> tuple:
    """A value's compact shape with the batch axes at 1 (per example)."""
    return _shape(_compact_shape(graph, keep, v), 1)
