"""Pressure controllers against plain-Python re-statements of METHOD.md section 5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hflows_jax import pressure


def test_expected_density_ends_on_target_and_decreases():
    for target, epochs in [(0.9, 10), (0.98, 40), (0.995, 100)]:
        table = pressure.expected_density(target, epochs)
        assert table.shape == (epochs,)
        assert table[-1] == pytest.approx(1 - target, rel=1e-6)
        assert np.all(np.diff(table) < 0) and table[0] < 1
        # The per-epoch ratio follows the sigmoid from d0 up towards 0.999.
        ratios = table[1:] / table[:-1]
        assert np.all(np.diff(ratios) > 0) and ratios[-1] < 0.999


def reference_trajectory(target, epochs):
    """METHOD.md section 5 with Python floats: density(e) = prod_{k<=e} d(k), with
    d(k) = d0 + (0.999 - d0) * sigmoid((6/E)(k - E/2)) and d0 bisected to the target."""
    sig = [1 / (1 + math.exp(-(6 / epochs) * (k - epochs / 2))) for k in range(1, epochs + 1)]

    def densities(d0):
        out, density = [], 1.0
        for s in sig:
            density *= d0 + (0.999 - d0) * s
            out.append(density)
        return out

    lo, hi = 0.0, 0.999
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if densities(mid)[-1] < 1 - target else (lo, mid)
    return densities((lo + hi) / 2)


@pytest.mark.parametrize("target, epochs", [(0.9, 10), (0.98, 40), (0.5, 7), (0.995, 100)])
def test_expected_density_is_the_method_trajectory(target, epochs):
    np.testing.assert_allclose(pressure.expected_density(target, epochs),
                               reference_trajectory(target, epochs), rtol=1e-9)


def reference_controller(densities, expected, step=0.2):
    """METHOD.md section 5, written out with Python floats."""
    g, up, down, out = 0.0, 0.0, 0.0, []
    for density, want in zip(densities, expected):
        if density > want:
            g += step + up
            up += step / 4
            down = 0.0
        else:
            g -= step + down
            down += step / 4
            up = 0.0
            g = max(g, 0.0)
        out.append(g ** 1.5)
    return out


def test_trajectory_controller_matches_reference_and_acts_once_per_period():
    epochs, every = 12, 3
    ctrl = pressure.trajectory(0.9, total_steps=epochs * every, update_every=every)
    expected = pressure.expected_density(0.9, epochs)
    rng = np.random.default_rng(0)
    densities = expected * np.where(rng.random(epochs) < 0.6, 1.05, 0.95)
    want = reference_controller(densities, expected)
    update = jax.jit(ctrl.update)
    state = ctrl.init()
    for step in range(1, epochs * every + 1):
        epoch = (step - 1) // every
        state = update(state, jnp.float32(densities[epoch]), step)
        if step % every == 0 and step < epochs * every:
            assert float(state.gamma) == pytest.approx(want[epoch], rel=1e-5, abs=1e-6)
        elif step % every:
            previous = want[epoch - 1] if epoch else 0.0
            assert float(state.gamma) == pytest.approx(previous, rel=1e-5, abs=1e-6)
    assert float(state.gamma) == 0.0  # pruning phase over: regrowth at zero pressure
    assert float(state.g) > 0.0
    state = update(state, jnp.float32(1.0), epochs * every + every)
    assert float(state.gamma) == 0.0


def test_exponential_and_constant():
    ctrl = pressure.exponential(2.0, 1.5, every=4)
    state = ctrl.init()
    assert float(state.gamma) == 2.0
    for step, k in [(3, 0), (4, 1), (9, 2)]:
        state = ctrl.update(state, jnp.float32(0.5), step)
        assert float(state.gamma) == pytest.approx(2.0 * 1.5 ** k)
    const = pressure.constant(0.3)
    assert float(const.update(const.init(), jnp.float32(0.1), 100).gamma) == pytest.approx(0.3)


@pytest.mark.parametrize("make, match", [
    (lambda: pressure.trajectory(0.9, 10, 20), "update_every"),
    (lambda: pressure.trajectory(0.9, 0, 1), "total_steps"),
    (lambda: pressure.trajectory(0.001, 100, 10), "too low"),
    (lambda: pressure.exponential(1.0, 0.0, 3), "rate"),
    (lambda: pressure.exponential(1.0, 2.0, 0), "every"),
    (lambda: pressure.constant(math.inf), "pressure"),
])
def test_bad_controller_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("negative, hold", [(False, 0), (True, 0), (True, 3)])
def test_log_density_pi_matches_a_plain_restatement(negative, hold):
    """The docstring's rule in floats; with ``hold`` periods after the trajectory's end,
    the controller goes on deciding against the target itself."""
    steered, every, kp, ki = 10, 4, 1.0, 0.5
    ctrl = pressure.log_density_pi(0.95, steered * every, every, kp=kp, ki=ki,
                                   negative=negative, hold_steps=hold * every)
    periods = steered + hold
    expected = np.concatenate([pressure.expected_density(0.95, steered), [0.05] * hold])
    rng = np.random.default_rng(1)
    densities = expected * np.exp(rng.normal(0, 0.2, periods) - (0.15 if negative else 0))
    g, last, want = 0.0, 0.0, []
    for density, target in zip(densities, expected):  # the docstring's rule, in floats
        error = math.log(density / target)
        g = g + kp * (error - last) + ki * error
        g = g if negative else max(g, 0.0)
        last = error
        want.append(math.copysign(abs(g) ** 1.5, g))
    if negative:  # a run below the curve: the pressure pulls back
        assert min(want) < 0
    update = jax.jit(ctrl.update)
    state = ctrl.init()
    for step in range(1, periods * every + 1):
        state = update(state, jnp.float32(densities[(step - 1) // every]), step)
        if step % every == 0 and step < periods * every:
            assert float(state.gamma) == pytest.approx(want[step // every - 1], rel=1e-4,
                                                       abs=1e-6)
    assert float(state.gamma) == 0.0  # pruning phase over
    with pytest.raises(ValueError, match="hold_steps"):
        pressure.log_density_pi(0.95, 40, 4, hold_steps=-1)


def lagged_plant(ctrl, periods, every, lag=0.5, c=0.3, alpha=0.7):
    """Density relaxes towards the pressure law c * gamma^-alpha with a lag per period."""
    state, density, out = ctrl.init(), 1.0, []
    for step in range(1, periods * every + 1):
        if step % every == 1 or every == 1:
            law = min(1.0, c * max(float(state.gamma), 1e-3) ** -alpha)
            density = density + lag * (law - density)
            out.append(density)
        state = ctrl.update(state, jnp.float32(density), step)
    return np.array(out)


def test_both_controllers_steer_a_lagged_plant_to_the_trajectory_end():
    periods, every = 40, 2
    for make in (pressure.trajectory, pressure.log_density_pi):
        densities = lagged_plant(make(0.9, periods * every, every), periods, every)
        assert densities[-1] == pytest.approx(0.1, rel=0.1), make.__name__


@pytest.mark.parametrize("kp, ki", [(1.0, 0.5), (0.25, 0.25)])
def test_log_density_pi_is_stable_below_its_gain_limit(kp, ki):
    """On a plant that answers within one period, log(density / expected) = c - K g, the
    loop settles while K < 2 / (2 kp + ki) and swings ever wider above (the docstring)."""
    every, periods, c = 2, 60, 0.3
    limit = 2 / (2 * kp + ki)
    for gain, stable in ((0.5 * limit, True), (1.5 * limit, False)):
        ctrl = pressure.log_density_pi(0.9, every * periods, every, kp=kp, ki=ki,
                                       negative=True)
        table = pressure.expected_density(0.9, periods)
        update, state, errors = jax.jit(ctrl.update), ctrl.init(), []
        for step in range(1, every * periods):
            period = step // every
            density = table[max(period - 1, 0)] * math.exp(c - gain * float(state.g))
            state = update(state, jnp.float32(density), step)
            if step % every == 0:
                errors.append(abs(float(state.error)))
        if stable:
            assert errors[-1] < 1e-3 * c, (kp, ki, gain)
        else:
            assert errors[-1] > c, (kp, ki, gain)
