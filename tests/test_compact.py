"""hf.export and the traced graph on models we did not write (the Flax examples' CNNs, a
MobileNet-V2 block, a small ViT): the compact model computes the masked model's outputs
(eval mode), its multiply-adds equal a hand count, and an op the graph cannot take is a
clear error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hflows_jax as hf
from experiments.user_loops.linen_mnist import CNN as LinenMnistCNN  # the Flax example's
from hflows_jax import models
from hflows_jax.flops import forward_macs
from hflows_jax.graph import GraphError
from hflows_jax.masking import multiply_masks


def _dense_masks(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool) if p.ndim >= 2 else None, params)


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_linen_mnist_cnn_drops_filters_and_units_by_hand_count():
    model = LinenMnistCNN()
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    params = jax.tree.map(np.array, model.init(jax.random.key(0), x)["params"])
    masks = _dense_masks(params)
    masks["Conv_0"]["kernel"][..., :20] = False  # 20 of 32 filters: zero bias -> exactly 0
    params["Conv_0"]["bias"][:20] = 0.0
    masks["Dense_0"]["kernel"][:, :200] = False  # 200 of 256 units: relu(bias) constants
    params["Dense_0"]["bias"][:] = np.linspace(-1, 1, 256)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

    compact = hf.export(fn, params, masks, x)
    _assert_close(compact(x), fn(multiply_masks(params, masks), x))
    x7 = jax.random.normal(jax.random.key(2), (7, 28, 28, 1))  # another batch size
    _assert_close(compact(x7), fn(multiply_masks(params, masks), x7))
    assert compact.dense_macs == (28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 3136 * 256
                                  + 256 * 10)
    assert compact.macs == (28 * 28 * 12 * 9 + 14 * 14 * 64 * 9 * 12 + 3136 * 56 + 56 * 10)
    assert compact.params["Conv_0/kernel"].shape == (3, 3, 1, 12)
    assert compact.params["Dense_1/kernel"].shape == (56, 10)


class NnxCNN(nnx.Module):
    """The NNX MNIST tutorial's CNN, with a BatchNorm and Dropout."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(7 * 7 * 16, 32, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        pool = lambda y: nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))  # noqa: E731
        x = pool(nnx.relu(self.bn1(self.conv1(x))))
        x = pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.linear1(x)))
        return self.linear2(x)


@pytest.mark.slow
def test_nnx_cnn_with_batchnorm_and_dropout():
    model = NnxCNN(nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    rest = jax.tree.map(lambda a: a + rng.uniform(0.1, 0.5, a.shape).astype(a.dtype)
                        if a.dtype == jnp.float32 else a, rest)  # nonzero running stats
    masks = jax.tree.map(lambda p: np.ones(p.shape, bool) if p.ndim >= 2 else None,
                         hf.masking.unwrap_nnx(params))  # an nnx.State, as hf.masks gives
    masks["conv1"]["kernel"][..., :3] = False  # 3 of 8 filters: constants after BatchNorm,
    mean = rest["bn1"]["mean"]  # positive ones (running mean -1, zero bias), and 0 for ...
    mean.set_value(mean.get_value().at[:3].set(-1.0).at[3].set(1.0))
    masks["conv1"]["kernel"][..., 3] = False  # ... one more (mean +1: relu(negative))
    masks["linear1"]["kernel"][:, 24:] = False  # 8 of 32 units
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))

    def fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    compact = hf.export(fn, params, masks, x)
    masked = hf.multiply_masks(params, masks)
    _assert_close(compact(x), fn(masked, x))
    # conv1's 3 positive constants are read by the padded conv2: kept (border "keep"); the
    # zero one goes, and so do linear1's 8 dead units (relu(bias) = 0 at init bias 0).
    assert compact.macs == (28 * 28 * 7 * 9 + 14 * 14 * 16 * 9 * 7 + 784 * 24 + 24 * 10)
    mapped = hf.export(fn, params, masks, x, border="map")
    _assert_close(mapped(x), fn(masked, x))
    assert mapped.macs == (28 * 28 * 4 * 9 + 14 * 14 * 16 * 9 * 4 + 784 * 24 + 24 * 10)


