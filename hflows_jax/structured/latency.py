"""Latency as a channel budget: per layer, measured seconds against its channel counts.

A model's multiply-adds say little of its latency on a CPU: a thin conv runs no faster
than a wider one, a dense layer at batch 1 is memory-bound (docs/results/latency). HALP
(Shen et al., 2022) measures instead, once per target device, a table per layer of its
latency against its input and output channel counts, and prunes to a latency budget.

``measure`` builds that table from the traced graph: each conv or dense layer
(``hflows_jax.graph``' contractions) is run alone, as the primitive the model traced, at a
grid of kept fractions of each channel group it reads or writes. ``LatencyTable.seconds``
interpolates the tables (multilinear, zero at no channels) and adds what the layers leave
of the whole model's measured time as a constant, so that it is the model's latency at
every count. Its derivative by a group's count is that group's marginal latency, by which
``channel_hyperflows(pressure_by="latency")`` shares its pressure, as ``"macs"`` shares it
by ``ChannelGroups.marginal_macs``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hflows_jax import graph as graph_lib
from hflows_jax.masking import unwrap_nnx
from hflows_jax.structured.channels import _layer_cost, channel_groups

PyTree = Any
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)  # kept fractions of a group each layer is timed at
CALIBRATE = (0.25, 0.5, 0.75, 1.0)  # uniform cuts of the exported model the sum is fitted to


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Measured seconds per call at one batch size, on the machine named.

    ``points[g]``: the channel counts of group g the tables are taken at (0 first: a layer
    without its channels is removed, 0 s). ``layers``: per conv or dense layer, the groups
    it reads or writes and its seconds on their grid (one axis per group, in that order).
    ``seconds = rest_s + scale * (the layers' sum)``, fitted to the exported model.
    """

    batch: int
    points: dict[str, tuple[int, ...]]
    layers: tuple[tuple[tuple[str, ...], np.ndarray], ...]
    rest_s: float
    scale: float
    machine: str

    def seconds(self, counts: dict[str, jax.Array]) -> jax.Array:
        """The model's latency with ``counts[g]`` channels kept in each group g."""
        total = jnp.zeros((), jnp.float32)
        for groups, table in self.layers:
            total = total + _interpolate(jnp.asarray(table, jnp.float32),
                                         [(self.points[g], counts[g]) for g in groups])
        return self.rest_s + self.scale * total

    def dense_seconds(self) -> jax.Array:
        return self.seconds({g: jnp.float32(p[-1]) for g, p in self.points.items()})

    def fraction(self, counts: dict[str, jax.Array]) -> jax.Array:
        """Latency kept over the dense model's."""
        return self.seconds(counts) / self.dense_seconds()

    def marginal(self, counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per group, the seconds one more of its channels adds: ``d seconds / d count``."""
        counts = {g: jnp.asarray(c, jnp.float32) for g, c in counts.items()}
        return jax.grad(self.seconds)(counts)

    def save(self, path: str) -> None:
        """As JSON, atomically (a table half written is never read)."""
        with open(path + ".tmp", "w") as f:
            json.dump({"batch": self.batch, "machine": self.machine, "rest_s": self.rest_s,
                       "scale": self.scale, "points": self.points,
                       "layers": [{"groups": list(g), "seconds": t.tolist()}
                                  for g, t in self.layers]}, f, indent=1)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        with open(path) as f:
            d = json.load(f)
        return cls(d["batch"], {g: tuple(p) for g, p in d["points"].items()},
                   tuple((tuple(x["groups"]), np.asarray(x["seconds"], np.float64))
                         for x in d["layers"]), d["rest_s"], d["scale"], d["machine"])


def _interpolate(table: jax.Array, axes: list) -> jax.Array:
    """Multilinear interpolation of ``table`` at one count per axis (clipped to the grid)."""
    if not axes:
        return table
    (points, count), rest = axes[0], axes[1:]
    grid = jnp.asarray(points, jnp.float32)
    c = jnp.clip(jnp.asarray(count, jnp.float32), grid[0], grid[-1])
    i = jnp.clip(jnp.searchsorted(grid, c, side="right") - 1, 0, len(points) - 2)
    w = (c - grid[i]) / (grid[i + 1] - grid[i])
    return (1 - w) * _interpolate(table[i], rest) + w * _interpolate(table[i + 1], rest)


def machine() -> str:
    """Where a table was measured: a table is only true there."""
    device = jax.devices()[0]
    return f"{device.platform} {device.device_kind}, {platform.processor() or platform.machine()}"


def measure(fn: Any, params: PyTree, example: Any, batch: int = 1,
            grid: tuple[float, ...] = GRID, repeats: int = 20,
            calibrate: tuple[float, ...] = CALIBRATE,
            progress: Callable | None = None) -> LatencyTable:
    """The latency table of ``fn(params, x)`` (or a linen module and one input's shape,
    as ``channel_groups`` takes them) at ``batch``, measured here.

    Every conv or dense layer is timed alone at each combination of the grid's counts of
    the groups it reads and writes (``len(grid) ** k`` calls for k groups; 25 for most),
    median of ``repeats`` warm calls; each layer's table is then made non-decreasing in
    every count (a layer with more channels is not cheaper to keep), so no marginal
    latency is negative. Layers timed alone do not add up to the model (each pays a
    call; XLA fuses the ops between them), so the tables' sum is fitted to the exported
    model's measured time (``hf.export``, BatchNorm folded) at the uniform cuts
    ``calibrate``: ``seconds = rest_s + scale * sum``. ``progress``: wraps the layer loop
    (``tqdm``).
    """
    from hflows_jax import compact  # the exported model is what a budget is spent on

    def seconds(call: Callable) -> float:  # median of warm calls (compile, then time)
        return compact.median_ms({"call": call}, repeats, warmup=1)["call"] / 1000

    params = unwrap_nnx(params)
    fn, example = graph_lib.function_of(fn, example)
    graph = graph_lib.trace(fn, params, example)
    roots, names = graph.groups, graph.group_names()
    sizes = {names[s]: n for s, n in roots.items()}
    points = {g: (0,) + tuple(sorted({max(1, round(f * n)) for f in grid}))
              for g, n in sizes.items()}
    rng = np.random.default_rng(0)

    def shape_at(v: int, counts: dict) -> tuple:
        return tuple(math.prod(batch if s == graph_lib.BATCH
                               else counts[names[s]] if s in roots else n
                               for n, s in graph.factors(v, a))
                     for a in range(len(graph.shapes[v])))

    layers = []
    contractions = graph.contractions if progress is None else progress(graph.contractions)
    for c in contractions:
        eqn = graph.eqns[c.eqn]
        _, read, written = _layer_cost(graph, c, roots, names)
        groups = tuple(dict.fromkeys(read + written))
        table = np.zeros([len(points[g]) for g in groups])
        for index in np.ndindex(*table.shape):
            if 0 in index:
                continue  # no channels: the layer is gone
            counts = dict(sizes, **{g: points[g][i] for g, i in zip(groups, index)})
            args = [jnp.asarray(rng.standard_normal(shape_at(v, counts)), graph.dtypes[v])
                    for v in eqn.ins]
            params_at = dict(eqn.params)
            if c.depthwise:  # one group per channel
                params_at["feature_group_count"] = args[c.data].shape[c.data_axes[0]]
            op = jax.jit(functools.partial(eqn.prim.bind, **params_at))
            table[index] = seconds(lambda: op(*args))
        for axis in range(table.ndim):  # non-decreasing, past the zero row
            inner = (slice(None),) * axis + (slice(1, None),)
            table[inner] = np.maximum.accumulate(table[inner], axis=axis)
        layers.append((groups, table))

    raw = LatencyTable(batch, points, tuple(layers), 0.0, 1.0, machine())
    channels = channel_groups(fn, params, example)
    x = jnp.asarray(rng.standard_normal((batch,) + tuple(example.shape[1:])), example.dtype)
    summed, whole = [], []
    for f in calibrate:
        counts = {g: max(1, round(f * n)) for g, n in sizes.items()}
        kept = {g: jnp.arange(n) < counts[g] for g, n in sizes.items()}
        served = compact.export(fn, params, channels.expand(kept, params), example,
                                bcsr=False)
        whole.append(seconds(lambda: served(x)))
        summed.append(float(raw.seconds(counts)))
    scale, rest = np.polyfit(summed, whole, 1) if len(calibrate) > 1 else (1.0, 0.0)
    if not scale > 0:  # too few or too noisy points: the layers as measured
        scale, rest = 1.0, float(np.mean(np.subtract(whole, summed)))
    return dataclasses.replace(raw, rest_s=float(rest), scale=float(scale))
