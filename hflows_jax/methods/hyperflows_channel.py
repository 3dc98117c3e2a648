"""Channel Hyperflows: one presence score per channel group entry, flows summed over it."""

from __future__ import annotations

import optax

import hflows_jax as hf
from hflows_jax.methods.base import Budget, ChannelMethod, PressureMethod, pressure_controller


class HyperflowsChannel(ChannelMethod, PressureMethod):
    name = "hyperflows_channel"
    # With trajectory, one raised pressure period sent every weak channel across zero at
    # once (74 % of the multiply-adds removed for a 50 % target; PI: 55.5 %,
    # docs/RESULTS.md).
    controller = "pi"

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        # No regrowth allowance, and the PI controller may pull back (signed): chosen when
        # a pruned channel's flow was 0 and channels kept dying at zero pressure (54 % and
        # 70 % removed for 50 % and 70 % targets, against 56 % and 77 % floored at zero;
        # docs/RESULTS.md). Channels regrow now (docs/METHOD.md section 10): both choices
        # are to be measured again.
        return hf.structured.channel_hyperflows(
            b.channel_groups(), pressure=pressure_controller(b, b.target_sparsity, signed=True),
            presence_optimizer=optax.adam(b.presence_lr), seed=b.seed)