class InvertedResidual(nn.Module):
    """A MobileNet-V2 block (expand 1x1, depthwise 3x3, project 1x1, residual) and a head."""

    channels: int = 8
    expand: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.channels, (3, 3), use_bias=False)(x)
        hidden = self.channels * self.expand
        y = nn.relu6(nn.BatchNorm(use_running_average=True)(
            nn.Conv(hidden, (1, 1), use_bias=False)(x)))
        y = nn.Conv(hidden, (3, 3), feature_group_count=hidden, use_bias=False)(y)
        y = nn.relu6(nn.BatchNorm(use_running_average=True)(y))
        y = nn.BatchNorm(use_running_average=True)(
            nn.Conv(self.channels, (1, 1), use_bias=False)(y))
        x = x + y
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_mobilenet_v2_block_couples_depthwise_channels():
    model = InvertedResidual()
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
    variables = model.init(jax.random.key(0), x)
    params = jax.tree.map(np.array, variables["params"])
    stats = variables["batch_stats"]
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)  # noqa: E731
    graph = hf.graph.trace(fn, params, x)
    axes = graph.leaf_axes()
    expand_out = axes["Conv_1/kernel"][3]
    assert axes["Conv_2/kernel"][3] == expand_out  # the depthwise conv's channels
    assert axes["Conv_3/kernel"][2] == expand_out  # ... are the projection's inputs
    assert axes["Conv_0/kernel"][3] == axes["Conv_3/kernel"][3]  # the residual add
    assert axes["BatchNorm_1/scale"][0] == expand_out

    masks = _dense_masks(params)
    masks["Conv_2/kernel".split("/")[0]]["kernel"][..., :10] = False  # 10 depthwise filters
    params["BatchNorm_1"]["bias"][:10] = -1.0  # relu6(negative) = 0: exactly zero channels
    compact = hf.export(fn, params, masks, x)
    _assert_close(compact(x), fn(multiply_masks(params, masks), x))
    hw = 12 * 12
    assert compact.macs == (hw * 9 * 3 * 8 + hw * 8 * 22 + hw * 9 * 22 + hw * 22 * 8
                            + 8 * 10)
    assert compact.params["Conv_2/kernel"].shape == (3, 3, 1, 22)


def test_resnet50_bottleneck_stage():
    """One ResNet-50 stage (three bottleneck blocks, a projection): the stream is one group
    with the projection and every block's expanding conv, and a block's middle channels
    go with what reads them."""
    from hflows_jax.models.resnet import BottleneckResNetBlock, ResNet

    model = ResNet(stage_sizes=(3,), block_cls=BottleneckResNetBlock, num_filters=8,
                   zero_init_residual=False)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    params = jax.tree.map(np.array, variables["params"])
    stats = variables["batch_stats"]
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)  # noqa: E731
    axes = hf.graph.trace(fn, params, x).leaf_axes()
    stream = axes["BottleneckResNetBlock_0/conv_proj/kernel"][3]
    assert all(axes[f"BottleneckResNetBlock_{i}/Conv_2/kernel"][3] == stream for i in range(3))
    assert axes["BottleneckResNetBlock_1/Conv_0/kernel"][2] == stream

    masks = _dense_masks(params)
    masks["BottleneckResNetBlock_1"]["Conv_1"]["kernel"][..., :3] = False
    params["BottleneckResNetBlock_1"]["BatchNorm_1"]["bias"][:3] = -1.0  # relu(-1) = 0
    compact = hf.export(fn, params, masks, x)
    _assert_close(compact(x), fn(multiply_masks(params, masks), x))
    assert compact.groups["BottleneckResNetBlock_1/Conv_1"] == (5, 8)
    # the 3x3 conv's 3 outputs (8 inputs, 9 taps) and the expanding 1x1 conv's 3 inputs
    assert compact.dense_macs - compact.macs == 64 * 9 * 8 * 3 + 64 * 3 * 32


