"""Baseline pruners: targets, score oracles, Hessian-gradient product, fixed masks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax.baselines import distributions
from hflows_jax.baselines.magnitude_pruning import cubic_sparsity
from hflows_jax.baselines.rigl_pruning import drop_fraction
from tests.helpers import classification_batch, mlp_apply, mlp_params, xent


def linear_problem(n=32, d=5, k=3):
    x = jax.random.normal(jax.random.key(0), (n, d))
    y = jax.random.normal(jax.random.key(1), (n, k))
    params = {"w": jax.random.normal(jax.random.key(2), (d, k)), "b": jnp.zeros(k)}
    loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)  # noqa: E731
    return params, loss, (x, y)


def mlp_problem():
    params = mlp_params(jax.random.key(3), sizes=(6, 16, 3))
    batch = classification_batch(jax.random.key(4), n=64)
    loss = lambda p, b: xent(mlp_apply(p, b[0]), b[1])  # noqa: E731
    return params, loss, batch


def test_erk_and_uniform_densities_meet_the_budget():
    shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (512, 10), (10, 10)]
    sizes = np.array([np.prod(s) for s in shapes])
    for dist in ("uniform", "erk"):
        d = np.array(distributions.layer_densities(shapes, 0.1, dist))
        assert np.sum(d * sizes) / sizes.sum() == pytest.approx(0.1)
        assert np.all((d > 0) & (d <= 1))
    erk = distributions.layer_densities(shapes, 0.1, "erk")
    assert erk[3] > erk[2] and erk[0] > erk[1]  # smaller layers stay denser
    capped = distributions.layer_densities([(2, 2), (1000, 1000)], 0.5, "erk")
    assert capped[0] == 1.0 and capped[1] == pytest.approx((0.5 * 1000004 - 4) / 1e6)
    with pytest.raises(ValueError, match="Unknown sparsity distribution"):
        hf.baselines.random(0.5, distribution="gaussian")


def test_keep_top_keeps_exactly_k_highest():
    scores = jnp.array([[0.3, 5.0, -1.0], [2.0, 2.0, 0.1]])
    mask = distributions.keep_top(scores, 3)
    assert int(mask.sum()) == 3 and bool(mask[0, 1]) and not bool(mask[0, 2])


def test_snip_scores_match_the_closed_form():
    params, loss, (x, y) = linear_problem()
    g = 2.0 / (x.shape[0] * y.shape[1]) * x.T @ (x @ params["w"] - y)  # d/dW of the mean
    scores = hf.importance.weight_scores("loss_preservation", params, loss, [(x, y)])
    np.testing.assert_allclose(scores["w"], jnp.abs(params["w"] * g), rtol=1e-5, atol=1e-6)
    state = hf.baselines.snip(0.6, loss, [(x, y)]).init(params)
    kept = np.sort(np.asarray(jnp.abs(params["w"] * g)).ravel())[::-1][:6]
    np.testing.assert_allclose(np.sort(np.asarray(scores["w"][state.masks["w"]]))[::-1], kept,
                               rtol=1e-5)


@pytest.mark.slow
def test_grasp_hessian_gradient_product_matches_explicit_hessian_and_finite_differences():
    params, loss, batch = mlp_problem()
    hg = hf.importance.hessian_gradient(loss, params, [batch])
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_loss = lambda f: loss(unravel(f), batch)  # noqa: E731
    flat_grad = jax.jit(jax.grad(flat_loss))
    g = flat_grad(flat)
    explicit = jax.jit(jax.hessian(flat_loss))(flat) @ g
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hg)[0], explicit, rtol=1e-4,
                               atol=1e-6)
    eps = 1e-2
    fd = (flat_grad(flat + eps * g) - flat_grad(flat - eps * g)) / (2 * eps)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hg)[0], fd, rtol=2e-2,
                               atol=2e-4 * float(jnp.abs(fd).max()))
    scores = hf.importance.weight_scores("grasp", params, loss, [batch])
    chex.assert_trees_all_close(scores, jax.tree.map(lambda w, h: w * h, params, hg))


def train(tx, params, loss, batch, steps):
    state = tx.init(params)
    history = []

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(hf.apply_masks(params, state), batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    for _ in range(steps):
        params, state, updates = step(params, state)
        history.append((hf.masks(state), updates))
    return params, state, history


@pytest.mark.parametrize("make", [
    lambda loss, batch: hf.baselines.snip(0.75, loss, [batch]),
    lambda loss, batch: hf.baselines.grasp(0.75, loss, [batch], distribution="uniform"),
    lambda loss, batch: hf.baselines.random(0.75, distribution="uniform"),
], ids=["snip", "grasp", "random"])
def test_one_shot_pruners_hit_target_and_never_change_their_masks(make):
    params, loss, batch = mlp_problem()
    tx = make(loss, batch)
    state = tx.init(params)
    assert float(hf.sparsity(state)) == pytest.approx(0.75, abs=1 / 144)
    _, new_state = tx.update(params, state, params)
    chex.assert_trees_all_equal(hf.masks(new_state), hf.masks(state))


def test_random_uses_the_layer_densities_it_is_given():
    params, _, _ = mlp_problem()
    state = hf.baselines.random(0.9, distribution="erk").init(params)
    shapes = [(6, 16), (16, 3)]
    want = distributions.layer_densities(shapes, 0.1, "erk")
    got = [1 - float(v) for v in hf.layer_sparsity(state).values()]
    np.testing.assert_allclose(got, want, atol=1 / 48)


def test_magnitude_follows_the_cubic_schedule_and_holds_masks_between_updates():
    params, loss, batch = mlp_problem()
    tx = optax.chain(hf.baselines.magnitude(0.9, end_step=20, update_every=5), optax.sgd(0.1))
    params, state, history = train(tx, params, loss, batch, steps=30)
    for step, (masks, _) in enumerate(history, 1):
        density = float(1 - masking_sparsity(masks))
        want = 1 - float(cubic_sparsity(step // 5 * 5, 0.9, 0, 20))
        assert density == pytest.approx(want, abs=1 / 144), step
        if step % 5 or step > 20:
            chex.assert_trees_all_equal(masks, history[step - 2][0] if step > 1 else masks)
    assert float(hf.sparsity(state)) == pytest.approx(0.9, abs=1 / 144)


def test_magnitude_lands_on_the_target_when_update_every_does_not_divide_end_step():
    params = {"w": jax.random.normal(jax.random.key(0), (10, 10))}
    tx = hf.baselines.magnitude(0.9, end_step=10, update_every=7)
    state = tx.init(params)
    step = jax.jit(tx.update)
    sparsities = []
    for _ in range(12):
        _, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
        sparsities.append(round(float(hf.sparsity(state)), 6))
    # updates at step 7 (cubic schedule: 0.8757, 88 of 100 pruned) and at end_step
    assert sparsities == [0.0] * 6 + [0.88] * 3 + [0.9] * 3


def masking_sparsity(masks):
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    return 1 - sum(int(m.sum()) for m in leaves) / sum(m.size for m in leaves)


def test_magnitude_keeps_the_largest_weights():
    params, loss, batch = mlp_problem()
    tx = hf.baselines.magnitude(0.5, end_step=1, update_every=1, distribution="uniform")
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(grads, state, params)
    w = np.abs(np.asarray(params["layer0"]["kernel"]))
    m = np.asarray(state.masks["layer0"]["kernel"])
    assert m.sum() == 48 and w[m].min() >= w[~m].max()


def test_rigl_keeps_density_and_swaps_only_on_update_steps():
    params, loss, batch = mlp_problem()
    tx = optax.chain(hf.baselines.rigl(0.8, end_step=40, update_every=4, alpha=0.5,
                                       distribution="uniform"), optax.sgd(0.1))
    _, state, history = train(tx, params, loss, batch, steps=48)
    densities = {round(1 - masking_sparsity(m), 6) for m, _ in history}
    assert len(densities) == 1
    changed = [s for s in range(2, 49)
               if not all(jnp.array_equal(a, b) for a, b in zip(
                   jax.tree.leaves(history[s - 1][0]), jax.tree.leaves(history[s - 2][0])))]
    assert changed and all(s % 4 == 0 and s < 40 for s in changed), changed
    assert float(drop_fraction(0, 0.5, 40)) == pytest.approx(0.5)
    assert float(drop_fraction(40, 0.5, 40)) == pytest.approx(0.0)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
    tx = hf.baselines.rigl(0.5, end_step=100, update_every=1, alpha=1.0, distribution="uniform")
    state = tx.init(params)._replace(masks={"w": jnp.array([[True, True, False, False]])})
    grads = {"w": jnp.array([[0.0, 0.0, 0.1, 9.0]])}
    _, state = tx.update(grads, state, params)
    # drops the smallest active |W| (entry 0), grows the largest inactive |g| (entry 3)
    assert state.masks["w"].tolist() == [[False, True, False, True]]


def test_rigl_grows_connections_at_zero_with_no_momentum():
    # By hand, sgd(0.1, momentum=0.9), one swap a step (k = 1 of 2 active). Step 1: trace
    # [1, 1, 0, 0]; drop entry 0 (|W| = 1), grow entry 3 (|g| = 9) at 0. Step 2: trace
    # [0.9, 1.9, 0, 1]; drop entry 3 (|W| = 0), grow entry 0 (|g| = 5) at 0, trace reset;
    # dropped, it had kept 0.9 - 0.09 = 0.81 and a trace of 0.9. The plain chain grows
    # entry 3 back at 4, so step 2 drops entry 1 instead and grows entry 0 at 0.81.
    params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
    grads = [{"w": jnp.array([[1.0, 1.0, 0.0, 9.0]])}, {"w": jnp.array([[5.0, 1.0, 0.0, 1.0]])}]
    rigl = hf.baselines.rigl(0.5, end_step=100, update_every=1, alpha=1.0, distribution="uniform")
    cases = ((hf.baselines.grow_at_zero, [True, True, False, False], [0.0, 1.71, 3.0, -0.1], 0.0),
             (optax.chain, [True, False, False, True], [0.81, 1.71, 3.0, 3.9], 0.9))
    for combine, masks, weights, trace in cases:
        tx = combine(rigl, optax.sgd(0.1, momentum=0.9))
        state = tx.init(params)
        state = (state[0]._replace(masks={"w": jnp.array([[True, True, False, False]])}),
                 *state[1:])
        p = params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        assert hf.masks(state)["w"].tolist() == [masks]
        np.testing.assert_allclose(p["w"][0], weights, rtol=1e-6)
        assert combine is optax.chain or float(p["w"][0, 0]) == 0.0  # exactly
        assert float(state[1][0].trace["w"][0, 0]) == pytest.approx(trace)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sparsity must lie in"):
        hf.baselines.magnitude(1.2, end_step=10)
    with pytest.raises(ValueError, match="begin_step < end_step"):
        hf.baselines.magnitude(0.5, end_step=0)
    with pytest.raises(ValueError, match="end_step >= 1"):
        hf.baselines.rigl(0.5, end_step=0)
    with pytest.raises(ValueError, match="no prunable leaf"):
        hf.baselines.random(0.5).init({"b": jnp.ones(3)})
    params, loss, batch = linear_problem()
    tx = hf.baselines.snip(0.5, loss, [batch])
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))


def test_erk_needs_a_concrete_sparsity_under_inject_hyperparams():
    params, _, _ = mlp_problem()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    injected = optax.inject_hyperparams(hf.baselines.random)(0.9, distribution="erk")
    with pytest.raises(ValueError, match="static_args"):
        jax.eval_shape(injected.init, abstract)
    static = optax.inject_hyperparams(hf.baselines.random, static_args="sparsity")(0.9)
    chex.assert_trees_all_equal(hf.masks(static.init(params)),
                                hf.masks(hf.baselines.random(0.9).init(params)))


def test_snip_takes_an_n_m_distribution():
    """N:M as a distribution of the one-shot baselines: SNIP's 2 highest |W * g| of every
    4 inputs; the 6-input first layer cannot split into fours and stays dense, loudly."""
    params, loss, batch = mlp_problem()
    with pytest.warns(UserWarning, match=r"layer0/kernel \(6, 16\)"):
        masks = hf.baselines.snip(0.5, loss, [batch], distribution="2:4").init(params).masks
    assert bool(jnp.all(masks["layer0"]["kernel"])) and masks["layer0"]["bias"] is None
    mask = np.asarray(masks["layer1"]["kernel"])  # 16 inputs
    assert hf.n_m.is_n_m(mask, 2, 4) and mask.sum() == mask.size // 2
    scores = hf.importance.weight_scores("loss_preservation", params, loss, [batch])
    groups = np.asarray(scores["layer1"]["kernel"]).T.reshape(-1, 4)
    np.testing.assert_allclose(np.sort(groups[mask.T.reshape(-1, 4)].reshape(-1, 2), axis=1),
                               np.sort(groups, axis=1)[:, 2:])
