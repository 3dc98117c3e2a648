"""Pressure controllers: how hard the global push on every presence score is.

Each controller is a pair of pure functions, ``init() -> state`` and
``update(state, density, step) -> state``. The state is a NamedTuple whose ``gamma``
field is the pressure the next step applies, so the controller lives inside the
optimizer state and jits, scans and checkpoints with it. ``density`` is the fraction of
prunable weights that are present after the current step; ``step`` counts the steps
taken so far, this one included.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PressureController(NamedTuple):
    init: Callable[[], NamedTuple]
    update: Callable[[NamedTuple, jax.Array, jax.Array], NamedTuple]
    # What a controller that aims at a sparsity aims at, so that hf.hyperflows can tell at
    # init whether its presence optimizer gets there in time; None for open-loop laws.
    target_sparsity: float | None = None
    total_steps: int | None = None
    # Whether it can pull scores up (a negative pressure) when the masks went past the
    # trajectory: channel Hyperflows' channels keep dying at zero pressure.
    pulls_back: bool = False
    # Steps the controller goes on holding its target after total_steps; the pressure is
    # 0 from total_steps + hold_steps on, where a channel budget lands.
    hold_steps: int = 0


class ConstantPressureState(NamedTuple):
    gamma: jax.Array


class ExponentialPressureState(NamedTuple):
    gamma: jax.Array


class TrajectoryPressureState(NamedTuple):
    gamma: jax.Array  # applied pressure, g ** exponent (0 once the pruning phase is over)
    g: jax.Array  # controller output before the exponent
    inertia_up: jax.Array
    inertia_down: jax.Array


def _check_nonnegative(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative pressure, got {value!r}.")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def constant(gamma: float) -> PressureController:
    """The same pressure at every step: the setting of the pressure-law experiments."""
    gamma = _check_nonnegative("gamma", gamma)

    def init():
        return ConstantPressureState(gamma=jnp.asarray(gamma, jnp.float32))

    def update(state, density, step):
        del density, step
        return state

    return PressureController(init, update)


def exponential(gamma0: float, rate: float, every: int) -> PressureController:
    """``gamma0 * rate ** (step // every)``: a fixed ramp that ignores the density."""
    gamma0 = _check_nonnegative("gamma0", gamma0)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a finite, positive factor, got {rate!r}.")
    every = _check_positive_int("every", every)

    def init():
        return ExponentialPressureState(gamma=jnp.asarray(gamma0, jnp.float32))

    def update(state, density, step):
        del state, density
        exponent = (jnp.asarray(step) // every).astype(jnp.float32)
        return ExponentialPressureState(gamma=jnp.float32(gamma0) * jnp.float32(rate) ** exponent)

    return PressureController(init, update)


def expected_density(target_sparsity: float, epochs: int, end_ratio: float = 0.999,
                     steepness: float = 6.0) -> np.ndarray:
    """The reference density trajectory, one entry per epoch 1..epochs (fractions of 1).

    ``density(e) = prod_{k<=e} d(k)`` with ``d(k) = d0 + (end_ratio - d0) *
    sigmoid((steepness / E) * (k - E / 2))``; ``d0`` is bisected so that
    ``density(E) = 1 - target_sparsity``. Early epochs prune fast, late ones settle.
    """
    k = np.arange(1, epochs + 1, dtype=np.float64)
    sig = 1.0 / (1.0 + np.exp(-(steepness / epochs) * (k - epochs / 2)))
    target = math.log1p(-target_sparsity)

    def log_final(d0):
        return float(np.sum(np.log(d0 + (end_ratio - d0) * sig)))

    lo, hi = 0.0, end_ratio  # log_final grows with d0
    if log_final(hi) < target:
        raise ValueError(
            f"target_sparsity={target_sparsity} is too low to reach over {epochs} controller "
            f"periods: even the slowest trajectory prunes more.")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if log_final(mid) < target:
            lo = mid
        else:
            hi = mid
    d0 = 0.5 * (lo + hi)
    return np.exp(np.cumsum(np.log(d0 + (end_ratio - d0) * sig)))


def _expected_table(target_sparsity: float, total_steps: int, update_every: int
                    ) -> tuple[int, int, int, jax.Array]:
    """Checked (total_steps, update_every, periods) and the expected density per period."""
    if not 0.0 < target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must lie in (0, 1), got {target_sparsity!r}.")
    total_steps = _check_positive_int("total_steps", total_steps)
    update_every = _check_positive_int("update_every", update_every)
    if update_every > total_steps:
        raise ValueError(f"update_every={update_every} exceeds total_steps={total_steps}: "
                         "the controller would never act.")
    periods = total_steps // update_every
    table = jnp.asarray(expected_density(target_sparsity, periods), jnp.float32)
    return total_steps, update_every, periods, table


def _check_hold(hold_steps: int) -> int:
    if int(hold_steps) != hold_steps or hold_steps < 0:
        raise ValueError(f"hold_steps must be a non-negative integer, got {hold_steps!r}.")
    return int(hold_steps)


def trajectory(target_sparsity: float, total_steps: int, update_every: int,
               step_size: float = 0.2, exponent: float = 1.5,
               hold_steps: int = 0) -> PressureController:
    """The reference controller (METHOD.md section 5): track the expected density.

    Every ``update_every`` steps (one "epoch") the measured density is compared with the
    expected trajectory: above it, ``g`` rises by ``step_size`` plus a growing inertia;
    otherwise it falls likewise, floored at 0. The applied pressure is ``g ** exponent``
    and drops to 0 once ``total_steps`` have passed, which opens the regrowth phase
    (``hold_steps`` later, as ``log_density_pi``'s).
    """
    total_steps, update_every, epochs, table = _expected_table(target_sparsity, total_steps,
                                                               update_every)
    _check_nonnegative("step_size", step_size)
    end = total_steps + _check_hold(hold_steps)

    def init():
        zero = jnp.zeros((), jnp.float32)
        return TrajectoryPressureState(gamma=zero, g=zero, inertia_up=zero, inertia_down=zero)

    def update(state, density, step):
        step = jnp.asarray(step, jnp.int32)
        epoch = step // update_every
        acts = (step % update_every == 0) & (epoch >= 1) & (epoch <= end // update_every)
        expected = table[jnp.clip(epoch - 1, 0, epochs - 1)]
        above = density > expected
        g_up = state.g + step_size + state.inertia_up
        g_down = jnp.maximum(state.g - step_size - state.inertia_down, 0.0)
        stepped = TrajectoryPressureState(
            gamma=state.gamma,
            g=jnp.where(above, g_up, g_down),
            inertia_up=jnp.where(above, state.inertia_up + step_size / 4, 0.0),
            inertia_down=jnp.where(above, 0.0, state.inertia_down + step_size / 4),
        )
        new = jax.tree.map(lambda a, b: jnp.where(acts, a, b), stepped, state)
        gamma = jnp.where(step >= end, 0.0, new.g ** exponent)
        return new._replace(gamma=gamma.astype(jnp.float32))

    return PressureController(init, update, float(target_sparsity), total_steps,
                              hold_steps=end - total_steps)


class LogDensityPIState(NamedTuple):
    gamma: jax.Array  # applied pressure, g ** exponent (0 once the pruning phase is over)
    g: jax.Array  # controller output before the exponent
    error: jax.Array  # log(density / expected) at the last decision


def log_density_pi(target_sparsity: float, total_steps: int, update_every: int,
                   kp: float = 1.0, ki: float = 0.5, exponent: float = 1.5,
                   negative: bool = False, hold_steps: int = 0) -> PressureController:
    """A PI controller on the log-density error against the same expected trajectory.

    At each decision ``e = log(density / expected)`` (positive: too dense) and
    ``g <- max(g + kp * (e - e_last) + ki * e, 0)``: the integral term settles ``g`` where
    the density follows the trajectory, and the proportional term, acting on the change
    of the error, brakes as soon as the density turns, which the reference's growing
    inertia does only after the density has crossed the curve. Not the reference
    (``trajectory`` is); the pressure is ``g ** exponent`` and 0 after ``total_steps``.

    ``negative=True`` drops the floor: below the curve ``g`` goes negative and the
    pressure ``sign(g) |g| ** exponent`` pulls scores up. Channel Hyperflows needs it (its
    channels keep dying at zero pressure); on weights it made the controller oscillate.

    Stability: where the masks answer a change of ``g`` within one period, as
    ``log density = c - K g``, the loop is ``g' = g + kp (e - e_last) + ki e`` with
    ``e = c - K g``, whose roots stay inside the unit circle while
    ``K < 2 / (2 kp + ki)``; above it ``g`` swings every period, ever wider. Channels,
    where a few hundred scores sit near zero, make such a fast plant: give them smaller
    gains.

    ``hold_steps``: after ``total_steps`` the controller goes on deciding for that many
    steps, aiming at the target itself (the trajectory's end), and the pressure drops to 0
    only after them: a run whose masks can still move (channels regrow) lands where the
    controller holds it.
    """
    total_steps, update_every, periods, table = _expected_table(target_sparsity, total_steps,
                                                                update_every)
    kp, ki = _check_nonnegative("kp", kp), _check_nonnegative("ki", ki)
    end = total_steps + _check_hold(hold_steps)

    def init():
        zero = jnp.zeros((), jnp.float32)
        return LogDensityPIState(gamma=zero, g=zero, error=zero)

    def update(state, density, step):
        step = jnp.asarray(step, jnp.int32)
        period = step // update_every
        acts = (step % update_every == 0) & (period >= 1) & (period <= end // update_every)
        expected = table[jnp.clip(period - 1, 0, periods - 1)]
        error = jnp.log(jnp.maximum(density, 1e-6)) - jnp.log(expected)
        g = state.g + kp * (error - state.error) + ki * error
        g = g if negative else jnp.maximum(g, 0.0)
        new = LogDensityPIState(state.gamma, jnp.where(acts, g, state.g),
                                jnp.where(acts, error, state.error))
        push = jnp.sign(new.g) * jnp.abs(new.g) ** exponent
        gamma = jnp.where(step >= end, 0.0, push)
        return new._replace(gamma=gamma.astype(jnp.float32))

    return PressureController(init, update, float(target_sparsity), total_steps,
                              bool(negative), end - total_steps)
