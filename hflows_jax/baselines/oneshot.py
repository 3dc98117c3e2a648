"""One-shot pruning at initialization: SNIP, GraSP and random masks, fixed for good.

The masks are computed in ``init`` from the params it is given (and, for SNIP and
GraSP, a loss and a few batches captured at construction), then never change. Scores
come from ``hf.importance``: loss preservation ``|W * g|`` (SNIP) and the gradient-norm
increasing ``W * (H g)`` (GraSP, Wang et al. 2020). GraSP removes the weights with the
largest ``-W * (H g)``, those whose removal raises the gradient norm most; its keep-score
is the negation.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import optax

from hflows_jax import importance, masking
from hflows_jax.baselines import distributions


class OneShotState(NamedTuple):
    masks: Any

    def pruning_masks(self):
        return self.masks


def _from_scores(score_fn: Callable[[Any], Any], sparsity: float | jax.Array,
                 distribution: str, is_prunable: masking.IsPrunable | None
                 ) -> optax.GradientTransformationExtraArgs:
    sparsity = distributions.check_sparsity(sparsity)
    distributions.check_distribution(distribution)

    def init(params):
        selected = masking.prunable_like(params, is_prunable, lambda i, p: p)
        scores = masking.map_prunable(lambda _, s: s, selected, score_fn(params))
        return OneShotState(distributions.masks_from_scores(scores, sparsity, distribution))

    def update(grads, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(grads, params, state.masks)
        return masking.multiply_masks(grads, state.masks), state

    return optax.GradientTransformationExtraArgs(init, update)


def snip(sparsity: float | jax.Array, loss_fn: importance.LossFn, batches: Sequence[Any],
         distribution: str = "global", is_prunable: masking.IsPrunable | None = None):
    """SNIP (Lee et al. 2019): keep the largest ``|W * g|`` at initialization.

    ``loss_fn(params, batch)`` is averaged over ``batches``. Under
    ``optax.inject_hyperparams``, list ``loss_fn`` (and a custom ``is_prunable``) in
    ``static_args``: optax takes callables for schedules.
    """
    return _from_scores(lambda p: importance.weight_scores("loss_preservation", p, loss_fn,
                                                           batches),
                        sparsity, distribution, is_prunable)


def grasp(sparsity: float | jax.Array, loss_fn: importance.LossFn, batches: Sequence[Any],
          distribution: str = "global", is_prunable: masking.IsPrunable | None = None):
    """GraSP (Wang et al. 2020): keep the largest ``W * (H g)`` at initialization.

    ``loss_fn(params, batch)`` is averaged over ``batches``. Under
    ``optax.inject_hyperparams``, list ``loss_fn`` (and a custom ``is_prunable``) in
    ``static_args``: optax takes callables for schedules.
    """
    return _from_scores(lambda p: importance.weight_scores("grasp", p, loss_fn, batches),
                        sparsity, distribution, is_prunable)


def random(sparsity: float | jax.Array, distribution: str = "erk", seed: int | jax.Array = 0,
           is_prunable: masking.IsPrunable | None = None):
    """Random masks with the layer-wise densities of ``distribution`` (uniform or ERK).

    ``seed`` is an int or an int array. Under ``optax.inject_hyperparams``, list a custom
    ``is_prunable`` in ``static_args``.
    """
    distributions.check_distribution(distribution, ("uniform", "erk"))

    def scores(params):
        leaves, treedef = jax.tree.flatten(params)
        key = jax.random.key(seed)
        return jax.tree.unflatten(treedef, [jax.random.uniform(jax.random.fold_in(key, i),
                                                               p.shape)
                                            for i, p in enumerate(leaves)])

    return _from_scores(scores, sparsity, distribution, is_prunable)
