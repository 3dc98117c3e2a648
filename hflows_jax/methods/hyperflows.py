"""Hyperflows (METHOD.md): presence scores moved by their weights' flows against a pressure."""

from __future__ import annotations

import optax

import hflows_jax as hf
from hflows_jax import recipe
from hflows_jax.methods.base import Budget, PressureMethod, pressure_controller


class Hyperflows(PressureMethod):
    name = "hyperflows"

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        # The pruning phase aims below the target density by the regrowth it expects.
        target = recipe.pruning_phase_sparsity(b.target_sparsity, b.regrowth_allowance)
        return hf.hyperflows(
            pressure=pressure_controller(b, target), presence_optimizer=optax.adam(b.presence_lr),
            seed=b.seed, warn=False)  # the run prints its start_warnings, in its flags' words
