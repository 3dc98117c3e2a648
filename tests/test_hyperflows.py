"""The transformation against an independent oracle, and its behaviour as an optax citizen."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import masking
from tests.helpers import TinyConvNet, classification_batch, mlp_apply, mlp_params, xent

STE = 0.25
GAMMA = 0.7


# --- the oracle: autodiff through the loss that METHOD.md writes down ---------------------

@jax.custom_vjp
def step_ste(t):
    return (t >= 0).astype(t.dtype)


step_ste.defvjp(lambda t: (step_ste(t), None), lambda _, g: (STE * g,))


def oracle_loss(weights, presence, task_loss):
    """task_loss(W * step(T)) + gamma * mean(T), the mean over every prunable entry."""
    effective = jax.tree.map(lambda w, t: w if t is None else w * step_ste(t),
                             weights, presence, is_leaf=lambda x: x is None)
    all_t = jnp.concatenate([t.ravel() for t in jax.tree.leaves(presence)])
    return task_loss(effective) + GAMMA * jnp.mean(all_t)


oracle_grads = jax.jit(jax.grad(oracle_loss, argnums=(0, 1)), static_argnums=2)


def check_against_oracle(params, task_loss, steps=3):
    presence_opt = optax.adam(1e-2)
    tx = hf.hyperflows(hf.pressure.constant(GAMMA), presence_optimizer=presence_opt,
                       ste_scale=STE)
    state = tx.init(params)
    presence = state.presence
    oracle_opt_state = presence_opt.init(presence)
    task_grad = jax.jit(jax.grad(task_loss))
    for _ in range(steps):
        # Library path: gradient w.r.t. the effective weights, then tx.update.
        grads = task_grad(hf.apply_masks(params, state))
        updates, new_state = jax.jit(tx.update)(grads, state, params)
        # Oracle path.
        g_w, g_t = oracle_grads(params, presence, task_loss)
        t_steps, oracle_opt_state = presence_opt.update(g_t, oracle_opt_state, presence)
        presence = optax.apply_updates(presence, t_steps)

        chex.assert_trees_all_close(new_state.presence, presence, atol=1e-6, rtol=1e-6)
        chex.assert_trees_all_close(updates, g_w, atol=1e-6, rtol=1e-5)
        state = new_state
        params = jax.tree.map(lambda p, u: p - 0.5 * u, params, updates)
    return state


@pytest.mark.slow
def test_update_matches_autodiff_oracle_on_mlp():
    params = mlp_params(jax.random.key(0))
    x, y = classification_batch(jax.random.key(1))
    state = check_against_oracle(params, lambda w: xent(mlp_apply(w, x), y), steps=4)
    assert int(state.count) == 4


@pytest.mark.slow
def test_update_matches_autodiff_oracle_on_conv_net():
    model = TinyConvNet()
    x = jax.random.normal(jax.random.key(2), (8, 6, 6, 2))
    y = jax.random.randint(jax.random.key(3), (8,), 0, 3)
    params = model.init(jax.random.key(4), x)["params"]
    check_against_oracle(params, lambda w: xent(model.apply({"params": w}, x), y))


def test_oracle_check_sees_pruned_weights():
    """With part of the network pruned, the oracle still agrees (flows of pruned weights)."""
    params = mlp_params(jax.random.key(5))
    x, y = classification_batch(jax.random.key(6))
    tx = hf.hyperflows(hf.pressure.constant(GAMMA), presence_optimizer=optax.sgd(0.1))
    state = tx.init(params)
    presence = jax.tree.map(lambda t: t - 0.35, state.presence)  # roughly a third pruned
    state = optax.tree.set(state, presence=presence)
    assert 0.05 < float(hf.sparsity(state)) < 0.95
    task_loss = lambda w: xent(mlp_apply(w, x), y)  # noqa: E731
    grads = jax.jit(jax.grad(task_loss))(hf.apply_masks(params, state))
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    g_w, g_t = oracle_grads(params, presence, task_loss)
    chex.assert_trees_all_close(new_state.presence,
                                jax.tree.map(lambda t, g: t - 0.1 * g, presence, g_t), atol=1e-6)
    chex.assert_trees_all_close(updates, g_w, atol=1e-6)
    pruned_updates = updates["layer0"]["kernel"][~hf.masks(state)["layer0"]["kernel"]]
    assert pruned_updates.size > 0 and jnp.all(pruned_updates == 0)
    # hf.flows is the oracle's presence gradient without the pressure term gamma / N.
    flows = hf.flows(params, grads, state)
    assert flows["layer0"]["bias"] is None and flows["layer1"]["kernel"].dtype == jnp.float32
    chex.assert_trees_all_close(flows, jax.tree.map(lambda g: g - GAMMA / 72, g_t), atol=1e-6)


# --- regrowth and pressure ----------------------------------------------------------------

def linear_problem():
    """y = x @ (2 w): with w frozen, both weights are wanted, present or not (flows < 0)."""
    x = jax.random.normal(jax.random.key(0), (64, 2))
    w = jnp.array([[1.0], [-2.0]])
    y = x @ (2 * w)
    params = {"w": w}
    loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)  # noqa: E731
    return params, loss


def run(tx, params, loss, steps, state=None):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(hf.apply_masks(params, state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_needed_weight_regrows_when_flow_beats_pressure():
    params, loss = linear_problem()
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(0.1), presence_optimizer=optax.sgd(0.05)),
                     optax.set_to_zero())
    state = tx.init(params)
    state = optax.tree.set(state, presence={"w": jnp.array([[-0.05], [0.3]])})
    assert not bool(hf.masks(state)["w"][0, 0])
    _, state = run(tx, params, loss, steps=10, state=state)
    assert bool(hf.masks(state)["w"][0, 0]), optax.tree.get(state, "presence")


def test_pressure_alone_removes_weights():
    params, _ = linear_problem()
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(1.0), presence_optimizer=optax.sgd(0.5)),
                     optax.sgd(0.1))
    _, state = run(tx, params, lambda p: 0.0 * jnp.sum(p["w"]), steps=3)
    assert float(hf.sparsity(state)) == 1.0


@pytest.mark.slow
def test_higher_constant_pressure_gives_higher_sparsity():
    params = mlp_params(jax.random.key(7), sizes=(6, 32, 3))
    x, y = classification_batch(jax.random.key(8), n=128)
    loss = lambda w: xent(mlp_apply(w, x), y)  # noqa: E731
    sparsities = []
    for gamma in (0.0, 0.05, 0.2, 0.8, 3.2):
        tx = optax.chain(hf.hyperflows(hf.pressure.constant(gamma),
                                       presence_optimizer=optax.adam(2e-2)),
                         optax.sgd(0.1))
        _, state = run(tx, params, loss, steps=60)
        sparsities.append(float(hf.sparsity(state)))
    assert all(a < b for a, b in zip(sparsities, sparsities[1:])), sparsities


# --- optax citizenship --------------------------------------------------------------------

def test_state_is_findable_by_name():
    params = mlp_params(jax.random.key(1))
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(1.0)), optax.sgd(0.1))
    state = tx.init(params)
    presence = optax.tree.get(state, "presence")
    assert presence["layer0"]["bias"] is None and presence["layer0"]["kernel"].shape == (6, 8)
    assert type(hf.find_pruner_state(state)).__name__ == "HyperflowsState"
    assert float(hf.pressure_value(state)) == 1.0


def test_masks_set_by_hand_through_presence():
    params = mlp_params(jax.random.key(1))
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(1.0)), optax.sgd(0.1))
    state = tx.init(params)
    presence = jax.tree.map(lambda t: -jnp.ones_like(t), optax.tree.get(state, "presence"))
    presence["layer1"]["kernel"] = jnp.ones_like(presence["layer1"]["kernel"])
    state = optax.tree.set(state, presence=presence)
    layers = hf.layer_sparsity(state)
    assert set(layers) == {"layer0/kernel", "layer1/kernel"}
    assert float(layers["layer0/kernel"]) == 1.0 and float(layers["layer1/kernel"]) == 0.0
    assert float(hf.sparsity(state)) == pytest.approx(48 / (48 + 24))
    effective = hf.apply_masks(params, state)
    assert jnp.all(effective["layer0"]["kernel"] == 0)
    chex.assert_trees_all_equal(effective["layer1"], params["layer1"])


@pytest.mark.slow
def test_non_finite_gradients_skip_the_step():
    params = mlp_params(jax.random.key(5))
    tx = hf.hyperflows(hf.pressure.trajectory(0.5, 10, 1), presence_optimizer=optax.adam(0.1))
    x, y = classification_batch(jax.random.key(6))
    grads = jax.grad(lambda w: xent(mlp_apply(w, x), y))(params)
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(params), params)  # one good step moves the controller
    bad = jax.tree.map(lambda g: g, grads)
    bad["layer1"]["bias"] = bad["layer1"]["bias"].at[0].set(jnp.nan)
    bad["layer0"]["kernel"] = bad["layer0"]["kernel"].at[0, 0].set(jnp.inf)
    updates, skipped = update(bad, state, params)
    chex.assert_trees_all_equal(skipped.presence, state.presence)
    chex.assert_trees_all_equal(skipped.presence_opt_state, state.presence_opt_state)
    chex.assert_trees_all_equal(skipped.pressure, state.pressure)
    chex.assert_trees_all_equal(hf.masks(skipped), hf.masks(state))
    assert int(skipped.count) == int(state.count) == 1
    assert int(skipped.skipped) == 1
    assert all(jnp.all(u == 0) for u in jax.tree.leaves(updates))
    _, after = update(grads, skipped, params)  # and training goes on
    assert int(after.count) == 2 and int(after.skipped) == 1


def test_ste_scale_is_an_injectable_hyperparameter():
    params = mlp_params(jax.random.key(5))
    x, y = classification_batch(jax.random.key(6))
    grads = jax.grad(lambda w: xent(mlp_apply(w, x), y))(params)
    tx = optax.inject_hyperparams(hf.hyperflows)(
        pressure=hf.pressure.constant(GAMMA), presence_optimizer=optax.sgd(0.1))
    state = tx.init(params)
    assert float(state.hyperparams["ste_scale"]) == float(state.inner_state.ste_scale) == 0.25
    state.hyperparams["ste_scale"] = jnp.float32(0.5)
    _, new_state = jax.jit(tx.update)(grads, state, params)
    flows = hf.masks(state)  # None where not prunable
    flows = masking.map_prunable(lambda _, w, g: 0.5 * w * g, flows, params, grads)
    step = masking.map_prunable(lambda a, b: a - b, new_state.inner_state.presence,
                                   state.inner_state.presence)
    want = masking.map_prunable(lambda f: -0.1 * (f + GAMMA / 72), flows)
    chex.assert_trees_all_close(step, want, atol=1e-6)
    assert float(new_state.inner_state.ste_scale) == 0.5  # hf.flows reads it from here
    chex.assert_trees_all_close(hf.flows(params, grads, new_state), flows, atol=1e-7)


# --- bad input -----------------------------------------------------------------------------

def test_clear_errors_for_bad_input():
    params = mlp_params(jax.random.key(0))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target_sparsity"):
            hf.pressure.trajectory(bad, 100, 10)
    with pytest.raises(ValueError, match="pressure"):
        hf.pressure.constant(-1.0)
    with pytest.raises(ValueError, match="pressure"):
        hf.pressure.exponential(-1.0, 1.1, 5)
    tx = hf.hyperflows(hf.pressure.constant(1.0))
    with pytest.raises(ValueError, match="no prunable leaf"):
        tx.init({"bias": jnp.ones(3), "scale": jnp.ones(3)})
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="structure of params"):
        tx.update({"layer0": params["layer0"]}, state, params)
    with pytest.raises(ValueError, match="No pruning state"):
        hf.sparsity(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="controller"):
        hf.hyperflows(0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="ste_scale"):
            hf.hyperflows(hf.pressure.constant(1.0), ste_scale=bad)
    with pytest.raises(ValueError, match="presence_init"):
        hf.hyperflows(hf.pressure.constant(1.0), presence_init=(0.5, 0.2))


@pytest.mark.parametrize("injected", [False, True])
def test_custom_is_prunable_selects_leaves(injected):
    params = mlp_params(jax.random.key(0))
    only_first = lambda path, leaf: "layer0" in jax.tree_util.keystr(path) and leaf.ndim == 2  # noqa: E731
    factory = (optax.inject_hyperparams(hf.hyperflows, static_args="is_prunable") if injected
               else hf.hyperflows)
    state = hf.find_pruner_state(
        factory(hf.pressure.constant(1.0), is_prunable=only_first).init(params))
    assert state.presence["layer1"]["kernel"] is None
    assert state.presence["layer0"]["kernel"].shape == (6, 8)
    assert np.all((np.asarray(state.presence["layer0"]["kernel"]) >= 0.2)
                  & (np.asarray(state.presence["layer0"]["kernel"]) <= 0.5))


def test_n_m_hyperflows_finds_a_two_of_four_teacher():
    """A student of a 2:4-sparse linear teacher: the masks are exactly 2:4 after init and
    every step, and the flows move them from random 2:4 masks onto the teacher's support.
    A pruned weight keeps its value (it gets no task gradient), so its flow says whether
    that value would help: the student starts with the teacher's signs."""
    rng = np.random.default_rng(0)
    support = np.zeros((8, 6), bool)
    for out in range(6):
        for g in range(2):
            support[4 * g + rng.choice(4, 2, replace=False), out] = True
    teacher = jnp.asarray(np.where(support, rng.choice([-1.0, 1.0], (8, 6)), 0.0))
    x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
    loss = lambda p: jnp.mean((x @ p["w"] - x @ teacher) ** 2)  # noqa: E731
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(0.0), optax.adam(0.02), n_m="2:4"),
                     optax.adam(0.02))
    signs = np.where(support, np.asarray(teacher), rng.choice([-1.0, 1.0], (8, 6)))
    params = {"w": jnp.asarray(np.abs(rng.normal(size=(8, 6))) * 0.5 * signs, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(hf.apply_masks(params, state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    assert not np.array_equal(np.asarray(hf.masks(state)["w"]), support)
    for i in range(600):
        mask = hf.masks(state)["w"]
        if i % 50 == 0:
            groups = np.asarray(mask).T.reshape(6, 2, 4)
            assert np.all(groups.sum(-1) == 2), i
        params, state = step(params, state)
    np.testing.assert_array_equal(np.asarray(hf.masks(state)["w"]), support)
    assert float(loss(hf.apply_masks(params, state))) < 1e-3


def test_n_m_hyperflows_says_what_is_wrong():
    with pytest.raises(ValueError, match="pattern sets the density"):
        hf.hyperflows(hf.pressure.trajectory(0.5, 100, 10), n_m="2:4")
    with pytest.raises(ValueError, match="read like '2:4'"):
        hf.hyperflows(hf.pressure.constant(0.0), n_m="half")
    with pytest.warns(UserWarning, match=r"kernels \(3, 8\) do not split"):
        hf.hyperflows(hf.pressure.constant(0.0), n_m="2:4").init({"w": jnp.ones((3, 8))})
