"""Channel Hyperflows: one presence score per channel group entry, flows summed over it."""

from __future__ import annotations

import optax

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.methods.base import Budget, ChannelMethod, PressureMethod, pressure_controller


class HyperflowsChannel(ChannelMethod, PressureMethod):
    name = "hyperflows_channel"
    # With trajectory, one raised pressure period sent every weak channel across zero at
    # once (74 % of the multiply-adds removed for a 50 % target; PI: 55.5 %,
    # docs/RESULTS.md).
    controller = "pi"

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        # No regrowth allowance: channels do not come back after pruning (the pressure is
        # 0, and they keep dying); with it, a 50 % target ended at 56 % (docs/RESULTS.md).
        # Since they keep dying at zero pressure, the PI controller may pull back (signed):
        # 54 % and 70 % removed for 50 % and 70 % targets, against 56 % and 77 % floored
        # at zero (docs/RESULTS.md).
        return hf.structured.channel_hyperflows(
            b.channel_groups(), pressure=pressure_controller(b, b.target_sparsity, signed=True),
            presence_optimizer=optax.adam(b.presence_lr), seed=b.seed)

    def start_warnings(self, cfg, steps_per_epoch: int) -> list[str]:
        warnings = super().start_warnings(cfg, steps_per_epoch)
        if cfg.model.name in models.BATCHNORM_MODELS and not cfg.model.train_bn_scale:
            warnings.append(f"{self.name} on {cfg.model.name} with the BatchNorm scale fixed "
                            "(--train_bn_scale=false) sees only the BatchNorm shift's flow, "
                            "not the channel's: such runs collapsed (docs/RESULTS.md). Pass "
                            "--train_bn_scale=true.")
        return warnings
