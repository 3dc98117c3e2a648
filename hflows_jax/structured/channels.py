"""Channel groups, traced from any model, and the multiply-adds a set of channels costs.

A group is one coupling group of the traced graph (``hflows_jax.graph``): channels that
must go together, across layers (a residual stream's channels are one group with every
branch that writes them; a depthwise conv's channels with the conv feeding it). Its
*members* are the params that only compute it: the filters that write it (their output
axis), their biases, the BatchNorm scales and shifts applied to it. With all of them
zeroed the channel is exactly zero, so ``hf.export`` removes it, and the kernel rows that
read it. Channels that reach the output (the logits) or that an op needs whole (a
LayerNorm's, a softmax's) are in no group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

from hflows_jax import graph as graph_lib
from hflows_jax.masking import unwrap_nnx

PyTree = Any


def path_of(path: tuple) -> str:
    return keystr(path, simple=True, separator="/")


def keep_at_least(scores: jax.Array, cutoff, min_channels: int) -> jax.Array:
    """``scores >= cutoff``, and in any case the ``min_channels`` highest scores (all of a
    layer with fewer): the channel floor of DHP (``mc``) and of channel Hyperflows."""
    k = min(min_channels, scores.shape[-1])
    if k == 0:
        return scores >= cutoff
    return scores >= jnp.minimum(cutoff, jnp.sort(scores)[-k])


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
    """The prunable channels of one model, for channel pruners and their FLOP counts.

    ``sizes``: channels per group, named after the first layer that writes it (its
    kernel's path without ``/kernel``). ``members``: param path -> ``((group, axis), ...)``,
    the axes of that param that index a group's channels. ``layers``: per conv or dense
    layer, its multiply-adds as ``(unit, read, written)``: ``unit`` times the kept channels
    of each group in ``read`` (its input) and ``written`` (its output).
    """

    sizes: dict[str, int]
    members: dict[str, tuple]
    layers: tuple
    dense_macs: int
    norms: dict[str, str]  # group -> the path of a BatchNorm on it (for batch_stats)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def live(self, kept: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Which kept channels the compact model computes: a layer all of whose input
        channels are gone writes constants (``hf.export`` folds them), and a layer none of
        whose output channels is read computes nothing."""
        ones = jnp.ones((), jnp.float32)
        kept = {g: jnp.asarray(k, jnp.float32) for g, k in kept.items()}
        writers = {g for _, _, written in self.layers for g in written}
        fed = {g: jnp.zeros((), jnp.float32) if g in writers else ones for g in self.sizes}
        for _ in range(2):  # a group's writers may come after a reader (a residual stream)
            for _, read, written in self.layers:
                inputs = math.prod((jnp.max(kept[g] * fed[g]) for g in read), start=ones)
                for g in written:
                    fed[g] = jnp.maximum(fed[g], inputs)
        alive = {g: kept[g] * fed[g] for g in self.sizes}
        read_by = {g: jnp.zeros((), jnp.float32) for g in self.sizes}
        for _ in range(2):
            for _, read, written in reversed(self.layers):
                out = math.prod((jnp.max(alive[g] * read_by[g]) for g in written), start=ones)
                for g in read:
                    read_by[g] = jnp.maximum(read_by[g], out)
        return {g: alive[g] * read_by[g] for g in self.sizes}

    def macs(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds per example with only the ``kept`` channels (bool per group),
        counting the live ones (``live``)."""
        live = self.live(kept)
        count = {g: jnp.sum(v) for g, v in live.items()}
        return sum((unit * math.prod((count[g] for g in read + written),
                                     start=jnp.ones((), jnp.float32))
                    for unit, read, written in self.layers), jnp.zeros((), jnp.float32))

    def flops_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds kept over the dense model's."""
        return self.macs(kept) / self.dense_macs

    def channels_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        return sum(jnp.sum(k) for k in kept.values()) / self.total

    def expand(self, kept: dict[str, jax.Array], params: PyTree) -> PyTree:
        """Per-weight masks shaped like ``params``: each group's channel mask broadcast
        along its members' axes; ``None`` off the groups."""
        def leaf(path, p):
            axes = self.members.get(path_of(path))
            if axes is None:
                return None
            mask = jnp.ones(p.shape, bool)
            for group, axis in axes:
                shape = [1] * p.ndim
                shape[axis] = p.shape[axis]
                mask = mask & jnp.reshape(jnp.asarray(kept[group], bool), shape)
            return mask
        return jax.tree.map_with_path(leaf, unwrap_nnx(params))

    def reduce(self, tree: PyTree) -> dict[str, jax.Array]:
        """Per-group sums over channels of a params-shaped tree (e.g. flows)."""
        sums = {g: jnp.zeros(n, jnp.float32) for g, n in self.sizes.items()}
        for path, x in jax.tree.leaves_with_path(unwrap_nnx(tree)):
            for group, axis in self.members.get(path_of(path), ()):
                others = tuple(d for d in range(x.ndim) if d != axis)
                sums[group] = sums[group] + jnp.sum(x.astype(jnp.float32), axis=others)
        return sums

    def settle_statistics(self, batch_stats: PyTree, kept: dict[str, Any]) -> PyTree:
        """``batch_stats`` with a zero running mean on pruned channels.

        A pruned channel's BatchNorm input is exactly 0, so its true mean is 0; the running
        average only decays towards it. With a fixed BatchNorm scale (no scale to mask)
        the stale mean leaves a tiny constant after the shift is masked, which
        ``hf.export`` must then keep behind a padded conv. Settled, the channel is 0.
        """
        def leaf(path, x):
            path = path_of(path)
            for group, norm in self.norms.items():
                if path == f"{norm}/mean":
                    return jnp.where(jnp.asarray(kept[group]), x, 0.0).astype(x.dtype)
            return x
        return jax.tree.map_with_path(leaf, batch_stats)

    def check(self, params: PyTree) -> None:
        shapes = {path_of(p): x.shape for p, x in jax.tree.leaves_with_path(unwrap_nnx(params))}
        for path, axes in self.members.items():
            for group, axis in axes:
                if path not in shapes or shapes[path][axis] != self.sizes[group]:
                    raise ValueError(
                        f"params do not match these channel groups: {path} "
                        f"{'is missing' if path not in shapes else shapes[path]} (group "
                        f"{group} has {self.sizes[group]} channels). Build the groups from "
                        "the same model (channel_groups).")


def channel_groups(fn: Callable, params: PyTree, example: Any) -> ChannelGroups:
    """The channel groups of ``fn(params, x)`` (eval mode) for inputs like ``example``,
    from its traced graph (``hflows_jax.graph``).

    ``fn`` may also be a linen module with ``example`` the shape of one input (our models'
    call: ``channel_groups(model, params, (32, 32, 3))``); it is then applied with its
    other variables (BatchNorm statistics) at zero, which the groups do not depend on.
    """
    params = unwrap_nnx(params)
    fn, example = graph_lib.function_of(fn, example)
    graph = graph_lib.trace(fn, params, example)
    roots = graph.groups
    leaf_axes = graph.leaf_axes()
    read_axes = graph.read_axes()
    names, members = graph.group_names(), {}
    for path, v in zip(graph.param_paths, graph.param_ids):
        axes = tuple((names[f[0][1]], axis) for axis, f in enumerate(leaf_axes[path])
                     if len(f) == 1 and f[0][1] in roots and (v, axis) not in read_axes)
        if axes:
            members[path] = axes
    norms = {}
    for path, axes in members.items():
        module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
        if leaf in ("scale", "bias") and f"{module}/kernel" not in leaf_axes:
            for group, _ in axes:
                norms.setdefault(group, module)
    layers = tuple(_layer_cost(graph, c, roots, names) for c in graph.contractions)
    sizes = {names[s]: n for s, n in sorted(roots.items(), key=lambda kv: names[kv[0]])}
    return ChannelGroups(sizes, members, layers, graph.macs(), norms)


def _layer_cost(graph, c, roots, names) -> tuple:
    """``(unit, read, written)`` of one contraction: its multiply-adds per example are
    ``unit`` times the channel counts of the groups it reads and writes."""
    eqn = graph.eqns[c.eqn]
    unit, read, written = 1, [], []
    for value, axes, found in ((eqn.outs[0], range(len(graph.shapes[eqn.outs[0]])), written),
                               (eqn.ins[c.kernel], c.taps, read)):
        for axis in axes:
            for n, s in graph.factors(value, axis):
                if s in roots:
                    found.append(names[s])
                elif s != graph_lib.BATCH:
                    unit *= n
    return unit, tuple(read), tuple(written)
