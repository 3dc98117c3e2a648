"""DHP (Li et al.; METHOD.md section 9): hypernetwork convs whose latents a proximal L1
step drives to zero, until the multiply-adds left reach the target."""

from __future__ import annotations

import jax.numpy as jnp
import optax

import hflows_jax as hf
from hflows_jax.methods.base import Budget, ChannelMethod

# DHP's reg (1e-4) shrinks a latent by reg * lr a step: about 0.01 over the 30 epochs of the
# cifar10_5k setting, against about 1 over DHP's own runs of hundreds of epochs. The reg is
# set from the run's schedule so that the search can shrink a latent by this much.
DHP_SHRINK = 1.0


class DHP(ChannelMethod):
    name = "dhp"
    prunes_at_init = True  # it trains its hypernetwork model from initialization

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        lr_sum = float(jnp.sum(b.weight_lr(jnp.arange(max(b.pruning_steps, 1)))))
        return hf.structured.dhp.dhp(b.channel_groups(), b.target_sparsity, b.weight_lr,
                                     reg=DHP_SHRINK / lr_sum)

    def optimizer(self, b: Budget, *weight_links):
        # Its proximal step acts on the weight optimizer's final updates: it comes last.
        return optax.chain(*weight_links, self.pruner(b))

    def model(self, plain, target_sparsity):
        return hf.structured.dhp.to_dhp(plain)

    def plain(self, model, params, batch_stats):
        return hf.structured.dhp.plain_variables(model, params, batch_stats)
