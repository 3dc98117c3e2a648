"""The traced graph on constructs users' models are made of and ours are not: a causal
attention mask (a constant handed to a jitted `jnp.where`) and a bilinear resize. Both
crashed on JAX 0.10 (a removed `jax.core` name); the export must stay exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import hflows_jax as hf
from hflows_jax import graph as graph_lib
from hflows_jax.masking import multiply_masks


class CausalBlock(nn.Module):
    """A pre-norm transformer block with a causal mask, as Flax LMs write it."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Dense(16, name="embed")(tokens)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            nn.LayerNorm()(x), mask=mask)
        h = nn.gelu(nn.Dense(32, name="up")(nn.LayerNorm()(x)))
        x = x + nn.Dense(16, name="down")(h)
        return nn.Dense(5, name="head")(x)


class Upsampler(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv0")(x))
        x = jax.image.resize(x, (x.shape[0], 16, 16, x.shape[-1]), "bilinear")
        return nn.Conv(3, (3, 3), name="conv1")(x)


def _random_masks(params, seed, density=0.6):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.random(x.shape) < density if x.ndim >= 2 else None,
                        params)


def _exact(model, x, masks_of):
    params = model.init(jax.random.key(0), x)["params"]
    masks = masks_of(params)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    compact = hf.export(fn, params, masks, x)
    want = np.asarray(fn(multiply_masks(params, masks), x))
    np.testing.assert_allclose(np.asarray(compact(x)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    return compact, params, fn


def test_causal_attention_traces_and_exports_exactly():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 4)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 1)
        masks["up"]["kernel"][:, 3] = False  # MLP unit 3 reads nothing: it must go
        return masks

    compact, params, fn = _exact(CausalBlock(), x, masks_of)
    assert compact.groups["up"] == (31, 32)
    groups = hf.structured.channel_groups(fn, params, x)
    assert groups.sizes["up"] == 32
    frozen = graph_lib.trace(fn, params, x).frozen_reasons().values()
    assert any("reduced over" in why for why in frozen)  # the LayerNorms' residual stream


def test_bilinear_resize_exports_exactly():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 2)
        masks["conv1"]["kernel"][:, :, 4, :] = False  # conv0's channel 4 is read by nobody
        return masks

    compact, _, _ = _exact(Upsampler(), x, masks_of)
    assert compact.groups["conv0"] == (5, 6)
