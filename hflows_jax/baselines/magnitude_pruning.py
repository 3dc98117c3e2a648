"""Gradual magnitude pruning (Zhu and Gupta, 2017) with the cubic sparsity schedule.

Every ``update_every`` steps in ``[begin_step, end_step)``, and at ``end_step``, the mask
keeps the largest ``|W|`` among the weights still present, at sparsity
``s_t = s_f * (1 - (1 - (t - begin) / (end - begin)) ** 3)``; the last update lands on
``s_f``. A pruned weight has zero magnitude in that ranking, so it never returns; masks
are fixed between updates and after ``end_step``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking
from hflows_jax.baselines import distributions
from hflows_jax.baselines.periodic import update_due


class MagnitudeState(NamedTuple):
    count: jax.Array
    masks: Any

    def pruning_masks(self):
        return self.masks


def cubic_sparsity(step, target, begin_step, end_step) -> jax.Array:
    """``target * (1 - (1 - progress) ** 3)``, progress clipped to [0, 1]."""
    progress = jnp.clip((step - begin_step) / jnp.maximum(end_step - begin_step, 1), 0.0, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def magnitude(sparsity: float | jax.Array, end_step: int | jax.Array,
              begin_step: int | jax.Array = 0, update_every: int | jax.Array = 100,
              distribution: str = "global", is_prunable: masking.IsPrunable | None = None,
              ) -> optax.GradientTransformationExtraArgs:
    """Gradual magnitude pruning to ``sparsity`` at ``end_step``.

    Args:
      sparsity: final fraction of prunable entries pruned.
      end_step: the step of the last update (counted from 1).
      begin_step: no update before this step.
      update_every: steps between updates.
      distribution: ``'global'`` (one ranking) or ``'uniform'`` (layer-wise).
      is_prunable: ``(path, leaf) -> bool``; default (None): every leaf of rank >= 2.
        Under ``optax.inject_hyperparams``, list a custom one in ``static_args``.
    """
    sparsity = distributions.check_sparsity(sparsity)
    distributions.check_distribution(distribution, ("global", "uniform"))
    steps = (begin_step, end_step, update_every)
    if all(map(masking.is_static_number, steps)) and not (
            0 <= begin_step < end_step and update_every >= 1):
        raise ValueError("magnitude needs 0 <= begin_step < end_step and update_every >= 1.")

    def init(params):
        return MagnitudeState(jnp.zeros((), jnp.int32), masking.prunable_like(
            params, is_prunable, lambda i, p: jnp.ones(p.shape, bool)))

    def update(grads, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(grads, params, state.masks)
        updates = masking.multiply_masks(grads, state.masks)
        step = state.count + 1
        due = update_due(step, update_every, begin_step, end_step) | (step == end_step)

        def prune(masks):
            scores = masking.map_prunable(lambda m, w: jnp.abs(w.astype(jnp.float32)) * m,
                                          masks, params)
            target = cubic_sparsity(step, sparsity, begin_step, end_step)
            return distributions.masks_from_scores(scores, target, distribution)

        masks = jax.lax.cond(due, prune, lambda m: m, state.masks)
        return updates, MagnitudeState(step, masks)

    return optax.GradientTransformationExtraArgs(init, update)
