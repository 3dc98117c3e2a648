"""Magnitude pruning with a straight-through estimator (jaxpruner's ``SteMagnitude``).

The network runs on ``W * M``, M keeping the largest ``|W|`` at the scheduled sparsity,
and the gradient with respect to ``W * M`` updates every W, pruned or not: a pruned weight
goes on learning, and comes back when its magnitude overtakes a kept one's. The masks are
recomputed after every step from the weights it leaves; the sparsity rises on gradual
magnitude pruning's cubic schedule over the pruning steps and stays at the target after.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking
from hflows_jax.baselines import distributions
from hflows_jax.baselines.magnitude_pruning import cubic_sparsity
from hflows_jax.methods.base import Budget, Method


def largest(magnitudes: jax.Array, keep: jax.Array, iterations: int = 32) -> jax.Array:
    """``magnitudes >= t`` with ``t`` the ``keep``-th largest, found by bisection: 32
    counting passes instead of a sort (30 times slower on CPU, and this runs every step).
    Exact but for ties at ``t``, which are all kept."""
    def halve(_, bounds):
        low, high = bounds
        mid = (low + high) / 2
        enough = jnp.sum(magnitudes >= mid) >= keep
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)
    zero = jnp.zeros((), magnitudes.dtype)
    low, _ = jax.lax.fori_loop(0, iterations, halve, (zero, jnp.max(magnitudes)))
    return magnitudes >= low


def masks_of(magnitudes: Any, sparsity: jax.Array, distribution: str) -> Any:
    """Masks keeping the largest magnitudes, over all layers (``'global'``) or per layer
    (``'uniform'``)."""
    leaves = masking.prunable_leaves(magnitudes)
    if distribution == "global":
        flat = jnp.concatenate([m.ravel() for m in leaves])
        keep = jnp.round((1.0 - sparsity) * flat.size).astype(jnp.int32)
        kept = largest(flat, keep)
        pieces = iter(jnp.split(kept, list(itertools.accumulate(m.size for m in leaves))[:-1]))
        return masking.map_prunable(lambda m: next(pieces).reshape(m.shape), magnitudes)
    return masking.map_prunable(
        lambda m: largest(m, jnp.round((1.0 - sparsity) * m.size).astype(jnp.int32)),
        magnitudes)


class SteMagnitudeState(NamedTuple):
    count: jax.Array  # int32: steps taken
    masks: Any  # the masks of the next forward pass

    def pruning_masks(self):
        return self.masks


def ste_magnitude(sparsity: float | jax.Array, end_step: int, distribution: str = "global",
                  is_prunable: masking.IsPrunable | None = None
                  ) -> optax.GradientTransformationExtraArgs:
    """Straight-through magnitude pruning to ``sparsity`` at ``end_step``, as the last link
    of a chain: the weight optimizer's updates pass unmasked, and the masks become the
    largest ``|W + update|`` (``'global'``: one ranking; ``'uniform'``: per layer)."""
    sparsity = distributions.check_sparsity(sparsity)
    distributions.check_distribution(distribution, ("global", "uniform"))

    def init(params):
        return SteMagnitudeState(jnp.zeros((), jnp.int32), masking.prunable_like(
            params, is_prunable, lambda i, p: jnp.ones(p.shape, bool)))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(updates, params, state.masks)
        step = state.count + 1
        magnitudes = masking.map_prunable(lambda _, w: jnp.abs(w.astype(jnp.float32)),
                                          state.masks, optax.apply_updates(params, updates))
        masks = masks_of(magnitudes, cubic_sparsity(step, sparsity, 0, end_step), distribution)
        return updates, SteMagnitudeState(step, masks)

    return optax.GradientTransformationExtraArgs(init, update)


class SteMagnitude(Method):
    name = "ste_magnitude"
    distributions = ("global", "uniform")

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        return ste_magnitude(b.target_sparsity, b.pruning_steps, b.distribution)

    def optimizer(self, b: Budget, *weight_links):
        # Last: it ranks the weights the whole step leaves, and masks no update.
        return optax.chain(*weight_links, self.pruner(b))
