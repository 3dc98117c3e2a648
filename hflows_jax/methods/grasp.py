"""GraSP (Wang et al.): masks from the gradient-norm increasing score W * Hg at
initialization, fixed after."""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


class GraSP(Method):
    name = "grasp"
    distributions = ("global", "uniform", "erk", "N:M")
    prunes_at_init = True

    def pruner(self, b: Budget):
        return hf.baselines.grasp(b.target_sparsity, b.scoring.loss_fn, b.scoring.batches,
                                  distribution=b.distribution)
