"""Channel groups, traced from any model, and the multiply-adds a set of channels costs.

A group is one coupling group of the traced graph (``hflows_jax.graph``): channels that
must go together, across layers (a residual stream's channels are one group with every
branch that writes them; a depthwise conv's channels with the conv feeding it). Its
*members* are the kernel rows that read it: the input axis of every conv or dense layer
that contracts it (through a flatten, the rows of each channel). With all of them zeroed
the channel is computed but read by nothing, so it is removed, and the layers that wrote
it only for it, by ``hf.export``. Masking the reading side, not the writing one, keeps a
pruned channel's activation what its own weights make it, so the gradient reaching its
rows still says what bringing it back would gain (``channel_hyperflows``). Channels that
reach the output (the logits) or that an op needs whole (a LayerNorm's, a softmax's) are
in no group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import keystr

from hflows_jax import graph as graph_lib
from hflows_jax.masking import check_update_args, multiply_masks, unwrap_nnx

PyTree = Any


def path_of(path: tuple) -> str:
    return keystr(path, simple=True, separator="/")


def keep_at_least(scores: jax.Array, cutoff, min_channels: int | jax.Array) -> jax.Array:
    """``scores >= cutoff``, and in any case the ``min_channels`` highest scores (all of a
    layer with fewer): the channel floor of DHP (``mc``), of channel Hyperflows and of
    ``hf.prune``'s channels (where it may be traced: a share of the channels left)."""
    n = scores.shape[-1]
    k = jnp.minimum(min_channels, n)
    kth = jnp.sort(scores)[n - jnp.maximum(k, 1)]  # the k-th highest
    return scores >= jnp.where(k > 0, jnp.minimum(cutoff, kth), cutoff)


