"""Importance measures: every measure against autodiff of the loss (an explicit Hessian),
the meaning of its terms against finite differences."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import importance


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
    g = jax.jit(jax.grad(mean_loss))(flat)
    return unravel(g), unravel(jax.jit(jax.hessian(mean_loss))(flat) @ g)


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    mean_loss = jax.jit(lambda p: sum(loss_fn(p, b) for b in batches) / len(batches))
    half_norm = jax.jit(lambda p: 0.5 * optax.tree.norm(jax.grad(mean_loss)(p)) ** 2)
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


def test_wanda_is_magnitude_times_the_input_norm_compared_per_output():
    """Wanda's scores by hand (numpy: each layer's inputs over every example and token),
    and its masks: every output unit keeps its own top half; 2:4 on the same scores."""
    rng = np.random.default_rng(0)
    params = {"up": {"kernel": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)},
              "down": {"kernel": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)}}

    def fn(p, x):  # tokens: (batch, positions, features)
        return jax.nn.relu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]

    inputs = [jnp.asarray(rng.normal(size=(3, 5, 8)) * rng.uniform(0.1, 3, 8), jnp.float32)
              for _ in range(2)]
    x = np.concatenate([np.asarray(b).reshape(-1, 8) for b in inputs])
    hidden = np.maximum(x @ np.asarray(params["up"]["kernel"]), 0)
    want = {"up": np.abs(params["up"]["kernel"]) * np.linalg.norm(x, axis=0)[:, None],
            "down": np.abs(params["down"]["kernel"]) * np.linalg.norm(hidden, axis=0)[:, None]}
    scores = hf.importance.wanda_scores(fn, params, [(b, None) for b in inputs])
    for name in want:
        np.testing.assert_allclose(scores[name]["kernel"], want[name], rtol=1e-5)
    masks = hf.prune(params, "wanda", 0.5, fn=fn, batches=inputs, distribution="per_output")
    for name, s in want.items():
        top = np.argsort(-s, axis=0)[: s.shape[0] // 2]
        expected = np.zeros(s.shape, bool)
        np.put_along_axis(expected, top, True, axis=0)
        np.testing.assert_array_equal(masks[name]["kernel"], expected)
    nm = hf.prune(params, "wanda", fn=fn, batches=inputs, distribution="2:4")
    blocks = np.asarray(nm["up"]["kernel"]).reshape(2, 4, 12)
    assert (blocks.sum(axis=1) == 2).all()
    with pytest.raises(ValueError, match="pass fn"):
        hf.prune(params, "wanda", 0.5, batches=inputs)
