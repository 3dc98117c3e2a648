"""The reference recipe (METHOD.md sections 4 and 8) as functions of a run's length.

The run after dense training has two phases: pruning (pressure on) and regrowth
(pressure 0). The schedules count optimizer steps from the start of the pruning phase.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

PRESENCE_INIT_MEAN = 0.35  # presence scores start uniform in (0.2, 0.5)


def presence_regime(pruning_steps: int, decisions: int = 100,
                    min_crossing_steps: int = 100) -> tuple[float, int]:
    """(presence lr, steps between controller decisions) that keep a run of any length in
    the reference's regime.

    The reference prunes for 100 epochs of 391 steps with presence lr 1e-3: the
    controller decides 100 times, and a score, which Adam moves by about the lr per step
    of one-signed flow, needs about 0.35 / 1e-3 = 350 steps (about one controller period)
    to cross zero. So: ``decisions`` periods over the pruning phase, and an lr at which
    crossing takes one period, but never fewer than ``min_crossing_steps`` steps, so
    that masks follow the flow's sign over many batches rather than its noise. The
    reference's 39100 steps give lr 9.0e-4 and periods of 391 steps.
    """
    if pruning_steps < 1:
        raise ValueError(f"pruning_steps must be >= 1, got {pruning_steps!r}.")
    period = max(1, pruning_steps // decisions)
    return PRESENCE_INIT_MEAN / max(min_crossing_steps, period), period


def _distance_to_cross(target_sparsity: float, presence_init: tuple[float, float]) -> float:
    """How far the ``target_sparsity``-quantile of the initial scores lies above zero."""
    low, high = presence_init
    return low + (high - low) * target_sparsity


def unreachable_warning(target_sparsity: float, presence_lr: float, pruning_steps: int,
                        presence_init: tuple[float, float] = (0.2, 0.5)) -> str | None:
    """Why the pruning phase cannot reach ``target_sparsity``, or None if it can.

    The text says what is wrong, not what to change: the remedy depends on the caller
    (flags of a training script, arguments of ``hf.hyperflows``).

    Adam moves a score by about the lr per step of a steady one-signed flow, so in
    ``pruning_steps`` a score travels about ``lr * steps``. To prune a fraction s of scores
    that start uniform in ``presence_init``, the s-quantile of that range must cross zero.
    This is not a hard bound: while the pressure rises fast, Adam's second-moment average
    lags the growing gradient and its step exceeds the lr, and such a run may overshoot
    instead (docs/journal.md, "The library in a user's loop": 100 steps at lr 3.5e-3, a
    travel of 0.35 for 0.47 needed, ended at 96.9 % for a 90 % target).
    """
    needed = _distance_to_cross(target_sparsity, presence_init)
    travel = presence_lr * pruning_steps
    if travel >= needed:
        return None
    return (f"the pruning phase cannot reach {target_sparsity:.2%} sparsity at its pace: in "
            f"{pruning_steps} steps at presence lr {presence_lr:.3g} a presence score moves "
            f"about {travel:.3f} (one lr a step), and {needed:.3f} is needed. Runs like this "
            f"end short of the target or, when the rising pressure drives Adam beyond one lr "
            f"a step, far past it.")


def overshoot_warning(target_sparsity: float, presence_lr: float, pruning_steps: int,
                      presence_init: tuple[float, float] = (0.2, 0.5),
                      settling: float = 5.0) -> str | None:
    """Why the pruning phase is likely to overshoot ``target_sparsity``, or None (the
    diagnosis only, as :func:`unreachable_warning`).

    Nothing is pruned until scores cross zero, so the controller raises the pressure for
    the whole crossing time; it needs several crossing times after that to bring the
    sparsity back to its trajectory. Seen on CPU: 1.7 and 2.3 crossing times ended at
    99.9 % and 99.7 % for targets of 90 %; 11 and 18 landed within 0.4 points.
    """
    crossing = _distance_to_cross(target_sparsity, presence_init) / presence_lr
    if unreachable_warning(target_sparsity, presence_lr, pruning_steps, presence_init) \
            or pruning_steps >= settling * crossing:
        return None
    return (f"the pruning phase is short for its presence lr: scores need about "
            f"{crossing:.0f} steps to cross zero at presence lr {presence_lr:.3g}, and its "
            f"{pruning_steps} steps are fewer than {settling:g} times that, so the pressure "
            f"controller is likely to overshoot the {target_sparsity:.2%} target.")


def fitting_presence_lr(target_sparsity: float, pruning_steps: int,
                        presence_init: tuple[float, float] = (0.2, 0.5)) -> float | None:
    """The presence lr of :func:`presence_regime` if neither warning fires with it, else None
    (then no lr in the reference's regime fits: the pruning phase is too short)."""
    lr, _ = presence_regime(pruning_steps)
    args = (target_sparsity, lr, pruning_steps, presence_init)
    return None if unreachable_warning(*args) or overshoot_warning(*args) else lr


def weight_learning_rate(lr: float, pruning_steps: int, regrowth_steps: int) -> optax.Schedule:
    """Cosine ``lr -> lr/30`` while pruning; then reset to ``lr/100``, cosine to ``lr/1000``."""
    pruning = optax.cosine_decay_schedule(lr, max(pruning_steps, 1), alpha=1 / 30)
    regrowth = optax.cosine_decay_schedule(lr / 100, max(regrowth_steps, 1), alpha=0.1)
    return optax.join_schedules([pruning, regrowth], [pruning_steps])


# The reference's regrowth: 60 epochs, the presence lr 0 from the 50th on.
REGROWTH_EPOCHS = 60
FROZEN_AFTER = 50


def presence_learning_rate(lr: float, pruning_steps: int, regrowth_steps: int,
                           decay: float = 0.75, reference_epochs: int = REGROWTH_EPOCHS,
                           frozen_after: int = FROZEN_AFTER) -> optax.Schedule:
    """Constant while pruning. Regrowth is the reference's 60 epochs scaled onto
    ``regrowth_steps``: ``* decay`` every sixtieth of them, then 0 from the fiftieth on (the
    mask freezes). Over the reference's own 60 epochs that is ``* 0.75`` an epoch.

    Decayed by whole epochs instead, a one-epoch regrowth kept ``0.75 lr`` to its last step:
    channel masks flipped at almost every step, and the network ended on channels it had
    not trained with (ResNet-20 x0.5 on CIFAR-10: 68.7 % against 73.9 % scaled,
    docs/journal.md)."""

    def regrowth(step):
        part = step * reference_epochs // max(regrowth_steps, 1)
        return lr * decay ** (part + 1) * (part < frozen_after)

    return optax.join_schedules([optax.constant_schedule(lr), regrowth], [pruning_steps])


def presence_frozen_from(pruning_steps: int, regrowth_steps: int,
                         reference_epochs: int = REGROWTH_EPOCHS,
                         frozen_after: int = FROZEN_AFTER) -> int:
    """The first step at which ``presence_learning_rate`` is 0: no mask moves after it."""
    return pruning_steps + -(-frozen_after * regrowth_steps // reference_epochs)


def measured_land_step(pruning_steps: int, regrowth_steps: int, steps_per_epoch: int) -> int:
    """A latency run's land step: the last epoch end at or before ``presence_frozen_from``,
    so that the cut, moved onto the measured speed-up at that epoch end
    (``hf.structured.land_measured``), trains for the rest of the run. Landing mid-epoch,
    a one-epoch regrowth's cut was moved at the run's very end and never trained."""
    frozen = presence_frozen_from(pruning_steps, regrowth_steps)
    return max(steps_per_epoch, frozen // steps_per_epoch * steps_per_epoch)


def pruning_phase_sparsity(target_sparsity: float, regrowth_allowance: float) -> float:
    """Sparsity to aim the pruning phase at, so that regrowth lands on ``target_sparsity``.

    Weights regrow once the pressure is off, so the reference aims the pruning phase below
    the final density. ``regrowth_allowance`` is the expected relative density gain of the
    regrowth phase (0.15: the density grows by 15 %).
    """
    if regrowth_allowance < 0:
        raise ValueError(f"regrowth_allowance must be >= 0, got {regrowth_allowance!r}.")
    return 1.0 - (1.0 - target_sparsity) / (1.0 + regrowth_allowance)


def multistep(lr: float, gamma: float, milestones) -> optax.Schedule:
    """PyTorch's MultiStepLR by step (DHP's and FTWT's schedules): ``lr``, times ``gamma``
    at each milestone step. Takes a step or an array of them."""
    milestones = jnp.asarray(milestones)
    return lambda step: lr * gamma ** jnp.sum(jnp.asarray(step)[..., None] >= milestones, -1)