class TinyViT(nn.Module):
    dim: int = 16
    heads: int = 2
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (4, 4), strides=(4, 4))(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        y = nn.Dense(self.hidden)(nn.LayerNorm()(x))
        x = x + nn.Dense(self.dim)(nn.gelu(y))
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))


@pytest.mark.slow
def test_vit_mlp_units_and_attention_heads_are_groups():
    model = TinyViT()
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = jax.tree.map(np.array, model.init(jax.random.key(0), x)["params"])
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    graph = hf.graph.trace(fn, params, x)
    axes = graph.leaf_axes()
    space = lambda path, axis: axes[path][axis][0][1]  # noqa: E731
    attention = "MultiHeadDotProductAttention_0"
    mlp, heads = space("Dense_0/kernel", 1), space(f"{attention}/query/kernel", 1)
    value_dim, qk_dim = space(f"{attention}/value/kernel", 2), space(f"{attention}/query/kernel", 2)
    assert graph.groups == {mlp: 32, heads: 2, value_dim: 8}
    assert space(f"{attention}/key/kernel", 1) == heads == space(f"{attention}/out/kernel", 0)
    frozen = graph.frozen_reasons()
    assert "contracted" in frozen[qk_dim]  # query . key: both depend on x
    assert "reduced" in frozen[space("Dense_1/kernel", 1)]  # the stream: LayerNorm

    masks = _dense_masks(params)
    masks["Dense_0"]["kernel"][:, :12] = False
    params["Dense_0"]["bias"][:12] = 0.0  # gelu(0) = 0
    masks[attention]["out"]["kernel"][1] = False  # nothing reads head 1
    compact = hf.export(fn, params, masks, x)
    _assert_close(compact(x), fn(multiply_masks(params, masks), x))
    assert sorted(compact.groups.values()) == [(1, 2), (8, 8), (20, 32)]
    tokens, dim, head_dim = 16, 16, 8
    mlp_saved = tokens * (dim * 12 + 12 * dim)
    head_saved = tokens * (3 * dim * head_dim + head_dim * dim)  # q, k, v; out
    assert graph.macs() - compact.macs == mlp_saved + head_saved


def test_an_op_the_graph_cannot_take_is_named_with_its_line():
    def fn(p, x):
        return jax.lax.top_k(x @ p["w"], 2)[0]

    params = {"w": np.ones((4, 3), np.float32)}
    with pytest.raises(GraphError, match=r"top_k.*test_compact\.py"):
        hf.export(fn, params, {"w": np.ones((4, 3), bool)}, np.ones((2, 4), np.float32))


def test_guide_your_own_model_runs():
    """The "Your own model" guide's code, executed as written."""
    import pathlib
    import re

    guide = pathlib.Path(__file__).parents[1] / "docs" / "guides" / "your-own-model.md"
    (code,) = re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)
    scope = {}
    exec(compile(code, str(guide), "exec"), scope)  # noqa: S102
    compact, groups = scope["compact"], scope["groups"]
    assert groups.sizes == {"Conv_0": 32, "Conv_1": 64, "Dense_0": 256}
    assert 0 < compact.macs < compact.dense_macs
    kept = hf.find_pruner_state(scope["opt_state"]).channel_masks()
    assert compact.macs == float(groups.macs(kept))
    final = hf.finalize(scope["params"], scope["opt_state"])
    _assert_close(compact(scope["x"]), scope["fn"](final, scope["x"]))
    assert isinstance(scope["serialized"], (bytes, bytearray))
    _assert_close(scope["served"].call(scope["x"]), compact(scope["x"]))


def _mlp(n_in=6, hidden=8, n_out=4, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": rng.normal(size=(n_in, hidden)).astype(np.float32),
              "w2": rng.normal(size=(hidden, n_out)).astype(np.float32)}
    masks = {"w1": np.ones((n_in, hidden), bool), "w2": np.ones((hidden, n_out), bool)}
    masks["w1"][:, :3] = False  # three hidden units with no input: relu(0) = 0
    return params, masks


