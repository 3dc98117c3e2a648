"""DHP against hand computations and the plain model: the hypernetwork kernel, the conv
built on it, the proximal L1 step on latents, the latent channel masks, finalization to a
plain VGG (same logits, and through export a compact model), and the search's FLOP stop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import hflows_jax as hf
from hflows_jax.models import VGG
from hflows_jax.structured import channel_groups
from hflows_jax.structured.dhp import (DHPVGG, HyperConv, dhp, hyper_kernel, latent_masks,
                                       plain_variables, proximal_l1, to_dhp)

SMALL_VGG = dict(layers=(8, "M", 16, 16), num_classes=3)


def test_hyper_kernel_matches_the_formula_entry_by_entry():
    rng = np.random.default_rng(0)
    c_in, c_out, e, kh, kw = 3, 5, 8, 3, 2
    z_in, z_out = rng.normal(size=c_in), rng.normal(size=c_out)
    b0 = rng.normal(size=(c_in, c_out))
    w1, b1 = rng.normal(size=(c_in, c_out, e)), rng.normal(size=(c_in, c_out, e))
    w2, b2 = rng.normal(size=(c_in, c_out, kh * kw, e)), rng.normal(size=(c_in, c_out, kh * kw))
    got = np.asarray(hyper_kernel(*(jnp.asarray(a, jnp.float32) for a in
                                    (z_in, z_out, b0, w1, b1, w2, b2)), (kh, kw)))
    assert got.shape == (kh, kw, c_in, c_out)
    for i in range(c_in):
        for o in range(c_out):
            a = z_in[i] * z_out[o] + b0[i, o]
            b = a * w1[i, o] + b1[i, o]
            for t in range(kh * kw):
                want = sum(w2[i, o, t, j] * b[j] for j in range(e)) + b2[i, o, t]
                np.testing.assert_allclose(got[t // kw, t % kw, i, o], want, rtol=1e-4,
                                           atol=1e-4)


def test_hyper_conv_is_a_conv_with_the_generated_kernel_and_official_init():
    conv = HyperConv(features=6)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    z_in = jax.random.normal(jax.random.key(2), (4,))
    params = conv.init(jax.random.key(0), x, z_in)["params"]
    y, z_out = conv.apply({"params": params}, x, z_in)
    kernel = hyper_kernel(z_in, params["latent"], params["b0"], params["w1"], params["b1"],
                          params["w2"], params["b2"], (3, 3))
    want = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z_out, params["latent"])
    assert params["latent"].shape == (6,) and params["w2"].shape == (4, 6, 9, 8)
    assert float(jnp.max(jnp.abs(params["w1"]))) <= math.sqrt(3)
    assert float(jnp.max(jnp.abs(params["w2"]))) <= math.sqrt(3 / (8 * 4 * 9))
    assert float(jnp.max(jnp.abs(params["w2"]))) > 0.5 * math.sqrt(3 / (8 * 4 * 9))
    # A zero latent entry switches its channel off (biases are 0 at init): in the outputs,
    # and in the next layer's inputs through z_in.
    params["latent"] = params["latent"].at[2].set(0.0)
    y, _ = conv.apply({"params": params}, x, z_in.at[1].set(0.0))
    assert float(jnp.max(jnp.abs(y[..., 2]))) == 0.0
    kernel = hyper_kernel(z_in.at[1].set(0.0), params["latent"], params["b0"], params["w1"],
                          params["b1"], params["w2"], params["b2"], (3, 3))
    assert float(jnp.max(jnp.abs(kernel[:, :, 1, :]))) == 0.0


def test_proximal_step_shrinks_latents_after_the_weight_step():
    lr, reg = 0.1, 0.5
    params = {"conv": {"latent": jnp.array([1.0, -0.3, 0.02, 2.0, -1.5, 0.8]),
                       "w1": jnp.ones((2, 2))},
              "few": {"latent": jnp.array([1.0, 0.001, 0.002, 1.0, 0.003, 1.0])}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
    tx = optax.chain(optax.sgd(lr), proximal_l1(lr, reg=reg, threshold=5e-3, min_channels=4))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    v = params["conv"]["latent"] - lr * 0.2
    want = np.sign(v) * np.maximum(np.abs(v) - reg * lr, 0.0)
    np.testing.assert_allclose(new["conv"]["latent"], want, rtol=1e-6, atol=1e-7)
    assert float(new["conv"]["latent"][2]) == 0.0  # driven exactly to zero
    np.testing.assert_allclose(new["conv"]["w1"], params["conv"]["w1"] - lr * 0.2)
    # Only 3 entries above the threshold (<= min_channels): the plain step, no shrink.
    np.testing.assert_allclose(new["few"]["latent"], params["few"]["latent"] - lr * 0.2,
                               rtol=1e-6)


def test_latent_masks_keep_at_least_min_channels():
    params = {"a": {"latent": jnp.array([0.5, 0.001, -0.2, 0.0, 0.004, 0.3, -0.01]),
                    "w1": jnp.ones(3)},
              "b": {"latent": jnp.array([0.001, 0.0, -0.002, 0.003, 0.0005])}}
    masks = latent_masks(params, threshold=5e-3, min_channels=4)
    np.testing.assert_array_equal(masks["a"]["latent"],
                                  [True, False, True, False, False, True, True])
    assert masks["a"]["w1"] is None
    # Every entry below the threshold: the 4 largest |z| stay.
    np.testing.assert_array_equal(masks["b"]["latent"], [True, False, True, True, True])


def _perturbed(tree, seed, scale):
    """Every leaf moved by noise: biases that are not 0, so a zero latent alone does not
    zero its kernel, and BatchNorm statistics that are not the init's."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jnp.abs(jax.random.normal(k, x.shape))
                                        for k, x in zip(keys, leaves)])


