"""DHP's pieces against hand computations: the hypernetwork kernel, the conv built on it,
the proximal L1 step on latents and the latent channel masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hflows_jax.structured.dhp import HyperConv, hyper_kernel, latent_masks, proximal_l1


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
