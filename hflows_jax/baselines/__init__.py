"""Baseline pruners behind the Hyperflows interface: masks in the optax state.

``hf.apply_masks``, ``hf.masks``, ``hf.sparsity``, ``hf.layer_sparsity`` and
``hf.finalize`` work on their states, and each chains into any optax optimizer. Under
``optax.inject_hyperparams`` their numeric arguments are injectable; callables
(``loss_fn``, a custom ``is_prunable``) go in ``static_args``.
"""

from hflows_jax.baselines.distributions import layer_densities, masks_from_scores
from hflows_jax.baselines.magnitude_pruning import MagnitudeState, magnitude
from hflows_jax.baselines.oneshot import (
    OneShotState,
    grasp,
    random,
    snip,
)
from hflows_jax.baselines.rigl_pruning import RigLState, grow_at_zero, rigl

__all__ = ["MagnitudeState", "OneShotState", "RigLState", "grasp", "grow_at_zero",
           "layer_densities", "magnitude", "masks_from_scores", "random", "rigl", "snip"]
