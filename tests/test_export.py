"""hf.export: the compact model computes the masked model's logits (eval mode) with dead units
and channels removed, BatchNorm folded, constants of dead channels folded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hflows_jax import models
from hflows_jax.family_export import BCSR_CUSTOM_CALL, BCSR_MIN_BATCH, NO_MASKS, export
from hflows_jax.masking import multiply_masks
from hflows_jax.flops import forward_macs


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _setup(name, image_shape, seed=0, **kwargs):
    """A model with random biases, BatchNorm params and running stats, and 70 % random masks."""
    model = models.create(name, 10, **kwargs)
    variables = model.init(jax.random.key(seed), jnp.zeros((1,) + image_shape))
    rng = np.random.default_rng(seed)

    def randomize(path, x):
        leaf = path[-1].key
        x = np.asarray(x, np.float32)
        if leaf == "bias":
            return rng.normal(0.0, 0.3, x.shape).astype(np.float32)
        if leaf == "scale":
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if leaf == "mean":
            return rng.normal(0.0, 0.3, x.shape).astype(np.float32)
        if leaf == "var":
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return x.copy()

    params = jax.tree.map_with_path(randomize, variables["params"])
    stats = jax.tree.map_with_path(randomize, variables.get("batch_stats", {}))
    masks = jax.tree.map(lambda x: rng.random(x.shape) < 0.7 if x.ndim >= 2 else None, params)
    images = rng.normal(size=(4,) + image_shape).astype(np.float32)
    return model, params, stats, masks, images


def _masked_logits(model, params, stats, masks, images):
    variables = {"params": multiply_masks(params, masks)}
    if stats:
        variables["batch_stats"] = stats
    return np.asarray(model.apply(variables, images, train=False))


def _assert_same_logits(compact, model, params, stats, masks, images):
    want = _masked_logits(model, params, stats, masks, images)
    got = np.asarray(compact.apply(images))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _set_bn_constant(params, stats, bn, channel, beta, mean=0.0):
    """BatchNorm behind a dead conv channel: it outputs beta - mean * scale / sqrt(var + eps)."""
    _get(params, bn)["bias"][channel] = beta
    _get(stats, bn)["mean"][channel] = mean


def _check_counts(compact, model, params, stats, masks, image_shape):
    counts = compact.counts
    assert counts.params_total == sum(np.size(x) for x in jax.tree.leaves(params))
    assert counts.params_total == sum(r.params_total for r in counts.layers)
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    macs = forward_macs(model, variables, image_shape, masks)
    assert (counts.macs_total, counts.macs_nonzero) == macs
    # Every float array the compact model stores, but a dense kernel kept beside its BCSR one.
    stored = {key: {k: v for k, v in a.items() if not (k == "kernel" and "sparse" in a)}
              for key, a in compact.arrays.items() if isinstance(a, dict)}
    assert counts.params_compact == sum(int(x.size) for x in jax.tree.leaves(stored)
                                        if jnp.issubdtype(x.dtype, jnp.floating))


def test_lenet300_dead_units_chains_and_pixels():
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    base = export(model, params, masks, image_shape=(28, 28, 1))
    m0, m1, m2 = (masks[f"Dense_{i}"]["kernel"] for i in range(3))
    m0[:, [3, 7]] = False  # incoming dead: constant relu(bias), folded into Dense_1's bias
    params["Dense_0"]["bias"][[3, 7]] = [0.5, 0.8]
    m1[11, :] = False  # outgoing dead
    m2[5, :] = False  # Dense_1 unit 5 unread ...
    m1[20, :] = False
    m1[20, 5] = True  # ... so Dense_0 unit 20, which only feeds it, dies too
    m1[:, 6] = False  # Dense_1 unit 6 incoming dead, constant folded into the logits' bias
    params["Dense_1"]["bias"][6] = 0.7
    m1[:, 8] = False
    m1[[3, 7], 8] = True  # Dense_1 unit 8 reads only constant units: constant too
    params["Dense_1"]["bias"][8] = 0.2
    m0[:28, :] = False  # the first row of pixels is read by nothing
    compact = export(model, params, masks, image_shape=(28, 28, 1))

    _assert_same_logits(compact, model, params, stats, masks, images)
    layers = {r.name: r for r in compact.counts.layers}
    assert layers["Dense_0"].outputs == (296, 300) and layers["Dense_0"].rows == (756, 784)
    assert layers["Dense_1"].outputs == (97, 100) and layers["Dense_2"].inputs == (97, 100)
    assert compact.channels["Dense_0"].constant == 2 and compact.channels["Dense_1"].constant == 2
    assert compact.counts.params_compact == (756 * 296 + 296) + (296 * 97 + 97) + (97 * 10 + 10)
    assert compact.counts.macs_compact == 756 * 296 + 296 * 97 + 97 * 10
    assert base.counts.params_compact == (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    _check_counts(compact, model, params, stats, masks, (28, 28, 1))
    assert not any(r.bcsr for r in compact.counts.layers)  # 70 % dense: no BCSR by default

    sparse = export(model, params, masks, image_shape=(28, 28, 1), bcsr=True)
    _assert_same_logits(sparse, model, params, stats, masks, images)
    assert all(r.bcsr for r in sparse.counts.layers)
    nonzero = sum(int(np.count_nonzero(compact.arrays[f"Dense_{i}"]["kernel"])) for i in range(3))
    assert sparse.counts.params_compact == nonzero + 296 + 97 + 10
    assert sparse.counts.macs_compact == nonzero
    assert all("kernel" not in sparse.arrays[f"Dense_{i}"] for i in range(3))


def test_lenet300_bcsr_from_a_batch_size_on():
    """bcsr=None on CPU: a layer 3 % dense runs as BCSR from BCSR_MIN_BATCH images on,
    in-process (static batch) and through jax.export (one lax.cond on the symbolic batch)."""
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    rng = np.random.default_rng(1)
    masks["Dense_0"]["kernel"] = rng.random((784, 300)) < 0.03
    compact = export(model, params, masks, image_shape=(28, 28, 1))
    assert [r.bcsr for r in compact.counts.layers] == [True, False, False]
    _check_counts(compact, model, params, stats, masks, (28, 28, 1))
    (b,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(
        jax.jit(lambda x: compact.forward(compact.arrays, x)),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(BCSR_CUSTOM_CALL)])(
        jax.ShapeDtypeStruct((b, 28, 28, 1), jnp.float32))
    served = jax.export.deserialize(exported.serialize())
    batch = rng.normal(size=(BCSR_MIN_BATCH, 28, 28, 1)).astype(np.float32)
    lowered = {n: jax.jit(compact.forward).lower(compact.arrays, batch[:n]).as_text()
               for n in (1, BCSR_MIN_BATCH)}
    assert BCSR_CUSTOM_CALL not in lowered[1] and BCSR_CUSTOM_CALL in lowered[BCSR_MIN_BATCH]
    for n in (1, BCSR_MIN_BATCH - 1, BCSR_MIN_BATCH):
        _assert_same_logits(compact, model, params, stats, masks, batch[:n])
        want = _masked_logits(model, params, stats, masks, batch[:n])
        np.testing.assert_allclose(served.call(batch[:n]), want,
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_lenet5_constant_through_pool_and_flatten():
    model, params, stats, masks, images = _setup("lenet5", (28, 28, 1), seed=1)
    masks["Conv_0"]["kernel"][..., 2] = False  # constant relu(0.4): max-pool, VALID conv: folded
    params["Conv_0"]["bias"][2] = 0.4
    masks["Conv_1"]["kernel"][:, :, 4, :] = False  # Conv_0 filter 4 unread
    dense0 = masks["Dense_0"]["kernel"].reshape(4, 4, 16, 120)  # a view: (h, w, channel) rows
    dense0[:, :, 9, :] = False  # Conv_1 filter 9 unread after the flatten
    masks["Conv_1"]["kernel"][..., 12] = False  # constant relu(0.3), folded through the flatten
    params["Conv_1"]["bias"][12] = 0.3
    dense0[0, 0, 1, :] = False  # one flattened input of a live channel
    compact = export(model, params, masks, image_shape=(28, 28, 1))

    _assert_same_logits(compact, model, params, stats, masks, images)
    layers = {r.name: r for r in compact.counts.layers}
    assert layers["Conv_0"].outputs == (4, 6) and layers["Conv_1"].inputs == (4, 6)
    assert layers["Conv_1"].outputs == (14, 16)
    assert layers["Dense_0"].rows == (4 * 4 * 14 - 1, 256)
    assert compact.arrays["Conv_1"]["kernel"].shape == (5, 5, 4, 14)
    assert compact.counts.macs_compact == (25 * 4 * 576 + 25 * 4 * 14 * 64 + 223 * 120 + 120 * 84
                                           + 84 * 10)
    _check_counts(compact, model, params, stats, masks, (28, 28, 1))


def test_vgg_dead_channels_behind_batchnorm():
    shape = (32, 32, 3)
    model, params, stats, masks, images = _setup("vgg19", shape, seed=2, width=0.125)
    base = export(model, params, masks, stats, image_shape=shape)
    masks["Conv_2"]["kernel"][..., 1] = False  # constant 1 - 0.2 g > 0, read by a padded 3x3 conv
    params["BatchNorm_2"]["scale"][1], stats["BatchNorm_2"]["var"][1] = 1.0, 1.0
    _set_bn_constant(params, stats, "BatchNorm_2", 1, beta=1.0, mean=0.2)
    masks["Conv_13"]["kernel"][..., 5] = False  # the same at 2x2, where every position is a border
    _set_bn_constant(params, stats, "BatchNorm_13", 5, beta=1.0)
    masks["Conv_15"]["kernel"][..., 3] = False  # constant, through the global pool into Dense_0
    _set_bn_constant(params, stats, "BatchNorm_15", 3, beta=1.0)
    masks["Conv_9"]["kernel"][..., 2] = False  # constant relu(-1) = 0
    _set_bn_constant(params, stats, "BatchNorm_9", 2, beta=-1.0)
    masks["Conv_6"]["kernel"][:, :, 0, :] = False  # Conv_5 filter 0 unread
    want = _masked_logits(model, params, stats, masks, images)
    keep = export(model, params, masks, stats, image_shape=shape)
    bias_map = export(model, params, masks, stats, image_shape=shape, border="map")

    for compact in (keep, bias_map):
        _assert_same_logits(compact, model, params, stats, masks, images)
        assert compact.channels["Conv_15"].kept == 63 and compact.channels["Conv_15"].constant == 1
        assert compact.channels["Conv_9"].kept == 63
        assert compact.channels["Conv_5"].kept == 31 and compact.channels["Conv_6"].kept == 32
        assert compact.counts.params_compact < base.counts.params_compact
        assert compact.counts.macs_compact < base.counts.macs_compact
    # The border: "keep" keeps the constant channel, "map" folds it into a per-position bias.
    for conv, read_by, hw, kept in (("Conv_2", "Conv_3", 16, 16), ("Conv_13", "Conv_14", 2, 64)):
        assert keep.channels[conv].kept == kept and keep.channels[conv].constant == 1
        assert "border" not in keep.arrays[read_by]
        assert bias_map.channels[conv].kept == kept - 1
        border = bias_map.arrays[read_by]["border"]
        assert border.shape == (3, 3, kept)
        # ... and that bias is not spatially constant: a per-channel fold would be wrong.
        per_position = np.asarray(jax.lax.conv_general_dilated(
            jnp.ones((1, hw, hw, 1)), border[:, :, None, :], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")))[0]
        assert np.abs(per_position - border.sum(axis=(0, 1))).max() > 1e-2
    assert bias_map.counts.macs_compact < keep.counts.macs_compact
    assert np.isfinite(want).all()
    _check_counts(keep, model, params, stats, masks, shape)


def test_resnet20_residual_channels():
    shape = (16, 16, 3)
    model, params, stats, masks, images = _setup("resnet20", shape, seed=3, width=0.25,
                                                 zero_init_residual=False)
    block = lambda i: f"ResNetBlock_{i}"  # noqa: E731
    kernel = lambda path: _get(masks, path)["kernel"]  # noqa: E731
    base = export(model, params, masks, stats, image_shape=shape)
    # (a) Stage-0 stream channel 1: every writer constant (stem and each block's Conv_1), no
    # 3x3 conv reads it; block 3's 1x1 projection does, exactly: removed from the whole stage.
    kernel("conv_init")[..., 1] = False
    _set_bn_constant(params, stats, "bn_init", 1, beta=0.8)
    for i in range(3):
        kernel(f"{block(i)}/Conv_1")[..., 1] = False
        kernel(f"{block(i)}/Conv_0")[:, :, 1, :] = False
    kernel(f"{block(3)}/Conv_0")[:, :, 1, :] = False
    # (b) Stage-1 channel 2: constant out of block 3 (both its writers dead), written again by
    # block 4's Conv_1: block 4's sum keeps it, so block 3's writers compute the constant.
    kernel(f"{block(3)}/Conv_1")[..., 2] = False
    kernel(f"{block(3)}/conv_proj")[..., 2] = False
    _set_bn_constant(params, stats, f"{block(3)}/norm_proj", 2, beta=0.9)
    kernel(f"{block(4)}/Conv_0")[:, :, 2, :] = False
    # (c) Stage-2 channel 5: read by nothing (Dense_0 and the later blocks' Conv_0 skip it).
    masks["Dense_0"]["kernel"][5, :] = False
    for i in (7, 8):
        kernel(f"{block(i)}/Conv_0")[:, :, 5, :] = False
    # (d) A constant channel inside block 4, read by its padded Conv_1.
    kernel(f"{block(4)}/Conv_0")[..., 3] = False
    _set_bn_constant(params, stats, f"{block(4)}/BatchNorm_0", 3, beta=0.6)

    keep = export(model, params, masks, stats, image_shape=shape)
    bias_map = export(model, params, masks, stats, image_shape=shape, border="map")
    for compact in (keep, bias_map):
        _assert_same_logits(compact, model, params, stats, masks, images)
        ch = compact.channels
        for t in ("stem", block(0), block(1), block(2)):  # (a)
            assert (ch[t].kept, ch[t].constant, ch[t].total) == (3, 1, 4), t
        layers = {r.name: r for r in compact.counts.layers}
        assert layers[f"{block(3)}/conv_proj"].inputs == (3, 4)  # (a) folded into its bias
        assert layers[f"{block(3)}/Conv_0"].inputs == (3, 4)
        assert (ch[block(3)].kept, ch[block(3)].constant) == (8, 1)  # (b)
        assert ch[f"{block(3)}/z"].kept == 8 and ch[f"{block(3)}/proj"].kept == 8
        assert ch[block(4)].kept == 8 and ch[block(4)].constant == 0
        assert not compact.arrays[block(4)]  # no channel picked at block 4's addition
        for i in (6, 7, 8):  # (c)
            assert ch[block(i)].kept == 15 and ch[f"{block(i)}/z"].kept == 15
        assert compact.counts.params_compact < base.counts.params_compact
    assert keep.channels[f"{block(4)}/conv0"].kept == 8  # (d)
    assert bias_map.channels[f"{block(4)}/conv0"].kept == 7
    layers = {r.name: r for r in keep.counts.layers}
    assert layers[f"{block(8)}/Conv_1"].outputs == (15, 16)
    assert layers["Dense_0"].inputs == (15, 16)
    _check_counts(keep, model, params, stats, masks, shape)


def test_errors():
    model, params, stats, masks, _ = _setup("lenet300", (28, 28, 1))
    with pytest.raises(ValueError, match=NO_MASKS):
        export(model, params, None, image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="dense-only"):
        export(model, params, jax.tree.map(lambda x: None, params), image_shape=(28, 28, 1))
    narrow = models.create("lenet300", 10, width=0.5)
    with pytest.raises(ValueError, match="do not match the model LeNet300"):
        export(narrow, params, masks, image_shape=(28, 28, 1))
    masks["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"][:, :50]
    with pytest.raises(ValueError, match="shape"):
        export(model, params, masks, image_shape=(28, 28, 1))
    vgg, vgg_params, vgg_stats, vgg_masks, _ = _setup("vgg19", (32, 32, 3), width=0.125)
    with pytest.raises(ValueError, match="batch_stats do not match"):
        export(vgg, vgg_params, vgg_masks, None, image_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="border"):
        export(vgg, vgg_params, vgg_masks, vgg_stats, image_shape=(32, 32, 3), border="zero")
