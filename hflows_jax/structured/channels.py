"""Output channels as prunable groups, and the multiply-adds a set of channels costs.

A channel's group is everything that only computes it: its filter ``kernel[..., c]``, its
bias, and behind a BatchNorm that BatchNorm's scale and shift. With all of them zeroed the
channel is exactly zero, so ``hf.export`` removes it and the inputs the next layers read
from it. The classifier's outputs (the logits) are never grouped.

The groups come from the model's layer graph (``hf.export.graph``), so they follow VGG,
ResNet and LeNet alike; in a ResNet a stream channel stays alive while any branch writes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr

from hflows_jax import family_export as hf_export
from hflows_jax.flops import layer_positions

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
    """The prunable channels of one model, for ``channel_hyperflows`` and FLOP counts.

    ``sizes``: channels per group (a group is named after its layer's path in params).
    ``members``: param path (``"Conv_0/kernel"``) -> the group whose channels are its last
    axis. ``program``: the layer graph reduced to what channel counts need, in order:
    ``("linear", out, inp, group or None, width, macs per (input, output) channel pair)``,
    ``("same", out, inp)`` for pools, ``("or", out, a, b)`` for residual additions.
    """

    sizes: dict[str, int]
    members: dict[str, str]
    program: tuple
    image_channels: int
    norms: dict[str, str]  # group -> the path of its BatchNorm in batch_stats

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def live(self, kept: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per tensor of the program, which channels the compact model computes.

        A kept channel is live when it is fed (some input channel live; else it is a
        constant, which ``hf.export`` folds into its readers' biases) and read (some live
        channel of a later layer reads it, or it is a logit), as export decides.
        """
        alive = {"image": jnp.ones(self.image_channels, jnp.float32)}
        for op in self.program:
            if op[0] == "linear":
                _, out, inp, group, width, _ = op
                fed = (jnp.sum(alive[inp]) > 0).astype(jnp.float32)
                alive[out] = fed * (jnp.ones(width, jnp.float32) if group is None
                                    else kept[group].astype(jnp.float32))
            elif op[0] == "same":
                alive[op[1]] = alive[op[2]]
            else:
                alive[op[1]] = jnp.maximum(alive[op[2]], alive[op[3]])
        read = {t: jnp.zeros_like(a) for t, a in alive.items()}
        read["logits"] = jnp.ones_like(alive["logits"])
        for op in reversed(self.program):
            out, sources = op[1], op[2:4] if op[0] == "or" else op[2:3]
            if op[0] == "linear":  # every input channel is read while any output is live
                used = jnp.max(alive[out] * read[out], initial=0.0) * jnp.ones_like(
                    alive[op[2]])
            else:
                used = read[out]
            for source in sources:
                read[source] = jnp.maximum(read[source], used)
        return {t: alive[t] * read[t] for t in alive}

    def macs(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds per image with only the ``kept`` channels (bool per group), counting
        only the live ones (``live``)."""
        live = self.live(kept)
        return sum((op[5] * jnp.sum(live[op[2]]) * jnp.sum(live[op[1]])
                    for op in self.program if op[0] == "linear"), jnp.zeros((), jnp.float32))

    @functools.cached_property
    def dense_macs(self) -> int:
        width = {"image": self.image_channels}
        total = 0
        for op in self.program:
            width[op[1]] = op[4] if op[0] == "linear" else width[op[2]]
            if op[0] == "linear":
                total += op[5] * width[op[2]] * op[4]
        return total

    def flops_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        """Multiply-adds kept over the dense model's."""
        return self.macs(kept) / self.dense_macs

    def channels_fraction(self, kept: dict[str, jax.Array]) -> jax.Array:
        return sum(jnp.sum(k) for k in kept.values()) / self.total

    def expand(self, kept: dict[str, jax.Array], params: PyTree) -> PyTree:
        """Per-weight masks shaped like ``params``: a group's channel mask broadcast over
        each member's leading axes; ``None`` off the groups."""
        def leaf(path, p):
            group = self.members.get(path_of(path))
            return None if group is None else jnp.broadcast_to(kept[group], p.shape)
        return jax.tree.map_with_path(leaf, params)

    def reduce(self, tree: PyTree) -> dict[str, jax.Array]:
        """Per-group sums over channels of a params-shaped tree (e.g. flows)."""
        sums = {g: jnp.zeros(n, jnp.float32) for g, n in self.sizes.items()}
        for path, x in jax.tree.leaves_with_path(tree):
            group = self.members.get(path_of(path))
            if group is not None:
                sums[group] = sums[group] + jnp.sum(
                    x.astype(jnp.float32).reshape(-1, x.shape[-1]), axis=0)
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
        paths = {path_of(p): x.shape for p, x in jax.tree.leaves_with_path(params)}
        for path, group in self.members.items():
            if path not in paths or paths[path][-1] != self.sizes[group]:
                raise ValueError(f"params do not match these channel groups: {path} "
                                 f"{'is missing' if path not in paths else paths[path]} "
                                 f"(group {group} has {self.sizes[group]} channels). Build "
                                 "the groups from the same model (channel_groups).")


def channel_groups(model, params: PyTree, image_shape: tuple[int, int, int]) -> ChannelGroups:
    """The output channels of every conv and dense layer of a ``hflows_jax.models`` model
    but the classifier, with their filters, biases and BatchNorm scales and shifts."""
    ops = hf_export.graph(model, params)
    shapes = {path_of(p): x.shape for p, x in jax.tree.leaves_with_path(params)}
    positions = layer_positions(model, image_shape)
    sizes, members, norms, program = {}, {}, {}, []
    width = {"image": int(image_shape[-1])}
    for op in ops:
        if isinstance(op, hf_export.Linear):
            kernel = shapes[f"{op.name}/kernel"]
            width[op.out] = int(kernel[-1])
            group = None
            if op.out != "logits":
                group = op.name
                sizes[group] = width[op.out]
                owned = [f"{op.name}/kernel", f"{op.name}/bias"]
                if op.bn:
                    owned += [f"{op.bn}/scale", f"{op.bn}/bias"]
                    norms[group] = op.bn
                members.update({m: group for m in owned if m in shapes})
            unit = positions[op.name] * int(np.prod(kernel)) // (width[op.inp] * width[op.out])
            program.append(("linear", op.out, op.inp, group, width[op.out], unit))
        elif isinstance(op, hf_export.Pool):
            width[op.out] = width[op.inp]
            program.append(("same", op.out, op.inp))
        else:
            width[op.out] = width[op.a]
            program.append(("or", op.out, op.a, op.b))
    return ChannelGroups(sizes, members, tuple(program), int(image_shape[-1]), norms)
