"""Channel Hyperflows: one presence score per channel group entry, flows summed over it."""

from __future__ import annotations

import math

import optax

import hflows_jax as hf
from hflows_jax import recipe
from hflows_jax.methods.base import Budget, ChannelMethod, PressureMethod, pressure_controller


class HyperflowsChannel(ChannelMethod, PressureMethod):
    name = "hyperflows_channel"
    # With trajectory, one raised pressure period sent every weak channel across zero at
    # once (74 % of the multiply-adds removed for a 50 % target; PI: 55.5 %,
    # docs/journal.md).
    controller = "pi"
    options = ("round_to", "target", "target_speedup", "latency_batch", "latency_table")
    # (kp, ki) of the PI controller. A pressure change flips the channels near zero
    # within one controller period: on the whole CIFAR-10 (narrow VGG-19, 70 % target),
    # log-density moved about 0.75 per unit of g. The PI loop is stable while that gain is
    # below 2 / (2 kp + ki) (hf.pressure.log_density_pi): 0.8 at the default (1, 0.5),
    # where the density swung between 25 and 35 % every period over the regrowth epoch
    # and the run landed where the last swing left it; 2.7 at these, where it stayed
    # within 28 and 33 % (a replay of that epoch from the same checkpoint).
    pi_gains = (0.25, 0.25)

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        """The controller's trajectory reaches the target at the end of the pruning
        epochs, and the controller holds it over the regrowth epochs (``hold``): with the
        pressure off there, channels regrew and cifar10_5k runs ended 3.5 to 4.0 points
        of multiply-adds short of their targets; with one trajectory over both phases,
        0.3 to 2.3 points past them, but on the whole CIFAR-10 4.8 short of 70 % at 62.1 %
        accuracy, where holding gave 4.1 short at 64.6 % (at the default PI gains; at
        ``pi_gains``, 1.1 short at 63.4 %). The pressure is shared by
        multiply-adds (``pressure_by="macs"``): shared alike, the cifar10_5k runs were 1.2
        and 4.2 points less accurate (docs/journal.md). No regrowth allowance, and the PI
        controller may pull back (signed). The budget lands where the presence lr reaches 0
        (``recipe.presence_frozen_from``), so the last sixth of the regrowth epochs trains
        the channels it landed on. With ``--target=latency`` the controller steers, and
        the pressure is shared by, the latency the run's table predicts, and the budget
        lands at an epoch end (``recipe.measured_land_step``), where the training loop
        moves it onto the exported model's measured speed-up."""
        by_latency = b.latency is not None
        return hf.structured.channel_hyperflows(
            b.channel_groups(),
            pressure=pressure_controller(b, b.target_sparsity, signed=True, hold=True,
                                         pi_gains=self.pi_gains),
            presence_optimizer=optax.adam(b.presence_lr), seed=b.seed,
            target="latency" if by_latency else "flops",
            pressure_by="latency" if by_latency else "macs",
            latency=b.latency() if by_latency else None,
            round_to=b.round_to or 1,
            land_step=(recipe.measured_land_step(b.pruning_steps, b.regrowth_steps,
                                                 b.steps_per_epoch) if by_latency else
                       recipe.presence_frozen_from(b.pruning_steps, b.regrowth_steps)),
            warn=False)  # the run prints its start_warnings, in its flags' words

    def scores_pruned(self, target_sparsity: float) -> float:
        """A multiply-add target's channels, as a uniform cut removes them."""
        return 1.0 - math.sqrt(1.0 - target_sparsity)
