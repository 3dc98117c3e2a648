"""The pruner of a run, by ``--method``: Hyperflows or a baseline, on the same budget.

Every method prunes during the pruning phase and keeps its masks through the regrowth
phase (only Hyperflows regrows there), under the same weight-learning-rate recipe.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optax

import hflows_jax as hf
from hflows_jax import recipe

METHODS = ("hyperflows", "magnitude", "snip", "grasp", "random", "rigl")
DEFAULT_DISTRIBUTION = {"magnitude": "global", "snip": "global", "grasp": "global",
                        "random": "erk", "rigl": "erk"}


def make_pruner(method: str, target_sparsity: float, pruning_steps: int, steps_per_epoch: int,
                presence_lr: optax.Schedule, regrowth_allowance: float, seed: int,
                distribution: str | None = None,
                scoring: Callable[[], tuple[Callable, Sequence[Any]]] | None = None,
                controller_period: int | None = None) -> optax.GradientTransformation:
    """``scoring() -> (loss_fn, batches)`` feeds the one-shot scores of SNIP and GraSP.

    The pressure controller steps every ``controller_period`` steps (default: once per
    epoch, the reference); masks of magnitude pruning and RigL change once per epoch.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {list(METHODS)}.")
    if method == "hyperflows":
        return hf.hyperflows(
            pressure=hf.pressure.trajectory(
                recipe.pruning_phase_sparsity(target_sparsity, regrowth_allowance),
                pruning_steps, update_every=controller_period or steps_per_epoch),
            presence_optimizer=optax.adam(presence_lr), seed=seed)
    distribution = distribution or DEFAULT_DISTRIBUTION[method]
    if method == "magnitude":
        return hf.baselines.magnitude(target_sparsity, end_step=pruning_steps,
                                      update_every=steps_per_epoch, distribution=distribution)
    if method == "random":
        return hf.baselines.random(target_sparsity, distribution=distribution, seed=seed)
    if method == "rigl":
        return hf.baselines.rigl(target_sparsity, end_step=pruning_steps,
                                 update_every=steps_per_epoch, distribution=distribution,
                                 seed=seed)
    loss_fn, batches = scoring()
    make = hf.baselines.snip if method == "snip" else hf.baselines.grasp
    return make(target_sparsity, loss_fn, batches, distribution=distribution)