@pytest.mark.parametrize("case", ["slice", "maxout", "split", "dict_output"])
def test_programs_that_slice_split_or_reshape_export_at_any_batch(case):
    """Ops whose shape parameters mention the batch or a pruned axis (found in review)."""
    params, masks = _mlp()
    if case == "maxout":  # a reshape that splits the hidden units: frozen, batch kept
        params["w2"], masks["w2"] = params["w2"][:4], masks["w2"][:4]
    if case == "split":  # a GLU: the hidden units split in two halves
        params["w2"], masks["w2"] = params["w2"][:4], masks["w2"][:4]

    def fn(p, x):
        h = x @ p["w1"]
        if case == "slice":
            return jax.nn.relu(h)[:, 1:] @ p["w2"][1:]
        if case == "maxout":
            return h.reshape(x.shape[0], 4, 2).max(-1) @ p["w2"]
        if case == "split":
            a, b = jnp.split(h, 2, axis=-1)
            return (a * jax.nn.sigmoid(b)) @ p["w2"]
        return {"logits": jax.nn.relu(h) @ p["w2"], "hidden": jax.nn.relu(h)}

    x2, x5 = (np.random.default_rng(n).normal(size=(n, 6)).astype(np.float32) for n in (2, 5))
    compact = hf.export(fn, params, masks, x2)
    masked = multiply_masks(params, masks)
    got, want = compact(x5), fn(masked, x5)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _assert_close(g, w)


def test_a_grouped_conv_and_bfloat16_kernels_keep_their_layers():
    class Net(nn.Module):
        dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), dtype=self.dtype)(x)
            x = nn.Conv(8, (3, 3), feature_group_count=2, dtype=self.dtype)(x)  # not depthwise
            return nn.Dense(3, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))

    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    params = jax.tree.map(np.array, Net().init(jax.random.key(0), x)["params"])
    masks = _dense_masks(params)
    masks["Conv_0"]["kernel"][:, :, :, :2] = False
    compact = hf.export(lambda p, x: Net().apply({"params": p}, x), params, masks, x)
    _assert_close(compact(x), Net().apply({"params": multiply_masks(params, masks)}, x))
    # bfloat16: every kernel is cast before its layer; the layers still name their params
    bf16 = lambda p, x: Net(jnp.bfloat16).apply({"params": p}, x)  # noqa: E731
    dense, masked = forward_macs(bf16, params, x, masks)
    assert dense - masked == 36 * 9 * 3 * 2  # Conv_0's two dead filters, 6x6 positions
    # the grouped conv reads Conv_0 in 2 groups of 4: channel c of every group goes alike
    assert hf.structured.channel_groups(bf16, params, x).sizes == {"Conv_0": 4, "Conv_1": 4}
    # A bfloat16 VGG names its groups by layer, and
    # a kernel's members are its input axes: the reading side.
    vgg = models.VGG(layers=(8, "M", 16), num_classes=3, dtype=jnp.bfloat16)
    v = vgg.init(jax.random.key(0), x)
    groups = hf.structured.channel_groups(vgg, v["params"], x)
    assert groups.sizes == {"Conv_0": 8, "Conv_1": 16}
    assert groups.members["Conv_1/kernel"] == (("Conv_0", 2, (8,), 0),)


def test_a_per_token_mlp_counts_its_multiply_adds_per_example():
    params, masks = _mlp()

    def fn(p, x):  # x: (batch, 5 tokens, 6): the tokens merged with the batch
        h = jax.nn.relu(x.reshape(-1, 6) @ p["w1"]) @ p["w2"]
        return h.reshape(x.shape[0], 5, 4).mean(1)

    x = np.ones((2, 5, 6), np.float32)
    want = 5 * (6 * 8 + 8 * 4)
    assert forward_macs(fn, params, x)[0] == want
    assert hf.structured.channel_groups(fn, params, x).dense_macs == want
    assert hf.graph.trace(fn, params, x).macs() == want


def test_a_mean_over_the_batch_is_refused():
    params, masks = _mlp()
    with pytest.raises(GraphError, match="batch axis"):
        hf.export(lambda p, x: (x @ p["w1"]) - (x @ p["w1"]).mean(0), params, masks,
                  np.ones((2, 6), np.float32))
