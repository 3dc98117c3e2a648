"""How a sparsity budget is spread over layers, and how scores become masks.

Layer densities are computed from shapes: ``uniform`` gives every layer the same
density; ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020) gives each layer a density
proportional to ``sum(shape) / prod(shape)``, so small layers stay denser, with layers
that would exceed 1 capped at dense and the rest rescaled. ``global`` ranks all
prunable entries together. ``masks_from_scores`` keeps the highest scores.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

from hflows_jax import masking, n_m

# "N:M" stands for every pattern such as "2:4" (hflows_jax.n_m).
DISTRIBUTIONS = ("global", "uniform", "erk", "per_output", "N:M")


def check_sparsity(sparsity: float | jax.Array) -> float | jax.Array:
    """Checks a Python number (returned as a float); arrays may be traced, so pass as is."""
    if not masking.is_static_number(sparsity):
        return sparsity
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must lie in (0, 1), got {sparsity!r}.")
    return float(sparsity)


def check_distribution(distribution: str, allowed=DISTRIBUTIONS) -> str:
    if "N:M" in allowed and n_m.parse_n_m(distribution):
        return distribution
    if distribution not in allowed:
        raise ValueError(f"Unknown sparsity distribution {distribution!r}: use one of "
                         f"{list(allowed)}.")
    return distribution


def layer_densities(shapes: list[tuple[int, ...]], density: float | jax.Array,
                    distribution: str) -> list:
    """Per-layer densities whose entry-weighted mean is ``density``.

    ``'erk'`` decides which layers are capped at dense from the value of ``density``, so
    it needs a concrete one (not traced).
    """
    sizes = [math.prod(s) for s in shapes]
    if distribution == "uniform":
        return [density] * len(shapes)
    if distribution != "erk":
        raise ValueError(f"layer_densities takes 'uniform' or 'erk', got {distribution!r}.")
    try:
        density = float(density)
    except jax.errors.ConcretizationTypeError:
        raise ValueError("ERK layer densities need a concrete sparsity: under "
                         "optax.inject_hyperparams, list sparsity in static_args.") from None
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        free = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / free
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def keep_top(scores: jax.Array, keep: jax.Array | int) -> jax.Array:
    """Boolean mask of the ``keep`` highest entries of ``scores`` (exactly ``keep``)."""
    flat = scores.ravel()
    ranks = jnp.zeros(flat.shape, jnp.int32).at[jnp.argsort(-flat)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < keep).reshape(scores.shape)


def keep_top_per_output(scores: jax.Array, density) -> jax.Array:
    """In each output unit (the kernel's last axis), the ``density`` of its inputs with
    the highest scores (rounded; ties by position)."""
    cols = scores.reshape(-1, scores.shape[-1])
    keep = jnp.round(density * cols.shape[0]).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(-cols, axis=0, stable=True), axis=0)
    return (ranks < keep).reshape(scores.shape)


# The distributions that decide each layer on its own: a scanned stack's layers one by one.
PER_LAYER = ("uniform", "erk", "per_output")


def masks_from_scores(scores: Any, sparsity: float | jax.Array, distribution: str,
                      stacked: frozenset = frozenset()) -> Any:
    """Masks keeping the highest scores; ``scores`` is None on non-prunable leaves. An N:M
    ``distribution`` keeps N of every M along each kernel's input axis, whatever
    ``sparsity`` says (``n_m.tree_masks``). ``stacked``: paths of leaves whose first axis
    stacks layers (``nn.scan``): a per-layer distribution takes each slice alone."""
    pattern = n_m.parse_n_m(distribution)
    if pattern:
        return n_m.tree_masks(scores, *pattern)

    def is_stacked(path) -> bool:
        return keystr(path, simple=True, separator="/") in stacked

    leaves = [(is_stacked(p), s) for p, s in jax.tree.leaves_with_path(
        scores, is_leaf=lambda s: s is None) if s is not None]

    def per_layer(keep):  # keep(scores of one layer, its density) -> its mask
        densities = iter(layer_densities(  # a stack's layers count one by one
            [shape for stack, s in leaves for shape in
             ([s.shape[1:]] * s.shape[0] if stack else [s.shape])], 1.0 - sparsity,
            distribution if distribution != "per_output" else "uniform"))

        def leaf(path, s):
            if not is_stacked(path):
                return keep(s, next(densities))
            return jax.vmap(keep)(s, jnp.asarray([next(densities) for _ in range(len(s))]))
        return jax.tree.map_with_path(lambda p, s: None if s is None else leaf(p, s),
                                      scores, is_leaf=lambda s: s is None)

    if distribution == "per_output":  # Wanda's comparison group: each output unit alike
        return per_layer(keep_top_per_output)
    if distribution == "global":
        flat = jnp.concatenate([s.ravel().astype(jnp.float32) for _, s in leaves])
        keep = jnp.round((1.0 - sparsity) * flat.size).astype(jnp.int32)
        kept = keep_top(flat, keep)
        sizes = [s.size for _, s in leaves]
        pieces = jnp.split(kept, list(itertools.accumulate(sizes))[:-1])
        it = iter(p.reshape(s.shape) for p, (_, s) in zip(pieces, leaves))
        return masking.map_prunable(lambda _: next(it), scores)
    return per_layer(lambda s, density: keep_top(s, jnp.round(density * s.size).astype(
        jnp.int32)))
