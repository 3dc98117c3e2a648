"""N:M sparsity: N kept in every M consecutive entries along a kernel's input axis (a
dense kernel's rows, a conv kernel's input channels), the layout sparse tensor cores run."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

from hflows_jax import masking

N_M = re.compile(r"^(\d+):(\d+)$")


def parse_n_m(distribution: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: N kept in every M consecutive input entries; else None."""
    found = N_M.match(distribution)
    if found is None:
        return None
    n, m = int(found[1]), int(found[2])
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {distribution!r}.")
    return n, m


def check_n_m_sparsity(distribution: str, sparsity) -> None:
    """An N:M pattern fixes the fraction removed: a static ``sparsity`` must be it."""
    n, m = parse_n_m(distribution)
    removed = 1 - n / m
    if masking.is_static_number(sparsity) and abs(sparsity - removed) > 1e-9:
        raise ValueError(f"{distribution} sparsity removes {removed:g} of the weights; got "
                         f"sparsity={sparsity}: pass {removed:g}.")


def fits(shape: tuple, m: int) -> bool:
    """Whether a kernel of ``shape`` splits into groups of ``m`` along its input axis."""
    return len(shape) >= 2 and shape[-2] % m == 0


def _grouped(x: jax.Array, m: int) -> jax.Array:
    x = jnp.moveaxis(x, -2, -1)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))


def _ungrouped(x: jax.Array, shape: tuple) -> jax.Array:
    return jnp.moveaxis(x.reshape(x.shape[:-2] + (-1,)), -1, -2).reshape(shape)


def n_m_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the input axis."""
    ranks = jnp.argsort(jnp.argsort(-_grouped(scores, m), axis=-1), axis=-1)
    return _ungrouped(ranks < n, scores.shape)


def centered(scores: jax.Array, n: int, m: int) -> jax.Array:
    """``scores`` shifted in each group of ``m`` so that 0 lies midway between the group's
    ``n``-th and ``n+1``-th highest: ``scores >= 0`` is then ``n_m_mask`` (ties aside), and
    the order within a group is kept."""
    groups = _grouped(scores, m)
    top = -jnp.sort(-groups, axis=-1)
    threshold = 0.5 * (top[..., n - 1:n] + top[..., n:n + 1])
    return _ungrouped(groups - threshold, scores.shape)


def is_n_m(mask: jax.Array, n: int, m: int) -> bool:
    """Whether every ``m`` consecutive input entries of ``mask`` keep at most ``n``."""
    x = jnp.moveaxis(jnp.asarray(mask, jnp.int32), -2, -1)
    if x.shape[-1] % m:
        return False
    return bool(jnp.all(x.reshape(x.shape[:-1] + (-1, m)).sum(-1) <= n))


def tree_masks(scores, n: int, m: int):
    """N:M masks for a tree of scores (None off the prunable leaves). A kernel whose input
    axis ``m`` does not divide stays dense, with a warning naming it."""
    left_dense = []

    def leaf(path, s):
        if not fits(s.shape, m):
            name = keystr(path, simple=True, separator="/")
            left_dense.append(f"{name} {tuple(s.shape)}")
            return jnp.ones(s.shape, bool)
        return n_m_mask(s, n, m)

    masks = jax.tree.map_with_path(lambda p, s: None if s is None else leaf(p, s), scores,
                                   is_leaf=lambda x: x is None)
    if left_dense:
        warnings.warn(f"{n}:{m} sparsity: these layers' input axis is not a multiple of {m}; "
                      f"they stay dense: {', '.join(left_dense)}.", stacklevel=3)
    return masks
