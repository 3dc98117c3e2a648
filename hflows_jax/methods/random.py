"""Random masks at initialization (ERK by default), fixed after."""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


class Random(Method):
    name = "random"
    distributions = ("erk", "uniform")
    prunes_at_init = True

    def pruner(self, b: Budget):
        return hf.baselines.random(b.target_sparsity, distribution=b.distribution,
                                   seed=b.seed)
