"""Learning-rate schedules of the reference recipe (METHOD.md section 4), as optax schedules.

The run after dense training has two phases: pruning (pressure on) and regrowth
(pressure 0). Both schedules count optimizer steps from the start of the pruning phase.
"""

from __future__ import annotations

import optax


def weight_learning_rate(lr: float, pruning_steps: int, regrowth_steps: int) -> optax.Schedule:
    """Cosine ``lr -> lr/30`` while pruning; then reset to ``lr/100``, cosine to ``lr/1000``."""
    pruning = optax.cosine_decay_schedule(lr, max(pruning_steps, 1), alpha=1 / 30)
    regrowth = optax.cosine_decay_schedule(lr / 100, max(regrowth_steps, 1), alpha=0.1)
    return optax.join_schedules([pruning, regrowth], [pruning_steps])


def presence_learning_rate(lr: float, pruning_steps: int, steps_per_epoch: int,
                           decay: float = 0.75, frozen_after_epochs: int = 50) -> optax.Schedule:
    """Constant while pruning; in regrowth ``* decay`` per epoch, then 0 (the mask freezes)."""

    def regrowth(step):
        epoch = step // steps_per_epoch
        return lr * decay ** (epoch + 1) * (epoch < frozen_after_epochs)

    return optax.join_schedules([optax.constant_schedule(lr), regrowth], [pruning_steps])


def pruning_phase_sparsity(target_sparsity: float, regrowth_allowance: float) -> float:
    """Sparsity to aim the pruning phase at, so that regrowth lands on ``target_sparsity``.

    Weights regrow once the pressure is off, so the reference aims the pruning phase below
    the final density. ``regrowth_allowance`` is the expected relative density gain of the
    regrowth phase (0.15: the density grows by 15 %).
    """
    if regrowth_allowance < 0:
        raise ValueError(f"regrowth_allowance must be >= 0, got {regrowth_allowance!r}.")
    return 1.0 - (1.0 - target_sparsity) / (1.0 + regrowth_allowance)