def test_finalized_plain_vgg_gives_the_hypernetwork_models_logits_and_exports_compact():
    model = DHPVGG(**SMALL_VGG)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    params = _perturbed(variables["params"], 2, 0.1)
    stats = _perturbed(variables["batch_stats"], 3, 0.5)
    # Prune channels 1 and 5 of the first conv and 0 of the last: their latents are 0.
    params["HyperConv_0"]["latent"] = params["HyperConv_0"]["latent"].at[1].set(0).at[5].set(0)
    params["HyperConv_2"]["latent"] = params["HyperConv_2"]["latent"].at[0].set(0)
    want = model.apply({"params": params, "batch_stats": stats}, x)

    plain, plain_params, plain_stats = plain_variables(model, params, stats)
    assert isinstance(plain, VGG) and set(plain_params) == {
        "Conv_0", "Conv_1", "Conv_2", "BatchNorm_0", "BatchNorm_1", "BatchNorm_2", "Dense_0"}
    assert plain_params["Conv_1"]["kernel"].shape == (3, 3, 8, 16)
    got = plain.apply({"params": plain_params, "batch_stats": plain_stats}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    groups = channel_groups(plain, plain_params, (16, 16, 3))
    kept = {"Conv_0": np.arange(8) % 4 != 1, "Conv_1": np.ones(16, bool),
            "Conv_2": np.arange(16) != 0}
    masks = groups.expand(kept, plain_params)
    compact = hf.export(lambda p, x: plain.apply({"params": p, "batch_stats": plain_stats}, x),
                        plain_params, masks, x)
    assert compact.macs == float(groups.macs(kept)) < groups.dense_macs
    np.testing.assert_allclose(compact(x), want, rtol=1e-4, atol=1e-5)


def test_dhp_search_stops_at_its_flops_target_and_then_freezes():
    model = to_dhp(VGG(**SMALL_VGG))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1])
    params, stats = variables["params"], variables["batch_stats"]
    plain, plain_params, _ = plain_variables(model, params, stats)
    groups = channel_groups(plain, plain_params, (8, 8, 3))
    target = 0.5
    tx = optax.chain(optax.sgd(0.05), dhp(groups, target, 0.05, reg=0.2))

    def loss(p, stats):
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    @jax.jit
    def step(p, s, stats):
        grads, new = jax.grad(loss, has_aux=True)(hf.apply_masks(p, s), stats)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, new["batch_stats"]

    state = tx.init(params)
    for _ in range(400):
        params, state, stats = step(params, state, stats)
        if bool(state[1].stopped):
            break
    search = state[1]
    assert bool(search.stopped), "the search never reached its target"
    kept_fraction = float(hf.structured.flops_fraction(groups, state))
    assert 1 - target - 0.05 <= kept_fraction <= 1 - target
    for g, k in search.kept.items():  # the minimum-channel rule
        assert int(np.sum(k)) >= 4, g
    # Stopped: 20 more steps change neither the masks nor, by a proximal step, the latents.
    frozen = search
    for _ in range(20):
        params, state, stats = step(params, state, stats)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), frozen.kept,
                                     state[1].kept))
    assert float(hf.structured.flops_fraction(groups, state)) == kept_fraction
    # The masked latents are exactly the pruned channels.
    effective = hf.apply_masks(params, state)
    for i in range(3):
        on = np.asarray(effective[f"HyperConv_{i}"]["latent"]) != 0
        np.testing.assert_array_equal(on, state[1].kept[f"Conv_{i}"])


def test_dhp_errors():
    with np.testing.assert_raises_regex(ValueError, "vgg19 only"):
        to_dhp(hf.models.create("resnet20", 10))
    model = DHPVGG(**SMALL_VGG)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    plain, plain_params, _ = plain_variables(model, variables["params"],
                                             variables["batch_stats"])
    groups = channel_groups(plain, plain_params, (8, 8, 3))
    with np.testing.assert_raises_regex(ValueError, "target"):
        dhp(groups, 1.5, 0.1)
    with np.testing.assert_raises_regex(ValueError, "no latent"):
        dhp(groups, 0.5, 0.1).init(plain_params)
