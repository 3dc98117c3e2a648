"""Pruning by scores: hf.prune's masks (global, N:M, channels through hf.export, on a
user's model), hf.fixed_masks, and hf.prune_at's rounds against the seed code's schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import importance, pruning
from tests.test_importance import problem


def test_prune_keeps_the_highest_scores_globally_and_n_m():
    _, params, loss_fn, batches, _ = problem()
    scores = importance.weight_scores("magnitude", params)
    masks = hf.prune(params, "magnitude", 0.75)
    kept = np.concatenate([np.asarray(scores[k]["kernel"]).ravel()[np.asarray(
        masks[k]["kernel"]).ravel()] for k in ("Conv_0", "Conv_1", "Dense_0")])
    everything = np.sort(np.concatenate([np.asarray(scores[k]["kernel"]).ravel()
                                         for k in ("Conv_0", "Conv_1", "Dense_0")]))
    assert kept.size == round(0.25 * everything.size)
    np.testing.assert_allclose(np.sort(kept), everything[-kept.size:])
    assert masks["BatchNorm_0"]["scale"] is None  # rank 1: not prunable
    with pytest.warns(UserWarning, match=r"Conv_0/kernel \(3, 3, 2, 4\)"):
        nm = hf.prune(params, "loss_preservation", distribution="2:4", loss_fn=loss_fn,
                      batches=batches)
    assert bool(jnp.all(nm["Conv_0"]["kernel"]))  # 2 input channels: left dense
    assert hf.n_m.is_n_m(nm["Conv_1"]["kernel"], 2, 4)  # 4 input channels
    lp = importance.weight_scores("loss_preservation", params, loss_fn, batches)["Conv_1"]
    groups = np.moveaxis(np.asarray(lp["kernel"]), -2, -1).reshape(-1, 4)
    chosen = np.moveaxis(np.asarray(nm["Conv_1"]["kernel"]), -2, -1).reshape(-1, 4)
    np.testing.assert_allclose(np.sort(groups[chosen].reshape(-1, 2), axis=1),
                               np.sort(groups, axis=1)[:, 2:])


@pytest.mark.parametrize("call, match", [
    (lambda p: hf.prune(p, "magnitude", 1.5), "sparsity must lie in"),
    (lambda p: hf.prune(p, "size", 0.5), "Unknown importance measure 'size'"),
    (lambda p: hf.prune(p, "grasp", 0.5), "pass loss_fn"),
    (lambda p: hf.prune(p, "magnitude", 0.9, distribution="2:4"), "pass 0.5"),
    (lambda p: hf.prune(p, "magnitude", distribution="4:2"), "0 < N < M"),
    (lambda p: hf.prune(p, "magnitude", 0.5, distribution="blocks"), "Unknown sparsity"),
    (lambda p: hf.prune(p, {"w": jnp.ones(3)}, 0.5), "shaped like params"),
])
def test_prune_says_what_is_wrong(call, match):
    _, params, _, _, _ = problem()
    with pytest.raises(ValueError, match=match):
        call(params)


def test_prune_rejects_another_models_groups():
    _, params, _, _, groups = problem()
    other = {**params, "Conv_1": {"kernel": jnp.ones((3, 3, 5, 6))}}
    with pytest.raises(ValueError, match="params do not match these channel groups"):
        hf.prune(other, "magnitude", 0.5, groups=groups)
    with pytest.raises(ValueError, match="one vector per group"):
        hf.prune(params, {"Conv_0": jnp.ones(4)}, 0.5, groups=groups)


@pytest.mark.slow
def test_channel_pruning_of_a_users_model_exports_smaller_and_identical():
    """Channels by a gradient measure on the Flax MNIST example's CNN, kept through
    fixed_masks, then hf.export: the compact model computes what the masked one does."""
    from experiments.user_loops.linen_mnist import CNN

    model = CNN()
    x = jax.random.normal(jax.random.key(3), (16, 28, 28, 1))
    y = jnp.arange(16) % 10
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    groups = hf.structured.channel_groups(lambda p, xx: model.apply({"params": p}, xx),
                                          params, x[:1])
    masks = hf.prune(params, "biased_loss_preservation", 0.5, groups=groups,
                     loss_fn=loss_fn, batches=[(x, y)], min_channels=40)
    scores = {g: np.asarray(s) for g, s in importance.filter_scores(
        "biased_loss_preservation", params, groups, loss_fn, [(x, y)]).items()}
    everything = np.sort(np.concatenate(list(scores.values())))
    cutoff = everything[-round(0.5 * everything.size)]
    want = {g: int(np.sum(s >= min(cutoff, np.sort(s)[-min(40, s.size)])))
            for g, s in scores.items()}
    assert want["Conv_0"] == 32 and want["Conv_1"] >= 40  # the floor binds somewhere
    tx = optax.chain(hf.fixed_masks(masks), optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(loss_fn)(hf.apply_masks(params, state), (x, y))
    updates, state = tx.update(grads, state, params)
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(hf.masks(state),
                                                             is_leaf=lambda v: v is None)):
        if m is not None:
            assert bool(jnp.all(jnp.where(m, True, u == 0)))
    fn = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
    masked = hf.apply_masks(params, state)
    compact = hf.export(fn, masked, hf.masks(state), x[:1])
    np.testing.assert_allclose(compact(x), fn(masked, x), rtol=1e-4, atol=1e-5)
    assert {g: kept for g, (kept, _) in compact.groups.items()} == want
    assert compact.macs < 0.8 * compact.dense_macs


def test_round_densities_are_the_seed_codes_schedule():
    """flowandprune's main.py: round k prunes p_k = p / (k p + n (1 - p)) of what is left."""
    p, n = 0.9, 5
    ratios = p / (np.arange(1, n + 1) * p + n * (1 - p))
    np.testing.assert_allclose(pruning.round_densities(p, n), np.cumprod(1 - ratios), rtol=1e-6)
    assert pruning.round_densities(p, n)[-1] == pytest.approx(1 - p)


