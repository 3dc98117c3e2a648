"""Importance measures and one-shot pruning: every measure against autodiff of the loss
(an explicit Hessian) and the meaning of its terms against finite differences; masks from
scores, N:M, channels through hf.export."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import importance, pruning


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU layers and a dense head: small enough for an explicit
    Hessian."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features in (4, 6):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def problem(train_mode: bool = False):
    model = SmallCNN()
    x = jax.random.normal(jax.random.key(1), (12, 5, 5, 2))
    y = jnp.arange(12) % 3
    variables = model.init(jax.random.key(0), x)
    # Running statistics unlike a fresh BatchNorm's, so that eval mode is not the identity.
    stats = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape),
                         variables["batch_stats"])

    def loss_fn(params, batch):
        v = {"params": params, "batch_stats": stats}
        if train_mode:
            logits, _ = model.apply(v, batch[0], train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(v, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    groups = hf.structured.channel_groups(lambda p, xx: model.apply(
        {"params": p, "batch_stats": stats}, xx), variables["params"], x[:1])
    return model, variables["params"], loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])], groups


def explicit_g_and_hg(loss_fn, params, batches):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    mean_loss = lambda f: sum(loss_fn(unravel(f), b) for b in batches) / len(batches)  # noqa
    g = jax.grad(mean_loss)(flat)
    return unravel(g), unravel(jax.hessian(mean_loss)(flat) @ g)


# The docstring's table, written out: (term from w, g, hg; where |.| goes).
TABLE = {
    "magnitude": (lambda w, g, hg: w, "each"),
    "magnitude_squared": (lambda w, g, hg: w * w, None),
    "loss_increase": (lambda w, g, hg: -w * g, None),
    "loss_preservation": (lambda w, g, hg: w * g, "each"),
    "biased_loss_preservation": (lambda w, g, hg: w * w * g, "each"),
    "grasp": (lambda w, g, hg: w * hg, None),
    "gradient_norm_preservation": (lambda w, g, hg: w * hg, "total"),
}


@pytest.mark.parametrize("name", list(importance.MEASURES))
def test_every_measure_matches_its_formula_on_an_explicit_hessian(name):
    """Weight scores and filter scores (a filter: the kernel entries writing a channel,
    ``kernel[..., c]`` of each conv) from the explicit gradient and Hessian."""
    _, params, loss_fn, batches, groups = problem()
    g, hg = explicit_g_and_hg(loss_fn, params, batches)
    term, absolute = TABLE[name]
    t = jax.tree.map(term, params, g, hg)
    weights = importance.weight_scores(name, params, loss_fn, batches)
    np.testing.assert_allclose(weights["Conv_1"]["kernel"],
                               np.abs(t["Conv_1"]["kernel"]) if absolute else
                               t["Conv_1"]["kernel"], rtol=2e-4, atol=1e-7)
    filters = importance.filter_scores(name, params, groups, loss_fn, batches)
    assert set(filters) == {"Conv_0", "Conv_1"}
    for conv in ("Conv_0", "Conv_1"):
        k = np.asarray(t[conv]["kernel"])
        per_filter = (np.abs(k) if absolute == "each" else k).sum(axis=(0, 1, 2))
        want = np.abs(per_filter) if absolute == "total" else per_filter
        np.testing.assert_allclose(filters[conv], want, rtol=2e-4, atol=1e-7)


def test_filter_terms_are_first_order_changes_of_the_loss_and_the_gradient_norm():
    """Scaling filter f by (1 + h): the loss moves by h Σ_f θ·g and ½‖g‖² by h Σ_f θ·Hg
    (central finite differences), so removing it (h = -1) moves them by -Σ_f θ·g
    (loss_increase) and -2 Σ_f θ·Hg."""
    with jax.enable_x64(True):  # finite differences need the digits
        _, params, loss_fn, batches, groups = problem()
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        batches = [(x.astype(jnp.float64), y) for x, y in batches]
        check_first_order(params, loss_fn, batches, groups)


def check_first_order(params, loss_fn, batches, groups):
    mean_loss = lambda p: sum(loss_fn(p, b) for b in batches) / len(batches)  # noqa: E731
    half_norm = lambda p: 0.5 * optax.tree.norm(jax.grad(mean_loss)(p)) ** 2  # noqa: E731
    increase = importance.filter_scores("loss_increase", params, groups, loss_fn, batches)
    grasp = importance.filter_scores("grasp", params, groups, loss_fn, batches)
    h = 1e-4
    for c in range(4):
        def scaled(s, c=c):
            k = params["Conv_0"]["kernel"]
            return {**params, "Conv_0": {"kernel": k.at[..., c].multiply(1 + s)}}
        d_loss = (mean_loss(scaled(h)) - mean_loss(scaled(-h))) / (2 * h)
        d_norm = (half_norm(scaled(h)) - half_norm(scaled(-h))) / (2 * h)
        np.testing.assert_allclose(-increase["Conv_0"][c], d_loss, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(increase["Conv_0"]).max()))
        np.testing.assert_allclose(grasp["Conv_0"][c], d_norm, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(grasp["Conv_0"]).max()))


def test_train_mode_batchnorm_blinds_filter_scores():
    """Why scores run BatchNorm in eval mode: in train mode the loss cannot see a filter's
    scale, so Σ_f θ·g is 0 up to rounding."""
    _, params, train_loss, batches, groups = problem(train_mode=True)
    _, _, eval_loss, _, _ = problem(train_mode=False)
    blind = importance.filter_scores("loss_increase", params, groups, train_loss, batches)
    seen = importance.filter_scores("loss_increase", params, groups, eval_loss, batches)
    assert float(jnp.abs(blind["Conv_0"]).max()) < 1e-3 * float(jnp.abs(seen["Conv_0"]).max())


def test_class_balanced_draws_per_class_or_says_why_not():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 4)
    images = np.arange(12)
    x, y = importance.class_balanced(images, labels, 3, seed=1)
    assert sorted(np.bincount(y)) == [3, 3, 3] and np.all(labels[x] == y)
    with pytest.raises(ValueError, match="class 1 has 3 examples"):
        importance.class_balanced(images, labels, 4)


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
    assert masks["Conv_0"]["bias" if "bias" in masks["Conv_0"] else "kernel"] is not None
    assert masks["BatchNorm_0"]["scale"] is None  # rank 1: not prunable
    with pytest.warns(UserWarning, match=r"Conv_0/kernel \(3, 3, 2, 4\)"):
        nm = hf.prune(params, "loss_preservation", distribution="2:4", loss_fn=loss_fn,
                      batches=batches)
    assert bool(jnp.all(nm["Conv_0"]["kernel"]))  # 2 input channels: left dense
    assert pruning.is_n_m(nm["Conv_1"]["kernel"], 2, 4)  # 4 input channels
    lp = importance.weight_scores("loss_preservation", params, loss_fn, batches)["Conv_1"]
    groups = np.moveaxis(np.asarray(lp["kernel"]), -2, -1).reshape(-1, 4)
    chosen = np.moveaxis(np.asarray(nm["Conv_1"]["kernel"]), -2, -1).reshape(-1, 4)
    np.testing.assert_allclose(np.sort(groups[chosen].reshape(-1, 2), axis=1),
                               np.sort(groups, axis=1)[:, 2:])


@pytest.mark.parametrize("call, match", [
    (lambda p: hf.prune(p, "magnitude", 1.5), "sparsity must lie in"),
    (lambda p: hf.prune(p, "size", 0.5), "Unknown importance measure 'size'"),
    (lambda p: hf.prune(p, "grasp", 0.5), "pass loss_fn"),
    (lambda p: hf.prune(p, "magnitude", 0.9, distribution="2:4"), "pass None"),
    (lambda p: hf.prune(p, "magnitude", distribution="4:2"), "0 < N < M"),
    (lambda p: hf.prune(p, "magnitude", 0.5, distribution="blocks"), "Unknown sparsity"),
    (lambda p: hf.prune(p, {"w": jnp.ones(3)}, 0.5), "shaped like params"),
])
def test_prune_says_what_is_wrong(call, match):
    _, params, _, _, _ = problem()
    with pytest.raises(ValueError, match=match):
        call(params)


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
