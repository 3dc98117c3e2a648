"""hf.export on our four families: the compact model computes the masked model's logits (eval
mode) with dead units and channels removed and constants of dead channels folded forward;
its shapes and multiply-adds against hand counts (the per-family exporter's, unchanged)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hflows_jax import compact as compact_lib
from hflows_jax import models
from hflows_jax.compact import BCSR_CUSTOM_CALL, BCSR_MIN_BATCH, NO_MASKS, export
from hflows_jax.masking import multiply_masks


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


def _export(model, params, masks, stats, images, **kwargs):
    """hf.export of a linen model of ours in eval mode, its statistics closed over."""
    rest = {"batch_stats": stats} if stats else {}
    return export(lambda p, x: model.apply({"params": p, **rest}, x, train=False), params,
                  masks, images, **kwargs)


def _assert_same_logits(compact, model, params, stats, masks, images):
    want = _masked_logits(model, params, stats, masks, images)
    got = np.asarray(compact(images))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _set_bn_constant(params, stats, bn, channel, beta, mean=0.0):
    """BatchNorm behind a dead conv channel: it outputs beta - mean * scale / sqrt(var + eps)."""
    _get(params, bn)["bias"][channel] = beta
    _get(stats, bn)["mean"][channel] = mean


def _layers(compact):
    return {r.name: r for r in compact.layers}


@pytest.mark.slow
def test_lenet300_dead_units_chains_and_pixels():
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    m0, m1, m2 = (masks[f"Dense_{i}"]["kernel"] for i in range(3))
    m0[:, [3, 7]] = False  # incoming dead: constant relu(bias), folded into Dense_1
    params["Dense_0"]["bias"][[3, 7]] = [0.5, 0.8]
    m1[11, :] = False  # outgoing dead
    m2[5, :] = False  # Dense_1 unit 5 unread ...
    m1[20, :] = False
    m1[20, 5] = True  # ... so Dense_0 unit 20, which only feeds it, dies too
    m1[:, 6] = False  # Dense_1 unit 6 incoming dead, constant folded into the logits
    params["Dense_1"]["bias"][6] = 0.7
    m1[:, 8] = False
    m1[[3, 7], 8] = True  # Dense_1 unit 8 reads only constant units: constant too
    params["Dense_1"]["bias"][8] = 0.2
    m0[:28, :] = False  # the first row of pixels is read by nothing
    compact = _export(model, params, masks, stats, images)

    _assert_same_logits(compact, model, params, stats, masks, images)
    assert compact.groups == {"Dense_0": (296, 300), "Dense_1": (97, 100)}
    assert compact.params["Dense_0/kernel/rows"].shape == (756,)
    assert compact.macs == 756 * 296 + 296 * 97 + 97 * 10
    assert compact.dense_macs == 784 * 300 + 300 * 100 + 100 * 10
    assert compact.masked_macs == sum(int(m.sum()) for m in (m0, m1, m2))
    # The constants' contributions to Dense_1 and the logits are added to their biases.
    assert compact.params_compact == (756 * 296 + 296) + (296 * 97 + 97) + (97 * 10 + 10)
    assert compact.params_dense == 266_610  # no arrays closed over
    assert compact.params_nonzero == sum(int(m.sum()) for m in (m0, m1, m2)) + 300 + 100 + 10
    assert not any(r.bcsr for r in compact.layers)  # 70 % dense: no BCSR by default

    sparse = _export(model, params, masks, stats, images, bcsr=True)
    _assert_same_logits(sparse, model, params, stats, masks, images)
    assert all(r.bcsr for r in sparse.layers)
    nonzero = sum(int(np.count_nonzero(compact.params[k]))
                  for k in ("Dense_0/kernel/read", "Dense_1/kernel", "Dense_2/kernel"))
    folded = 97 + 10  # BCSR layers keep the constants' contributions apart from the biases
    assert sparse.params_compact == nonzero + 296 + 97 + 10 + folded
    assert sparse.macs == nonzero
    assert "Dense_1/kernel" not in sparse.params  # only its BCSR matrix is stored


@pytest.mark.slow
def test_lenet300_bcsr_from_a_batch_size_on():
    """bcsr=None on CPU: a layer 3 % dense runs as BCSR from BCSR_MIN_BATCH images on,
    in-process (static batch) and through jax.export (one lax.cond on the symbolic batch)."""
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    rng = np.random.default_rng(1)
    masks["Dense_0"]["kernel"] = rng.random((784, 300)) < 0.03
    compact = _export(model, params, masks, stats, images)
    assert [r.bcsr for r in compact.layers] == [True, False, False]
    served = jax.export.deserialize(compact.exported().serialize())
    batch = rng.normal(size=(BCSR_MIN_BATCH, 28, 28, 1)).astype(np.float32)
    lowered = {n: jax.jit(compact.forward).lower(compact.params, batch[:n]).as_text()
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
    compact = _export(model, params, masks, stats, images)

    _assert_same_logits(compact, model, params, stats, masks, images)
    assert compact.groups["Conv_0"] == (4, 6) and compact.groups["Conv_1"] == (14, 16)
    assert compact.params["Dense_0/kernel/rows"].shape == (4 * 4 * 14 - 1,)
    assert compact.params["Conv_1/kernel"].shape == (5, 5, 4, 14)
    assert compact.macs == (25 * 4 * 576 + 25 * 4 * 14 * 64 + 223 * 120 + 120 * 84 + 84 * 10)


def _is_uniform(delta):
    return np.abs(delta - delta[:, :1, :1, :]).max() < 1e-6 * np.abs(delta).max()


@pytest.mark.slow
def test_vgg_dead_channels_behind_batchnorm():
    shape = (32, 32, 3)
    model, params, stats, masks, images = _setup("vgg19", shape, seed=2, width=0.125)
    base = _export(model, params, masks, stats, images)
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
    keep = _export(model, params, masks, stats, images)
    bias_map = _export(model, params, masks, stats, images, border="map")

    for compact in (keep, bias_map):
        _assert_same_logits(compact, model, params, stats, masks, images)
        for conv, kept in (("Conv_15", 63), ("Conv_9", 63), ("Conv_5", 31), ("Conv_6", 32)):
            assert compact.groups[conv] == (kept, 64 if int(conv[5:]) >= 8 else 32), conv
        assert compact.macs < base.macs
        stats_entries = sum(int(np.size(a)) for a in jax.tree.leaves(stats))
        assert compact.params_dense == stats_entries + sum(
            int(np.size(p)) for p in jax.tree.leaves(params))  # BatchNorm statistics too
    assert keep.params_compact < base.params_compact  # "map" stores H x W x C maps instead
    # The border: "keep" keeps the constant channel, "map" adds its exact per-position
    # contribution to the padded conv that reads it, which is not spatially uniform.
    for conv, hw, total in (("Conv_2", 16, 16), ("Conv_13", 2, 64)):
        assert keep.groups[conv] == (total, total)
        assert bias_map.groups[conv] == (total - 1, total)
    maps = [a for k, a in bias_map.params.items() if k.startswith("delta/") and a.ndim == 4]
    assert sorted(a.shape[1] for a in maps if not _is_uniform(np.asarray(a))) == [2, 16]
    assert bias_map.macs < keep.macs
    assert np.isfinite(want).all()


@pytest.mark.slow
def test_resnet20_residual_channels():
    shape = (16, 16, 3)
    model, params, stats, masks, images = _setup("resnet20", shape, seed=3, width=0.25,
                                                 zero_init_residual=False)
    block = lambda i: f"ResNetBlock_{i}"  # noqa: E731
    kernel = lambda path: _get(masks, path)["kernel"]  # noqa: E731
    # (a) Stage-0 stream channel 1: every writer constant (stem and each block's Conv_1), no
    # 3x3 conv reads it; block 3's 1x1 projection does, exactly: removed from the whole stage.
    kernel("conv_init")[..., 1] = False
    _set_bn_constant(params, stats, "bn_init", 1, beta=0.8)
    for i in range(3):
        kernel(f"{block(i)}/Conv_1")[..., 1] = False
        kernel(f"{block(i)}/Conv_0")[:, :, 1, :] = False
    kernel(f"{block(3)}/Conv_0")[:, :, 1, :] = False
    # (b) Stage-1 channel 2: constant out of block 3 (both its writers dead), written again by
    # block 4's Conv_1: the stream keeps it, so block 3's writers compute the constant.
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

    keep = _export(model, params, masks, stats, images)
    bias_map = _export(model, params, masks, stats, images, border="map")
    for compact in (keep, bias_map):
        _assert_same_logits(compact, model, params, stats, masks, images)
        streams = {n: k for n, k in compact.groups.items()
                   if n in ("conv_init", f"{block(3)}/Conv_1", f"{block(6)}/Conv_1")}
        assert streams == {"conv_init": (3, 4), f"{block(3)}/Conv_1": (8, 8),  # (a), (b)
                           f"{block(6)}/Conv_1": (15, 16)}  # (c)
        assert compact.params[f"{block(3)}/conv_proj/kernel"].shape == (1, 1, 3, 8)
        assert compact.params["Dense_0/kernel"].shape == (15, 10)
    assert keep.groups[f"{block(4)}/Conv_0"] == (8, 8)  # (d)
    assert bias_map.groups[f"{block(4)}/Conv_0"] == (7, 8)


def test_errors():
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    with pytest.raises(ValueError, match=NO_MASKS):
        _export(model, params, None, stats, images)
    with pytest.raises(ValueError, match="dense-only"):
        _export(model, params, jax.tree.map(lambda x: None, params), stats, images)
    narrow = models.create("lenet300", 10, width=0.5)
    with pytest.raises(ValueError, match="fn.*failed while tracing"):
        _export(narrow, params, masks, stats, images)
    bad = jax.tree.map(lambda m: m, masks)
    bad["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"][:, :50]
    with pytest.raises(ValueError, match="Dense_1/kernel has shape"):
        _export(model, params, bad, stats, images)
    del bad["Dense_1"]
    with pytest.raises(ValueError, match="no mask for Dense_1/kernel"):
        _export(model, params, bad, stats, images)
    with pytest.raises(ValueError, match="border"):
        _export(model, params, masks, stats, images, border="zero")


@pytest.mark.slow
def test_tune_serves_the_measured_fastest_program_per_batch(monkeypatch):
    """export(tune=...) times every program at each batch size and routes each size to the
    fastest; the timings are fixed here (dense wins at 1, BCSR at 64) to see the routes
    run those programs, in-process and served, exactly."""
    model, params, stats, masks, images = _setup("lenet300", (28, 28, 1))
    rng = np.random.default_rng(1)
    masks["Dense_0"]["kernel"] = rng.random((784, 300)) < 0.03
    faked = {1: {"dense": 1.0, "compact": 2.0, "compact+bcsr": 3.0},
             64: {"dense": 3.0, "compact": 2.0, "compact+bcsr": 1.0}}
    seen = []

    def median_ms(calls, repeats, budget_s):
        seen.append(sorted(calls))
        return faked[len(seen) == 1 and 1 or 64]

    monkeypatch.setattr(compact_lib, "median_ms", median_ms)
    compact = _export(model, params, masks, stats, images, tune=(64, 1))
    assert seen == [["compact", "compact+bcsr", "dense"]] * 2  # no groups: nothing padded
    assert [r.name for r in compact.routes] == ["dense", "compact+bcsr"]
    assert [r.batch for r in compact.routes] == [0, 64] and compact.timings == faked
    batch = rng.normal(size=(65, 28, 28, 1)).astype(np.float32)
    hlo = {n: jax.jit(compact.forward).lower(compact.params, batch[:n]).as_text()
           for n in (1, 64)}
    assert "784x300" in hlo[1] and BCSR_CUSTOM_CALL not in hlo[1]  # the dense kernel
    assert BCSR_CUSTOM_CALL in hlo[64]
    served = jax.export.deserialize(compact.exported().serialize())
    for n in (1, 63, 64, 65):
        want = _masked_logits(model, params, stats, masks, batch[:n])
        for got in (compact(batch[:n]), served.call(batch[:n])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_tune_measures_padded_channels_and_rejects_bad_sizes():
    model, params, stats, masks, images = _setup("lenet5", (28, 28, 1))
    masks["Conv_0"]["kernel"][..., :3] = False  # 3 of Conv_0's 6 channels stay
    compact = _export(model, params, masks, stats, images, tune=(2,))
    assert {name.split("+")[0] for name in compact.timings[2]} == {"compact", "padded",
                                                                   "dense"}
    (route,) = compact.routes
    assert route.name == min(compact.timings[2], key=compact.timings[2].get)
    _assert_same_logits(compact, model, params, stats, masks, images)
    for bad in (4, (), (0,), (2.5,)):
        with pytest.raises(ValueError, match="tune"):
            _export(model, params, masks, stats, images, tune=bad)


@pytest.mark.parametrize("dn, lhs, rhs, strides, padding, lhs_dilation, rhs_dilation", [
    (("NHWC", "HWIO", "NHWC"), (2, 7, 6, 5), (3, 3, 5, 4), (1, 1), "SAME", (1, 1), (1, 1)),
    (("NCHW", "OIHW", "NCHW"), (2, 5, 9, 8), (4, 5, 3, 2), (2, 1), ((1, 0), (2, 1)), (1, 1),
     (2, 1)),
    (("NHWC", "HWIO", "NHWC"), (1, 4, 4, 3), (3, 3, 3, 2), (1, 1), ((1, 1), (2, 1)), (2, 2),
     (1, 1)),
])
def test_conv_as_matmul_is_the_conv(dn, lhs, rhs, strides, padding, lhs_dilation,
                                    rhs_dilation):
    rng = np.random.default_rng(0)
    x, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs, rhs))

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers=dn)

    (eqn,) = jax.make_jaxpr(conv)(x, k).eqns
    want = np.asarray(conv(x, k))
    np.testing.assert_allclose(compact_lib.conv_as_matmul(x, k, **eqn.params), want,
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_tune_runs_the_convs_measured_faster_as_matmuls(monkeypatch):
    """Each conv is timed alone as a conv and as a matmul of its patches; the route runs
    the faster (fixed timings here: the matmuls) and stays exact, served too."""
    model, params, stats, masks, images = _setup("lenet5", (28, 28, 1))

    def median_ms(calls, repeats, budget_s):
        if set(calls) == {"conv", "matmul"}:
            return {"conv": 2.0, "matmul": 1.0}
        return {name: 0.0 if name.startswith("compact+im2col") else 1.0 for name in calls}

    monkeypatch.setattr(compact_lib, "median_ms", median_ms)
    compact = _export(model, params, masks, stats, images, tune=(4,))
    (route,) = compact.routes
    assert route.name == "compact+im2col(2)"  # LeNet-5's two convs
    as_convs = dataclasses.replace(compact, routes=(dataclasses.replace(route, im2col=()),))
    dots = [jax.jit(c.forward).lower(c.params, images).as_text().count("dot_general")
            for c in (compact, as_convs)]
    assert dots[0] == dots[1] + 2  # (the patches are a convolution with a one-hot kernel)
    _assert_same_logits(compact, model, params, stats, masks, images)
    served = jax.export.deserialize(compact.exported().serialize())
    want = _masked_logits(model, params, stats, masks, images[:3])
    np.testing.assert_allclose(served.call(images[:3]), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_batchnorm_and_biases_fold_into_the_layers_before_them():
    """Inference BatchNorm (sub, mul, add of stored per-channel arrays) and a layer's bias
    leave no step of their own: the kernel is scaled and one bias added to the layer's
    output. A conv whose output something else reads as well keeps its BatchNorm steps.
    The oracle is the model itself."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(16, (3, 3))(x)))
            y = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True)(y)) + y  # y read twice
            return nn.Dense(10)(x.mean((1, 2)))

    model = Net()
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                          for a, k in zip(leaves, keys)])
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    masks = jax.tree.map(lambda a: jnp.ones(a.shape, bool), variables)
    fn = lambda v, x: model.apply(v, x)  # noqa: E731
    compact = export(fn, variables, masks, jnp.ones((2, 8, 8, 3)))
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    want = fn(variables, x)
    np.testing.assert_allclose(compact(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    steps = [s.eqn.name for s in compact.programs["compact"][:-1]]
    assert steps.count("sub") == 1 and steps.count("mul") == 1  # the second BatchNorm's
    assert steps[:2] == ["conv_general_dilated", "max"]  # bias and BatchNorm folded
    scale = (variables["params"]["BatchNorm_0"]["scale"]
             / jnp.sqrt(variables["batch_stats"]["BatchNorm_0"]["var"] + 1e-5))
    np.testing.assert_allclose(compact.params["params/Conv_0/kernel"],
                               variables["params"]["Conv_0"]["kernel"] * scale, rtol=1e-5)
