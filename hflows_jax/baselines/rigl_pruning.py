"""RigL (Evci et al. 2020): dynamic sparse training at a fixed density.

Masks start random with the layer densities of ``distribution``. Every ``update_every``
steps before ``end_step``, each layer drops the fraction ``alpha/2 * (1 + cos(pi t / T))``
of its active weights with the smallest ``|W|`` and grows as many inactive ones with the
largest dense-gradient magnitude. The gradient this transformation receives is taken
with respect to ``W * M``, so it is already dense: pruned positions carry the gradient
they would have if present. Layer densities never change.

A grown connection starts at 0, with no momentum, as in the official RigL code
(``grow_init='zeros'`` and ``reset_momentum`` in google-research/rigl's
``sparse_optimizers.py``). A transformation placed before the weight optimizer cannot set
params or its state, so that is :func:`grow_at_zero`'s job, which wraps the whole chain;
``optax.chain(rigl(...), ...)`` alone regrows a weight with the value it kept while dropped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking
from hflows_jax.baselines import distributions
from hflows_jax.baselines.oneshot import random as random_masks
from hflows_jax.baselines.periodic import update_due


class RigLState(NamedTuple):
    count: jax.Array
    masks: Any

    def pruning_masks(self):
        return self.masks


def drop_fraction(step, alpha, end_step) -> jax.Array:
    """``alpha / 2 * (1 + cos(pi * min(step, end_step) / end_step))``."""
    return alpha / 2 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, end_step) / end_step))


def rigl(sparsity: float | jax.Array, end_step: int | jax.Array,
         update_every: int | jax.Array = 100, alpha: float | jax.Array = 0.3,
         distribution: str = "erk", seed: int | jax.Array = 0,
         is_prunable: masking.IsPrunable | None = None,
         ) -> optax.GradientTransformationExtraArgs:
    """RigL at a fixed ``sparsity``, swapping masks every ``update_every`` steps.

    Args:
      sparsity: fraction of prunable entries pruned, from initialization on.
      end_step: no swap from this step on.
      update_every: steps between swaps.
      alpha: fraction of active weights dropped (and regrown) at the first swap.
      distribution: layer densities, ``'erk'`` or ``'uniform'``.
      seed: seed of the initial random masks (an int or an int array).
      is_prunable: ``(path, leaf) -> bool``; default (None): every leaf of rank >= 2.
        Under ``optax.inject_hyperparams``, list a custom one in ``static_args``.
    """
    distributions.check_distribution(distribution, ("uniform", "erk"))
    if all(map(masking.is_static_number, (end_step, update_every))) and (
            end_step < 1 or update_every < 1):
        raise ValueError("rigl needs end_step >= 1 and update_every >= 1.")
    initial = random_masks(sparsity, distribution, seed, is_prunable)

    def init(params):
        return RigLState(jnp.zeros((), jnp.int32), initial.init(params).masks)

    def swap(mask, w, g, fraction):
        active = jnp.sum(mask)
        k = jnp.floor(fraction * active).astype(jnp.int32)
        magnitude = jnp.where(mask, jnp.abs(w.astype(jnp.float32)), jnp.inf)
        dropped = distributions.keep_top(-magnitude, k)  # the k smallest active |W|
        kept = mask & ~dropped
        growth = jnp.where(kept, -jnp.inf, jnp.abs(g.astype(jnp.float32)))
        return kept | distributions.keep_top(growth, k)

    def update(grads, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(grads, params, state.masks)
        updates = masking.multiply_masks(grads, state.masks)
        step = state.count + 1
        due = update_due(step, update_every, 0, end_step)
        fraction = drop_fraction(step, alpha, end_step)
        masks = jax.lax.cond(
            due, lambda m: masking.map_prunable(lambda mm, w, g: swap(mm, w, g, fraction),
                                                m, params, grads),
            lambda m: m, state.masks)
        return updates, RigLState(step, masks)

    return optax.GradientTransformationExtraArgs(init, update)


def grow_at_zero(pruner: optax.GradientTransformation,
                 *weight_links: optax.GradientTransformation,
                 ) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(pruner, *weight_links)`` where every connection the masks grow restarts
    at 0 with zero optimizer state (momentum, Adam's moments), as RigL's official code does.

    The state is the chain's, so checkpoints and ``hf.masks`` see no difference. A
    connection dropped and grown back in the same update keeps its weight (it never left).
    """
    chain, weights = optax.chain(pruner, *weight_links), optax.chain(*weight_links)

    def update(updates, state, params=None, **extra_args):
        updates, (pruner_state, *weights_state) = chain.update(updates, state, params,
                                                                **extra_args)
        grown = masking.map_prunable(lambda old, new: new & ~old,
                                     masking.masks(state[0]), masking.masks(pruner_state))
        grown = jax.tree.map(lambda g, p: jnp.zeros(p.shape, bool) if g is None else g,
                             grown, params, is_leaf=lambda x: x is None)
        updates = jax.tree.map(lambda g, u, p: jnp.where(g, -p, u).astype(u.dtype),
                               grown, updates, params)  # params + updates == 0 exactly
        weights_state = optax.tree.map_params(
            weights, lambda v, g: jnp.where(g, jnp.zeros_like(v), v), tuple(weights_state),
            grown)
        return updates, (pruner_state, *weights_state)

    return optax.GradientTransformationExtraArgs(chain.init, update)
