"""SNIP (Lee et al.): masks from |W * g| at initialization, fixed after."""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


class SNIP(Method):
    name = "snip"
    distributions = ("global", "uniform", "erk", "N:M")
    prunes_at_init = True

    def pruner(self, b: Budget):
        return hf.baselines.snip(b.target_sparsity, b.scoring.loss_fn, b.scoring.batches,
                                 distribution=b.distribution)
