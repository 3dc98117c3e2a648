"""The library in a user's own training loop: the transformation's own schedule warnings,
which steps the schedules count under MultiSteps and inject_hyperparams, misuse that
``hf.check`` sees, and the helpers' plain-Python results."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax.hyperflows import presence_step_size
from tests.helpers import classification_batch, mlp_apply, mlp_params, xent


def schedule_warnings_at_init(tx, params) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tx.init(params)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# --- schedule warnings ---------------------------------------------------------------------

@pytest.mark.parametrize("lr, steps, expected", [
    # 98 %: the 0.98-quantile of scores uniform in (0.2, 0.5) sits 0.494 above zero.
    (1e-3, 469, "cannot reach 98.00%"),  # Adam travels at most 0.469
    (3.5e-3, 469, "overshoot"),  # crosses in 141 steps; 469 < 5 * 141
    (1e-2, 469, None),  # crosses in 49 steps; 469 > 5 * 49
    (1e-3, 30 * 469, None),  # the README's Usage settings over 30 epochs
])
def test_init_warns_when_the_schedule_misses_its_target(lr, steps, expected):
    params = mlp_params(jax.random.key(0))
    tx = optax.chain(hf.hyperflows(hf.pressure.trajectory(0.98, steps, max(1, steps // 100)),
                                   presence_optimizer=optax.adam(lr)),
                     optax.sgd(0.1, momentum=0.9))
    messages = schedule_warnings_at_init(tx, params)
    if expected is None:
        assert messages == []
    else:
        (message,) = messages
        assert expected in message and "total_steps" in message and "--" not in message


def test_the_warning_names_the_regime_lr_when_it_fits_and_warn_false_silences_it():
    params = mlp_params(jax.random.key(0))
    pressure = hf.pressure.trajectory(0.9, 5000, 50)
    (message,) = schedule_warnings_at_init(
        hf.hyperflows(pressure, presence_optimizer=optax.adam(1e-5)), params)
    lr, _ = hf.recipe.presence_regime(5000)
    assert f"hf.recipe.presence_regime(5000) gives a presence lr of {lr:.3g}" in message
    assert schedule_warnings_at_init(
        hf.hyperflows(pressure, presence_optimizer=optax.adam(lr)), params) == []
    assert schedule_warnings_at_init(
        hf.hyperflows(pressure, presence_optimizer=optax.adam(1e-5), warn=False), params) == []


def test_init_warns_under_jit_eval_shape_and_inject_hyperparams():
    params = mlp_params(jax.random.key(0))
    short = dict(pressure=hf.pressure.trajectory(0.9, 100, 10),
                 presence_optimizer=optax.adam(1e-3))
    for init in (jax.jit(hf.hyperflows(**short).init),
                 lambda p: jax.eval_shape(hf.hyperflows(**short).init, p),
                 optax.inject_hyperparams(hf.hyperflows)(**short).init,
                 optax.inject_hyperparams(hf.hyperflows)(**short, warn=True).init):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            init(params)
        assert any("cannot reach 90.00%" in str(w.message) for w in caught)
    off = optax.inject_hyperparams(hf.hyperflows)(**short, warn=False)
    assert schedule_warnings_at_init(off, params) == []


def test_no_warning_without_a_target_or_with_a_flow_sized_presence_step():
    params = mlp_params(jax.random.key(0))
    for tx in (hf.hyperflows(hf.pressure.constant(1.0), optax.adam(1e-9)),
               hf.hyperflows(hf.pressure.exponential(1e-3, 2.0, 10), optax.adam(1e-9)),
               hf.hyperflows(hf.pressure.trajectory(0.9, 100, 10), optax.sgd(1e-9))):
        assert schedule_warnings_at_init(tx, params) == []


def test_presence_step_size_is_the_adam_lr_and_none_for_sgd():
    assert presence_step_size(optax.adam(2e-3)) == pytest.approx(2e-3, rel=1e-4)
    assert presence_step_size(optax.adamw(2e-3, weight_decay=0.1)) == pytest.approx(2e-3, rel=1e-4)
    assert presence_step_size(optax.inject_hyperparams(optax.adam)(learning_rate=4e-3)) \
        == pytest.approx(4e-3, rel=1e-4)
    assert presence_step_size(optax.sgd(1e-3)) is None
    # One that needs more than (grads, state, params) to step says nothing, and init runs.
    needs_value = optax.contrib.reduce_on_plateau()
    assert presence_step_size(optax.chain(optax.adam(1e-3), needs_value)) is None


# --- which steps the schedules count ------------------------------------------------------

def test_under_multisteps_the_schedules_count_optimizer_updates_not_mini_batches():
    params = mlp_params(jax.random.key(1))
    x, y = classification_batch(jax.random.key(2))
    grads = jax.grad(lambda w: xent(mlp_apply(w, x), y))(params)
    pruner = optax.inject_hyperparams(hf.hyperflows)(
        pressure=hf.pressure.exponential(1e-3, 2.0, every=1),
        presence_optimizer=optax.inject_hyperparams(optax.adam)(
            learning_rate=optax.linear_schedule(1e-3, 0.0, 10)))
    tx = optax.MultiSteps(optax.chain(pruner, optax.sgd(0.1)), every_k_schedule=4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(20):  # 20 mini-batches, one optimizer update every 4
        _, state = update(grads, state, params)
    inner = hf.find_pruner_state(state)
    assert int(state.mini_step) == 0 and int(state.gradient_step) == 5
    assert int(inner.count) == 5  # the pressure schedule's step
    assert float(hf.pressure_value(state)) == pytest.approx(1e-3 * 2.0 ** 5)
    injected = state.inner_opt_state[0]
    assert int(injected.count) == 5  # inject_hyperparams counts updates too
    presence_adam = inner.presence_opt_state
    assert int(presence_adam.count) == 5  # and so does the presence lr schedule
    # The hyperparams hold the value the last (5th) update used: the schedule at step 4.
    assert float(presence_adam.hyperparams["learning_rate"]) == pytest.approx(1e-3 * (1 - 4 / 10))
    # A non-finite step: the pruner's own counts stay, the injection around it counts it.
    bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    for _ in range(4):
        _, state = update(bad, state, params)
    inner = hf.find_pruner_state(state)
    assert int(state.gradient_step) == 6 and int(state.inner_opt_state[0].count) == 6
    assert int(inner.count) == 5 and int(inner.presence_opt_state.count) == 5
    assert int(inner.skipped) == 1


# --- misuse -------------------------------------------------------------------------------

def with_a_third_pruned(state):
    """Prune every third entry of every kernel by setting its presence score below 0."""
    presence = jax.tree.map(
        lambda t: None if t is None else jnp.where(jnp.arange(t.size).reshape(t.shape) % 3 == 0,
                                                   -1.0, t),
        hf.find_pruner_state(state).presence, is_leaf=lambda t: t is None)
    return optax.tree.set(state, presence=presence)


@pytest.mark.parametrize("optimizer, seen", [
    (optax.sgd(0.1, momentum=0.9), True),
    (optax.adamw(1e-3), True),
    (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), True),
    (optax.sgd(0.1), False),  # keeps no state: not seen (documented)
    (optax.clip_by_global_norm(1.0), False),  # not an optimizer: fine before the pruner
])
def test_check_sees_the_pruner_chained_after_an_optimizer(optimizer, seen):
    params = mlp_params(jax.random.key(0))
    pruner = hf.hyperflows(hf.pressure.constant(0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hf.check(optax.chain(pruner, optimizer).init(params)) == []
        found = hf.check(optax.chain(optimizer, pruner).init(params))
    assert bool(found) == seen
    assert len(caught) == len(found)
    if seen:
        assert "chained after" in found[0]


def test_check_sees_a_gradient_taken_through_the_mask():
    params = mlp_params(jax.random.key(0))
    x, y = classification_batch(jax.random.key(1))
    loss = lambda p: xent(mlp_apply(p, x), y)  # noqa: E731
    state = with_a_third_pruned(optax.chain(hf.hyperflows(hf.pressure.constant(0.0)),
                                            optax.sgd(0.1)).init(params))
    through = jax.grad(lambda p: loss(hf.apply_masks(p, state)))(params)
    with pytest.warns(UserWarning, match="hf.check: the gradient is exactly 0"):
        (message,) = hf.check(state, through)
    assert "exactly 0 on all" in message
    _, at_effective = hf.masked_value_and_grad(loss)(params, state)
    assert hf.check(state, at_effective) == []
    # The oracle: the gradient of the loss at W * M, taken by hand.
    effective = jax.tree.map(lambda w, m: w if m is None else w * m, params, hf.masks(state),
                             is_leaf=lambda m: m is None)
    expected = jax.grad(loss)(effective)
    for got, want in zip(jax.tree.leaves(at_effective), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_apply_masks_on_a_masks_tree_and_without_a_pruner():
    params = mlp_params(jax.random.key(0))
    state = optax.chain(hf.hyperflows(hf.pressure.constant(0.0)), optax.sgd(0.1)).init(params)
    with pytest.raises(ValueError, match="tree of masks, not an optimizer state"):
        hf.apply_masks(params, hf.masks(state))
    plain = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match="No pruning state found"):
        hf.apply_masks(params, plain)
    assert hf.apply_masks(params, plain, missing="ignore") is params
    assert not hf.has_pruner_state(plain) and hf.has_pruner_state(state)
    pruned = with_a_third_pruned(state)
    kernel = hf.apply_masks(params, pruned, missing="ignore")["layer0"]["kernel"]
    assert float(jnp.sum(kernel == 0)) == pytest.approx(params["layer0"]["kernel"].size / 3, abs=1)
    with pytest.raises(ValueError, match="missing"):
        hf.apply_masks(params, state, missing="skip")
    # The gradient helper passes it on: pruning off, the plain gradient.
    x, y = classification_batch(jax.random.key(1))
    loss = lambda p: xent(mlp_apply(p, x), y)  # noqa: E731
    _, grads = hf.masked_value_and_grad(loss, missing="ignore")(params, plain)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(loss)(params))):
        np.testing.assert_array_equal(got, want)


# --- plain results ------------------------------------------------------------------------

def test_layer_sparsity_is_floats_keyed_by_path_name():
    params = mlp_params(jax.random.key(0))
    seen = []

    def is_prunable(path, leaf):
        seen.append(hf.path_name(path))
        return leaf.ndim >= 2

    state = with_a_third_pruned(hf.hyperflows(hf.pressure.constant(0.0),
                                              is_prunable=is_prunable).init(params))
    layers = hf.layer_sparsity(state)
    assert all(type(v) is float for v in layers.values())
    json.dumps(layers)
    assert set(layers) <= set(seen) and "layer0/kernel" in layers
    for name, value in layers.items():
        layer, leaf = name.split("/")
        size = params[layer][leaf].size
        assert value == pytest.approx(len(range(0, size, 3)) / size)
    traced = jax.jit(hf.layer_sparsity)(state)  # under jit: arrays
    assert all(isinstance(v, jax.Array) for v in traced.values())