class Member(NamedTuple):
    """One axis of a param that reads a group's channels. ``layout``: the axis as the
    factors it flattens (major first; ``(n,)`` unflattened), the group's at ``position``."""

    group: str
    axis: int
    layout: tuple[int, ...]
    position: int

    def broadcast(self, per_channel: jax.Array, ndim: int) -> jax.Array:
        """``per_channel`` (one entry per channel) along this axis of a rank-``ndim`` param."""
        shape = [1] * len(self.layout)
        shape[self.position] = self.layout[self.position]
        along = jnp.broadcast_to(jnp.reshape(per_channel, shape), self.layout).reshape(-1)
        full = [1] * ndim
        full[self.axis] = along.size
        return jnp.reshape(along, full)

    def sum(self, x: jax.Array) -> jax.Array:
        """``x`` (param-shaped) summed over everything but this member's channels."""
        x = jnp.moveaxis(x.astype(jnp.float32), self.axis, -1)
        x = jnp.reshape(x, x.shape[:-1] + self.layout)
        others = tuple(d for d in range(x.ndim) if d != x.ndim - len(self.layout)
                       + self.position)
        return jnp.sum(x, axis=others)


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
    """The prunable channels of one model, for channel pruners and their FLOP counts.

    ``sizes``: channels per group, named after the first layer that writes it (its
    kernel's path without ``/kernel``). ``members``: kernel path -> ``(Member, ...)``, the
    input axes of that kernel that read a group's channels. ``layers``: per conv or dense
    layer, its multiply-adds as ``(unit, read, written)``: ``unit`` times the kept channels
    of each group in ``read`` (its input) and ``written`` (its output). ``writes``: per
    layer, the groups of its output channels. ``writers``: kernel path -> the output axes
    that write a group's channels (a depthwise kernel's channel axis): a channel's filter.
    """

    sizes: dict[str, int]
    members: dict[str, tuple[Member, ...]]
    layers: tuple
    dense_macs: int
    writes: dict[str, tuple[str, ...]]  # layer (graph.layer_name) -> its groups
    writers: dict[str, tuple[Member, ...]]

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

    def macs_of_counts(self, counts: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds per example with ``counts[g]`` channels in each group g."""
        return sum((unit * math.prod((counts[g] for g in read + written),
                                     start=jnp.ones((), jnp.float32))
                    for unit, read, written in self.layers), jnp.zeros((), jnp.float32))

    def live_counts(self, kept: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per group, how many of its ``kept`` channels the compact model computes
        (``live``): what its multiply-adds and its latency are counted on."""
        return {g: jnp.sum(v) for g, v in self.live(kept).items()}

    def macs(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds per example with only the ``kept`` channels (bool per group),
        counting the live ones (``live_counts``)."""
        return self.macs_of_counts(self.live_counts(kept))

    def marginal_macs(self, kept: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per group, the multiply-adds one more kept channel of it would add (every layer
        counted, live or not): the derivative of ``macs_of_counts`` by its count."""
        counts = {g: jnp.sum(jnp.asarray(k, jnp.float32)) for g, k in kept.items()}
        return jax.grad(self.macs_of_counts)(counts)

    def flops_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds kept over the dense model's (a float: ResNet-50's 4.1e9 overflows
        the int32 a Python int becomes in a jax operation)."""
        return self.macs(kept) / float(self.dense_macs)

    def channels_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        return sum(jnp.sum(k) for k in kept.values()) / self.total

    def expand(self, kept: dict[str, jax.Array], params: PyTree) -> PyTree:
        """Per-weight masks shaped like ``params``: each group's channel mask broadcast
        along its members' axes (the rows that read it); ``None`` off the groups."""
        def leaf(path, p):
            members = self.members.get(path_of(path))
            if members is None:
                return None
            mask = jnp.ones(p.shape, bool)
            for m in members:
                mask = mask & m.broadcast(jnp.asarray(kept[m.group], bool), p.ndim)
            return mask
        return jax.tree.map_with_path(leaf, unwrap_nnx(params))

    def reduce(self, tree: PyTree, side: str = "read") -> dict[str, jax.Array]:
        """Per-group sums over channels of a params-shaped tree: over the rows that read
        each channel (``side="read"``: flows) or the filters that write it (``"write"``:
        filter importance)."""
        if side not in ("read", "write"):
            raise ValueError(f"side must be 'read' or 'write', got {side!r}.")
        axes = self.members if side == "read" else self.writers
        sums = {g: jnp.zeros(n, jnp.float32) for g, n in self.sizes.items()}
        for path, x in jax.tree.leaves_with_path(unwrap_nnx(tree)):
            for m in axes.get(path_of(path), ()):
                sums[m.group] = sums[m.group] + m.sum(x)
        return sums

    def check(self, params: PyTree) -> None:
        shapes = {path_of(p): x.shape for p, x in jax.tree.leaves_with_path(unwrap_nnx(params))}
        for path, members in self.members.items():
            for m in members:
                if path not in shapes or shapes[path][m.axis] != math.prod(m.layout):
                    raise ValueError(
                        f"params do not match these channel groups: {path} "
                        f"{'is missing' if path not in shapes else shapes[path]} (group "
                        f"{m.group} has {self.sizes[m.group]} channels). Build the groups "
                        "from the same model (channel_groups).")


class FixedChannelsState(NamedTuple):
    """The channels of a network that are chosen: ``kept`` per group, ``masks`` per weight."""

    kept: dict  # group name -> bool per channel
    masks: PyTree  # ``ChannelGroups.expand(kept, params)``

    def pruning_masks(self) -> PyTree:
        return self.masks

    def channel_masks(self) -> dict:
        return self.kept


def fixed_channels(groups: ChannelGroups, kept: dict | None = None
                   ) -> optax.GradientTransformationExtraArgs:
    """The pruner of a network whose channels are chosen (DHP's fine-tune of its search's
    pruned network): the masks of ``kept`` (every channel when None) in its state, never
    changing, and the gradients of the masked rows zeroed. ``hf.masks``,
    ``hf.channel_masks`` and ``hf.export`` read it as any channel pruner's."""

    def init(params):
        chosen = kept or {g: jnp.ones(n, bool) for g, n in groups.sizes.items()}
        chosen = {g: jnp.asarray(k, bool) for g, k in chosen.items()}
        return FixedChannelsState(chosen, groups.expand(chosen, params))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        check_update_args(updates, params, state.masks)
        return multiply_masks(updates, state.masks), state

    return optax.GradientTransformationExtraArgs(init, update)


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
        found = tuple(Member(names[space], axis, tuple(n for n, _ in factors), position)
                      for axis, factors in enumerate(leaf_axes[path])
                      if (v, axis) in read_axes
                      for position, (_, space) in enumerate(factors) if space in roots)
        if found:
            members[path] = found
    layers = tuple(_layer_cost(graph, c, roots, names) for c in graph.contractions)
    sizes = {names[s]: n for s, n in sorted(roots.items(), key=lambda kv: names[kv[0]])}
    paths = dict(zip(graph.param_ids, graph.param_paths))
    writes = {graph.layer_name(c): written
              for c, (_, _, written) in zip(graph.contractions, layers) if c.param in paths}
    writers = {}
    for c in graph.contractions:
        if c.param in paths:
            path = paths[c.param]
            found = tuple(Member(names[space], axis, tuple(n for n, _ in factors), position)
                          for axis in map(c.param_axis, c.out_axes or c.read_axes)
                          for factors in (leaf_axes[path][axis],)  # depthwise: its channels
                          for position, (_, space) in enumerate(factors) if space in roots)
            writers[path] = tuple(dict.fromkeys(writers.get(path, ()) + found))
    return ChannelGroups(sizes, members, layers, graph.macs(), writes,
                         {p: w for p, w in writers.items() if w})


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