def test_prune_at_rounds_keep_the_top_of_what_is_left():
    """Magnitude in 3 rounds (at init, at updates 3 and 6) while SGD trains: each round's
    masks are the highest |W * M| over the weights still present, at its density."""
    _, params, loss_fn, batches, _ = problem()
    tx = optax.chain(hf.prune_at("magnitude", 0.8, steps=(0, 3, 6)), optax.sgd(0.5))
    state = tx.init(params)
    densities = pruning.round_densities(0.8, 3)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(hf.apply_masks(params, state), batches[0])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def kernels(tree):
        return np.concatenate([np.asarray(tree[k]["kernel"]).ravel()
                               for k in ("Conv_0", "Conv_1", "Dense_0")])

    total = kernels(params).size
    before = kernels(hf.masks(state))
    assert before.sum() == round(densities[0] * total)
    np.testing.assert_array_equal(  # round 1: the top |W| of the fresh params
        before, np.abs(kernels(params)) >= np.sort(np.abs(kernels(params)))[-before.sum()])
    for count in range(1, 8):
        live = np.abs(kernels(hf.apply_masks(params, state)))
        old = kernels(hf.masks(state))
        params, state = step(params, state)
        now = kernels(hf.masks(state))
        if count in (3, 6):
            k = round(densities[(3, 6).index(count) + 1] * total)
            assert now.sum() == k and not np.any(now & ~old)  # nothing comes back
            np.testing.assert_array_equal(now, live >= np.sort(live)[-k])
        else:
            np.testing.assert_array_equal(now, old)
    assert float(hf.sparsity(state)) == pytest.approx(0.8, abs=1 / total)


@pytest.mark.slow
def test_prune_at_channels_in_rounds_by_a_gradient_measure():
    _, params, loss_fn, batches, groups = problem()
    tx = optax.chain(hf.prune_at("loss_preservation", 0.5, steps=(2, 4), loss_fn=loss_fn,
                                 batches=batches, groups=groups), optax.sgd(0.1))
    state = tx.init(params)
    counts = []
    for _ in range(5):
        grads = jax.grad(loss_fn)(hf.apply_masks(params, state), batches[0])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        counts.append(sum(int(k.sum()) for k in state[0].kept.values()))
    total = sum(groups.sizes.values())  # 4 + 6 channels
    n1, n2 = (round(d * total) for d in pruning.round_densities(0.5, 2))
    assert counts == [total, n1, n1, n2, n2]


def test_prune_at_says_what_is_wrong():
    with pytest.raises(ValueError, match="distinct non-negative"):
        hf.prune_at("magnitude", 0.5, steps=(3, 3))
    with pytest.raises(ValueError, match="reads the loss gradient"):
        hf.prune_at("grasp", 0.5, steps=(0,))
    with pytest.raises(ValueError, match="Unknown importance measure"):
        hf.prune_at("weight", 0.5, steps=(0,))
    with pytest.raises(ValueError, match="prunes once"):
        hf.prune_at("magnitude", 0.5, steps=(1, 2), distribution="2:4")
    with pytest.raises(ValueError, match="step 0"):
        hf.prune_at("magnitude", 0.5, steps=(0,), loss_args=("batch_stats",))
    _, params, loss_fn, batches, _ = problem()
    tx = hf.prune_at("loss_preservation", 0.5, steps=(1,), batches=batches,
                     loss_fn=lambda p, b, batch_stats: loss_fn(p, b),
                     loss_args=("batch_stats",))
    with pytest.raises(ValueError, match=r"pass them to tx.update\(..., batch_stats=...\)"):
        tx.update(params, tx.init(params), params)


def test_prune_at_n_m_once_during_training():
    _, params, _, _, _ = problem()
    tx = hf.prune_at("magnitude", 0.5, steps=(2,), distribution="2:4")
    state = tx.init(params)
    with pytest.warns(UserWarning, match="stay dense: Conv_0/kernel"):
        for _ in range(2):
            _, state = tx.update(params, state, params)
    kernels = [m for m in jax.tree.leaves(hf.masks(state)) if m.shape[-2] % 4 == 0]
    assert kernels and all(hf.n_m.is_n_m(m, 2, 4) and m.mean() == 0.5 for m in kernels)


def test_channel_floor_keeps_a_fraction_of_every_layer():
    """The seed code's constrain_ratios: a layer whose every score loses the global ranking
    still keeps floor(0.05 n) + 1 of its n channels."""
    from hflows_jax import models
    model = models.create("lenet300", 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    groups = hf.structured.channel_groups(model, params, (28, 28, 1))
    assert groups.sizes == {"Dense_0": 300, "Dense_1": 100}
    scores = {"Dense_0": 1 + jnp.arange(300) / 300, "Dense_1": jnp.arange(100) / 1000}
    for fraction, floor in ((0.0, 1), (0.05, 6), (0.2, 21)):
        masks = hf.prune(params, scores, 0.75, groups=groups, min_fraction=fraction)
        rows = masks["Dense_2"]["kernel"][:, 0]  # the rows reading Dense_1's channels
        assert np.array_equal(np.asarray(rows), np.arange(100) >= 100 - floor), fraction
        # Dense_0 keeps its 100 best channels: the rows of Dense_1 that read them.
        assert np.array_equal(np.asarray(masks["Dense_1"]["kernel"][:, 0]),
                              np.arange(300) >= 200)
