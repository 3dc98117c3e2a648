"""RigL (Evci et al.): random sparse masks at initialization; every epoch, drop the
smallest weights and grow as many where the gradient is largest."""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


class RigL(Method):
    name = "rigl"
    distributions = ("erk", "uniform")
    prunes_at_init = True

    def pruner(self, b: Budget):
        return hf.baselines.rigl(b.target_sparsity, end_step=b.pruning_steps,
                                 update_every=b.steps_per_epoch, distribution=b.distribution,
                                 seed=b.seed)

    def optimizer(self, b: Budget, *weight_links):
        # Grown connections start at 0 with no momentum, as in RigL's official code (before
        # issue 20 they came back with the weight they kept while dropped: optax.chain).
        return hf.baselines.grow_at_zero(self.pruner(b), *weight_links)
