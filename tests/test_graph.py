"""The traced graph on constructs users' models are made of and ours are not: a causal
attention mask (a constant handed to a jitted `jnp.where`) and a bilinear resize. Both
crashed on JAX 0.10 (a removed `jax.core` name); the export must stay exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hflows_jax as hf
from hflows_jax import graph as graph_lib
from hflows_jax.flops import forward_macs
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


@pytest.mark.slow
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


class EmbedLM(nn.Module):
    """Token ids through nn.Embed (a gather) into a causal block, and an embedding read
    by a dense layer alone: its features are a channel group."""

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(50, 16, name="tokens")(ids)
        side = nn.Embed(50, 8, name="side")(ids)
        x = e + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            nn.LayerNorm()(e), mask=nn.make_causal_mask(ids))
        return nn.Dense(5, name="head")(nn.LayerNorm()(x)) + nn.Dense(5, name="mix")(side)


def test_an_embedding_lookup_traces_and_its_unread_features_go():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 8)), jnp.int32)

    def masks_of(params):
        masks = _random_masks(params, 3)
        masks["mix"]["kernel"][2, :] = False  # side's feature 2 is read by nobody
        return masks

    compact, params, fn = _exact(EmbedLM(), ids, masks_of)
    assert compact.groups["side"] == (7, 8)
    assert compact.params["side/embedding"].shape == (50, 7)
    groups = hf.structured.channel_groups(fn, params, ids)
    assert groups.sizes["side"] == 8 and "tokens" not in groups.sizes  # under LayerNorm
    np.testing.assert_allclose(np.asarray(compact(jnp.concatenate([ids, ids]))[2:]),
                               np.asarray(compact(ids)), rtol=1e-6)


class NearestUpsampler(Upsampler):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv0")(x))
        x = jax.image.resize(x, (x.shape[0], 16, 16, x.shape[-1]), "nearest")
        return nn.Conv(3, (3, 3), name="conv1")(x)


def test_nearest_resize_passes_channels_through():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 4)
        masks["conv1"]["kernel"][:, :, 1, :] = False
        return masks

    compact, _, _ = _exact(NearestUpsampler(), x, masks_of)
    assert compact.groups["conv0"] == (5, 6)


class ScannedBlocks(nn.Module):
    """Blocks stacked by nn.scan (params with a leading layer axis), as Flax LMs do."""

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                y = nn.relu(nn.Dense(8, name="up")(nn.LayerNorm()(h)))
                return h + nn.Dense(h.shape[-1], name="down")(y), None

        x = nn.Dense(6, name="embed")(x)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="blocks")(x, None)
        return nn.Dense(2, name="head")(x)


def test_scanned_blocks_export_exactly_and_count_per_layer():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 3)
        masks["blocks"]["up"]["kernel"][:, :, 1] = False  # hidden unit 1 dead in every layer
        masks["blocks"]["up"]["kernel"][0, :, 4] = False  # unit 4 dead in layer 0 only
        return masks

    compact, params, fn = _exact(ScannedBlocks(), x, masks_of)
    masks = masks_of(params)
    # one group across the layers: a unit goes where it is dead in every layer
    assert [compact.params[f"blocks/up/kernel[{i}]"].shape for i in range(3)] == [(6, 7)] * 3
    layers = [line.split()[0] for line in compact.summary().splitlines()[1:]]
    layers = layers[:layers.index("total")]
    assert layers == ["embed"] + [f"blocks/{n}[{i}]" for i in range(3)
                                  for n in ("up", "down")] + ["head"]
    # multiply-adds per layer: layer i's own present weights (hand count)
    want = sum(int(np.sum(m)) for m in (masks["embed"]["kernel"], masks["head"]["kernel"],
                                        masks["blocks"]["up"]["kernel"],
                                        masks["blocks"]["down"]["kernel"]))
    assert forward_macs(fn, params, x, masks)[1] == want
    groups = hf.structured.channel_groups(fn, params, x)
    assert groups.sizes == {"blocks/up": 8}
    kept = {"blocks/up": np.arange(8) % 2 == 0}
    pruned = hf.export(fn, params, groups.expand(kept, params), x)
    assert pruned.params["blocks/down/kernel[2]"].shape == (4, 6)


def test_input_norms_of_a_scanned_stack_are_per_layer():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
    model = ScannedBlocks()
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    norms = hf.importance.input_norms(fn, params, [x])["blocks"]["up"]["kernel"]
    h = x @ params["embed"]["kernel"] + params["embed"]["bias"]  # the oracle: by hand
    for i in range(3):
        block = jax.tree.map(lambda a: a[i], params["blocks"])
        ln = nn.LayerNorm().apply({"params": block["LayerNorm_0"]}, h)
        np.testing.assert_allclose(norms[i, :, 0], np.linalg.norm(ln, axis=0), rtol=1e-5)
        y = nn.relu(ln @ block["up"]["kernel"] + block["up"]["bias"])
        h = h + y @ block["down"]["kernel"] + block["down"]["bias"]


def test_wanda_compares_each_output_unit_of_each_scanned_layer_alone():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
    model = ScannedBlocks()
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    masks = hf.prune(params, "wanda", sparsity=0.5, fn=fn, batches=[x],
                     distribution="per_output")
    up = np.asarray(masks["blocks"]["up"]["kernel"])  # (3 layers, 6 in, 8 out)
    assert (up.sum(axis=1) == 3).all(), up.sum(axis=1)  # half of each layer's unit's inputs
    scores = np.abs(np.asarray(params["blocks"]["up"]["kernel"])) * np.asarray(
        hf.importance.input_norms(fn, params, [x])["blocks"]["up"]["kernel"])
    for i in range(3):  # the oracle: the 3 highest scores of each column of layer i
        top = np.argsort(-scores[i], axis=0, kind="stable")[:3]
        want = np.zeros((6, 8), bool)
        np.put_along_axis(want, top, True, axis=0)
        np.testing.assert_array_equal(up[i], want)


def test_a_scan_with_stacked_outputs_backwards_and_a_literal_carry_exports_exactly():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)
    params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(3, 6, 6)), jnp.float32),
              "head": jnp.asarray(np.random.default_rng(5).normal(size=(18, 2)), jnp.float32)}

    def fn(p, x):
        def step(carry, w):
            h, n = carry
            h = jnp.tanh(h @ w)
            return (h, n + 1.0), h * 2.0
        (h, n), ys = jax.lax.scan(step, (x, 0.0), p["w"], reverse=True)
        return jnp.concatenate([ys[0], ys[1], h], -1) @ p["head"] + n

    masks = {"w": np.ones((3, 6, 6), bool), "head": np.ones((18, 2), bool)}
    masks["w"][2, :, 3] = False  # runs first (reverse): unit 3 of its output is dead
    compact = hf.export(fn, params, masks, x)
    want = fn(multiply_masks(params, masks), x)
    np.testing.assert_allclose(compact(x), want, rtol=1e-5, atol=1e-5)


def test_only_a_whole_leading_slice_of_a_param_is_a_layer():
    x = jnp.ones((2, 4))
    params = {"w": jnp.ones((3, 4, 4))}
    strided = graph_lib.trace(lambda p, x: x[:, :2] @ p["w"][0, ::2], params, x, strict=False)
    (c,) = strided.contractions
    assert c.layer is None
    layer = graph_lib.trace(lambda p, x: x @ p["w"][1], params, x, strict=False)
    (c,) = layer.contractions
    assert c.layer == 1 and c.param_axis(0) == 1


def test_erk_on_a_scanned_stack_is_erk_on_its_blocks_written_out():
    from hflows_jax.baselines import distributions

    rng = np.random.default_rng(6)
    stack = jnp.asarray(rng.random((3, 8, 16)), jnp.float32)
    other = jnp.asarray(rng.random((16, 4)), jnp.float32)
    stacked = distributions.masks_from_scores({"s": stack, "o": other}, 0.8, "erk",
                                              frozenset({"s"}))
    written = distributions.masks_from_scores(
        {"s0": stack[0], "s1": stack[1], "s2": stack[2], "o": other}, 0.8, "erk")
    for i in range(3):
        np.testing.assert_array_equal(stacked["s"][i], written[f"s{i}"])
    np.testing.assert_array_equal(stacked["o"], written["o"])


class LoopedBlocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)
        _, x = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1])),
                                  (0, x))  # the line to name
        return nn.Dense(2)(x)


def test_an_op_the_graph_cannot_take_names_the_users_line_and_fits_the_advice():
    x = jnp.ones((2, 4))
    model = LoopedBlocks()
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(graph_lib.GraphError) as e:
        graph_lib.trace(lambda p, x: model.apply({"params": p}, x), params, x)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1)
                if "the line to name" in text)
    assert f"test_graph.py:{line - 1}" in str(e.value), str(e.value)
    assert "write its steps out in Python" in str(e.value)


class GroupedBlock(nn.Module):
    """A ResNeXt-style bottleneck: a 1x1 conv, a 3x3 conv in 4 groups, a 1x1 conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (1, 1), name="reduce")(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=4, name="grouped")(x))
        x = nn.relu(nn.Conv(8, (1, 1), name="expand")(x))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def test_a_grouped_conv_loses_the_same_channels_in_every_group():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 5, density=0.9)
        masks["grouped"]["kernel"][:, :, 1, :] = False  # input channel 1 of every group
        masks["expand"]["kernel"][:, :, 2::4, :] = False  # output channel 2 of every group
        return masks

    compact, params, fn = _exact(GroupedBlock(), x, masks_of)
    kernel = compact.params["grouped/kernel"]
    assert kernel.shape == (3, 3, 3, 12), kernel.shape  # 4 groups of 3 in, 4 of 3 out
    assert compact.params["reduce/kernel"].shape[-1] == 12
    groups = hf.structured.channel_groups(fn, params, x)
    assert sorted(groups.sizes.values()) == [4, 4, 8]  # per group alike; expand's 8


class GroupNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), name="c0")(x)
        x = nn.relu(nn.GroupNorm(num_groups=4)(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def test_a_groupnorm_loses_whole_groups():
    """GroupNorm normalizes within each group of 4 channels: a group unread after it goes
    whole (the conv before it loses 4 filters); a single channel of it stays."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)

    def masks_of(params):
        masks = _random_masks(params, 6, density=0.9)
        masks["c1"]["kernel"][:, :, 8:12, :] = False  # group 2, whole
        masks["c1"]["kernel"][:, :, 1, :] = False  # one channel of group 0: it stays
        return masks

    compact, params, fn = _exact(GroupNormNet(), x, masks_of)
    assert compact.params["c0/kernel"].shape[-1] == 12
    assert hf.structured.channel_groups(fn, params, x).sizes["c0"] == 4
