"""Gradual magnitude pruning (Zhu and Gupta, 2017) with the cubic sparsity schedule.

Every ``update_every`` steps between ``begin_step`` and ``end_step`` the mask keeps the
largest ``|W|`` among the weights still present, at sparsity
``s_t = s_f * (1 - (1 - (t - begin) / (end - begin)) ** 3)``. A pruned weight has zero
magnitude in that ranking, so it never returns; masks are fixed between updates and
after ``end_step``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking
from hflows_jax.baselines import common, distributions


class MagnitudeState(NamedTuple):
    count: jax.Array
    masks: Any

    def pruning_masks(self):
        return self.masks


def cubic_sparsity(step, target: float, begin_step: int, end_step: int) -> jax.Array:
    progress = jnp.clip((step - begin_step) / max(end_step - begin_step, 1), 0.0, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def magnitude(sparsity: float, end_step: int, begin_step: int = 0, update_every: int = 100,
              distribution: str = "global",
              is_prunable: masking.IsPrunable = masking.default_is_prunable,
              ) -> optax.GradientTransformationExtraArgs:
    """``distribution``: ``'global'`` (one ranking) or ``'uniform'`` (layer-wise)."""
    sparsity = distributions.check_sparsity(sparsity)
    distributions.check_distribution(distribution, ("global", "uniform"))
    if not 0 <= begin_step < end_step or update_every < 1:
        raise ValueError("magnitude needs 0 <= begin_step < end_step and update_every >= 1.")

    def init(params):
        return MagnitudeState(jnp.zeros((), jnp.int32),
                              common.prunable_like(params, is_prunable, common.all_ones))

    def update(grads, state, params=None, **extra_args):
        del extra_args
        common.check_update_args(grads, params, state.masks)
        updates = common.gate(grads, state.masks)
        step = state.count + 1
        due = (step % update_every == 0) & (step >= begin_step) & (step <= end_step)

        def prune(masks):
            scores = masking.map_prunable(lambda m, w: jnp.abs(w.astype(jnp.float32)) * m,
                                          masks, params)
            target = cubic_sparsity(step, sparsity, begin_step, end_step)
            return distributions.masks_from_scores(scores, target, distribution)

        masks = jax.lax.cond(due, prune, lambda m: m, state.masks)
        return updates, MagnitudeState(step, masks)

    return optax.GradientTransformationExtraArgs(init, update)
