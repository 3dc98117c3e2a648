"""Gradual magnitude pruning (Zhu and Gupta) with the cubic schedule, updated every epoch."""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


class Magnitude(Method):
    name = "magnitude"
    distributions = ("global", "uniform")

    def pruner(self, b: Budget):
        return hf.baselines.magnitude(b.target_sparsity, end_step=b.pruning_steps,
                                      update_every=b.steps_per_epoch,
                                      distribution=b.distribution)
