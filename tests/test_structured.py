"""Channel Hyperflows: channel flows against autodiff, multiply-adds against hf.export's
compact models, and a run that lands on its FLOP target and exports smaller."""

import dataclasses
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from experiments import export as export_experiment
from hflows_jax import models
from hflows_jax.training import Config, run
from hflows_jax.training.checkpoint import checkpoint_dir
from tests.helpers import subset_npz
from hflows_jax.structured import channel_groups, channel_hyperflows, dhp, flops_fraction, ftwt


def _init(name, shape, **kwargs):
    model = models.create(name, 10, **kwargs)
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape))
    return model, variables["params"], variables.get("batch_stats", {})


def _export(model, params, masks, stats, shape):
    rest = {"batch_stats": stats} if stats else {}
    return hf.export(lambda p, x: model.apply({"params": p, **rest}, x, train=False), params,
                     masks, np.zeros((2,) + shape, np.float32))


def _random_kept(groups, seed, p=0.6):
    rng = np.random.default_rng(seed)
    kept = {}
    for g, n in groups.sizes.items():
        k = rng.random(n) < p
        k[rng.integers(n)] = True  # at least one channel per layer
        kept[g] = k
    return kept


@pytest.mark.slow
def test_channel_flows_are_the_derivative_of_the_loss_by_a_channel_scale():
    """The flow of channel c is ste_scale * dL/ds_c, where s_c scales c at the input of
    every layer that reads it, with s at the masks: for kept channels and for pruned
    ones, whose flow is what bringing them back would change (not 0)."""
    shape = (32, 32, 3)
    model, params, stats = _init("vgg19", shape, width=0.0625)
    groups = channel_groups(model, params, shape)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8,) + shape).astype(np.float32), rng.integers(0, 10, 8)
    convs = [f"Conv_{i}" for i in range(16)]
    read = dict(zip(convs[1:] + ["Dense_0"], convs))  # layer -> the group it reads

    def loss(p, scales=None):
        def gate(next_fun, args, kwargs, context):  # the oracle's scale at each reader
            group = read.get(context.module.name)
            if scales is not None and context.method_name == "__call__" and group:
                args = (args[0] * scales[group],) + args[1:]
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(gate):
            logits, _ = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                    mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    kept = _random_kept(groups, seed=3)
    want = jax.grad(lambda s: loss(params, s))(
        {g: jnp.asarray(k, jnp.float32) for g, k in kept.items()})

    ste = 0.25
    tx = channel_hyperflows(groups, hf.pressure.constant(0.0), optax.sgd(1.0), ste_scale=ste)
    state = tx.init(params)
    state = state._replace(kept=kept, masks=groups.expand(kept, params))
    grads = jax.grad(loss)(hf.apply_masks(params, state))  # at W * M, as a train step
    _, new = tx.update(grads, state, params)
    pruned = 0
    for g in groups.sizes:
        got = state.presence[g] - new.presence[g]
        np.testing.assert_allclose(got, ste * want[g], rtol=1e-4, atol=1e-7)
        pruned += int(np.sum(np.abs(np.asarray(want[g]))[~kept[g]] > 0))
    assert pruned == sum(int((~k).sum()) for k in kept.values()) > 0


@pytest.mark.parametrize("name, shape, kwargs", [
    ("lenet5", (28, 28, 1), {}),
    ("vgg19", (32, 32, 3), {"width": 0.0625}),
])
def test_macs_of_kept_channels_equal_the_exported_compact_model(name, shape, kwargs):
    model, params, stats = _init(name, shape, **kwargs)
    groups = channel_groups(model, params, shape)
    kept = _random_kept(groups, seed=1)
    masks = groups.expand(kept, params)
    pruned = hf.multiply_masks(params, masks)
    compact = _export(model, pruned, masks, stats, shape)
    assert groups.dense_macs == compact.dense_macs
    assert float(groups.macs(kept)) == compact.macs
    assert float(groups.flops_fraction(kept)) == pytest.approx(compact.macs / compact.dense_macs)
    assert float(groups.channels_fraction(kept)) == pytest.approx(
        sum(k.sum() for k in kept.values()) / sum(groups.sizes.values()))
    # A layer with no channel left: what follows it is constant, and export drops it too.
    dead = dict(kept)
    dead[list(groups.sizes)[1]] = np.zeros(groups.sizes[list(groups.sizes)[1]], bool)
    masks = groups.expand(dead, params)
    compact = _export(model, hf.multiply_masks(params, masks), masks, stats, shape)
    assert float(groups.macs(dead)) == compact.macs < float(groups.macs(kept))


@pytest.mark.slow
@pytest.mark.parametrize("name, width", [("vgg19", 0.125), ("resnet20", 0.5)])
def test_channel_multiple_pads_with_zero_channels_and_changes_no_output(name, width):
    """``hf.export(..., channel_multiple=8)``: every group's compact count rounded up to a
    multiple of 8 (or its whole size) with channels of zeros; the outputs stay the
    unpadded compact model's, and the multiply-adds count the zeros too."""
    shape = (32, 32, 3)
    model, params, stats = _init(name, shape, width=width)
    stats = jax.tree.map(lambda x: x + 0.3, stats)  # BatchNorm shifts: padding must not
    groups = channel_groups(model, params, shape)
    kept = _random_kept(groups, seed=3)
    masks = groups.expand(kept, params)
    pruned = hf.multiply_masks(params, masks)
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)  # noqa: E731
    x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
    plain = hf.export(fn, pruned, masks, x)
    padded = hf.export(fn, pruned, masks, x, channel_multiple=8)
    np.testing.assert_allclose(padded(x), plain(x), rtol=1e-4, atol=1e-5)
    assert any(plain.groups[g][0] % 8 for g in plain.groups)  # something to pad
    for g, (k, n) in padded.groups.items():
        assert (k % 8 == 0 or k == n) and k >= plain.groups[g][0], g
        assert k - plain.groups[g][0] < 8, g
    assert plain.macs < padded.macs <= padded.dense_macs
    with pytest.raises(ValueError, match="channel_multiple"):
        hf.export(fn, pruned, masks, x, channel_multiple=0)


def test_a_resnet_stream_is_one_group_with_every_layer_that_reads_it():
    shape = (16, 16, 3)
    model, params, stats = _init("resnet20", shape, width=0.25)
    groups = channel_groups(model, params, shape)
    stream = {path for path, members in groups.members.items()
              if [m.group for m in members] == ["conv_init"]}
    assert stream == {f"ResNetBlock_{i}/Conv_0/kernel" for i in range(4)} | {
        "ResNetBlock_3/conv_proj/kernel"}
    everything = {g: np.ones(n, bool) for g, n in groups.sizes.items()}
    one_off = dict(everything)
    one_off["conv_init"] = np.arange(4) != 0  # stage 0's stream channel 0, everywhere
    # Writers: the stem (3 image channels in) and three blocks' second convs (4 in);
    # readers: three blocks' first convs (4 out), and at stride 2 block 3's first conv and
    # projection (8 out each). 3 x 3 taps but for the 1 x 1 projection.
    hand = (16 * 16 * 9 * 3 + 3 * 16 * 16 * 9 * 4 + 3 * 16 * 16 * 9 * 4
            + 8 * 8 * 9 * 8 + 8 * 8 * 8)
    assert float(groups.macs(everything) - groups.macs(one_off)) == hand
    masks = groups.expand(one_off, params)
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)  # noqa: E731
    compact = hf.export(fn, hf.multiply_masks(params, masks), masks, jnp.ones((2,) + shape))
    assert compact.macs == float(groups.macs(one_off))


@pytest.mark.slow
def test_channel_hyperflows_lands_on_a_flops_target_and_exports_smaller():
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256,) + shape).astype(np.float32)
    y = (x[:, :14].mean(axis=(1, 2, 3)) > x[:, 14:].mean(axis=(1, 2, 3))).astype(np.int32)
    steps, target = 400, 0.5
    tx = optax.chain(
        channel_hyperflows(groups, hf.pressure.trajectory(target, steps, update_every=10),
                           optax.adam(0.01)),
        optax.sgd(0.01, momentum=0.9))

    def loss(p, xb, yb):
        logits = model.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, s, i):
        xb, yb = jax.lax.dynamic_slice_in_dim(x, (i % 8) * 32, 32), \
            jax.lax.dynamic_slice_in_dim(y, (i % 8) * 32, 32)
        grads = jax.grad(loss)(hf.apply_masks(p, s), xb, yb)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for i in range(steps + 20):
        params, state = step(params, state, i)
    kept = float(flops_fraction(groups, state))
    assert abs(kept - (1 - target)) < 0.05, kept
    masks = hf.masks(state)
    assert jax.tree.structure(masks) == jax.tree.structure(
        groups.expand({g: np.ones(n, bool) for g, n in groups.sizes.items()}, params))
    final = hf.finalize(params, state)
    compact = _export(model, final, masks, {}, shape)
    assert compact.macs / compact.dense_macs == pytest.approx(kept)
    want = model.apply({"params": final}, x[:16])
    np.testing.assert_allclose(compact(x[:16]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_layer_keeps_its_floor_of_channels():
    """Under a pressure that drives every score below zero, each layer keeps exactly its
    ``min_channels`` highest scores (all of a layer with fewer)."""
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    tx = channel_hyperflows(groups, hf.pressure.constant(1e3), optax.sgd(1.0), min_channels=8)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(zeros, state, params)
    for g, t in state.presence.items():
        assert bool(jnp.all(t < 0))
        want = np.zeros(len(t), bool)
        want[np.argsort(np.asarray(t))[-min(8, len(t)):]] = True
        np.testing.assert_array_equal(state.channel_masks()[g], want)
    assert float(groups.channels_fraction(state.kept)) == pytest.approx(30 / groups.total)


def test_errors():
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    with pytest.raises(ValueError, match="channel_groups"):
        channel_hyperflows(None, hf.pressure.constant(0.0))
    with pytest.raises(ValueError, match="target"):
        channel_hyperflows(groups, hf.pressure.constant(0.0), target="weights")
    with pytest.raises(ValueError, match="min_channels"):
        channel_hyperflows(groups, hf.pressure.constant(0.0), min_channels=-1)
    _, other, _ = _init("lenet5", shape, width=0.5)
    with pytest.raises(ValueError, match="do not match these channel groups"):
        channel_hyperflows(groups, hf.pressure.constant(0.0)).init(other)


def test_pruned_channels_are_unread_so_stale_statistics_do_not_matter():
    """With the BatchNorm scale fixed and stale running means, a pruned channel's
    activation is a nonzero constant; its readers' rows are zero, so export drops it (and
    what computes it), and the logits stay the masked model's."""
    shape = (32, 32, 3)
    model, params, stats = _init("vgg19", shape, width=0.0625, train_bn_scale=False)
    stats = jax.tree.map_with_path(
        lambda path, x: x - 0.1 if path[-1].key == "mean" else x, stats)
    groups = channel_groups(model, params, shape)
    kept = _random_kept(groups, seed=2)
    masks = groups.expand(kept, params)
    pruned = hf.multiply_masks(params, masks)
    compact = _export(model, pruned, masks, stats, shape)
    assert compact.macs == float(groups.macs(kept)) < compact.dense_macs
    images = np.random.default_rng(0).normal(size=(4,) + shape).astype(np.float32)
    want = model.apply({"params": pruned, "batch_stats": stats}, images, train=False)
    np.testing.assert_allclose(compact(images), want, rtol=1e-4, atol=1e-5)


def _channel_pruner(name):
    """(pruner, params, loss of params) for the contract: channel Hyperflows on LeNet-5, DHP
    on a small hypernetwork VGG (its latents are its masked leaves)."""
    rng = np.random.default_rng(0)
    if name == "hyperflows_channel":
        model, params, _ = _init("lenet5", (28, 28, 1))
        groups = channel_groups(model, params, (28, 28, 1))
        pruner = channel_hyperflows(groups, hf.pressure.constant(50.0), optax.sgd(1.0))
        x = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
        apply = lambda p: model.apply({"params": p}, x)  # noqa: E731
    else:
        model = dhp.DHPVGG(layers=(8, "M", 16), num_classes=10)
        x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
        variables = model.init(jax.random.key(0), x)
        params = variables["params"]
        plain, plain_params, _ = dhp.plain_variables(model, params, variables["batch_stats"])
        pruner = dhp.dhp(channel_groups(plain, plain_params, (8, 8, 3)), 0.5, 0.1, reg=5.0)
        apply = lambda p: model.apply({**variables, "params": p}, x)  # noqa: E731
    y = rng.integers(0, 10, 8)
    return pruner, params, lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p), y).mean()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hyperflows_channel", "dhp"])
def test_channel_pruners_keep_the_pruner_contract_where_it_applies(name):
    """State, helpers, jit, abstract init and MultiSteps, as tests/test_pruner_contract.py
    checks for the weight pruners. Channel Hyperflows passes grads * M down the chain; DHP
    comes last in a chain (its proximal step acts on the final updates), so it does not."""
    pruner, params, loss = _channel_pruner(name)
    tx = optax.chain(pruner, optax.sgd(0.1)) if name == "hyperflows_channel" else optax.chain(
        optax.sgd(0.1), pruner)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        grads = jax.grad(loss)(hf.apply_masks(params, state))
        updates, new_state = step(grads, state, params)
        if name == "hyperflows_channel":
            gated = jax.tree.map(lambda m, g: g if m is None else jnp.where(m, g, 0.0),
                                 hf.masks(state), grads, is_leaf=lambda m: m is None)
            chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, gated),
                                        rtol=1e-5, atol=1e-8)
        params, state = optax.apply_updates(params, updates), new_state
    assert isinstance(hf.find_pruner_state(state), hf.PrunerState)
    masks = hf.masks(state)
    assert jax.tree.structure(masks, is_leaf=lambda m: m is None) == jax.tree.structure(params)
    assert 0 < float(hf.sparsity(state)) < 1, "the strong pressure or shrink prunes some"
    final = hf.finalize(params, state)
    for m, f in zip(jax.tree.leaves(masks, is_leaf=lambda m: m is None),
                    jax.tree.leaves(final)):
        if m is not None:
            assert bool(jnp.all(jnp.where(m, True, f == 0)))
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    assert ([(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
            == [(c.shape, c.dtype) for c in jax.tree.leaves(tx.init(params))])
    # MultiSteps: the pruner steps once, with the mean gradient of the two.
    multi = optax.MultiSteps(pruner, every_k_schedule=2)
    inner = pruner.init(params)
    m_state = multi.init(params)
    g1 = jax.grad(loss)(hf.apply_masks(params, inner))
    g2 = jax.tree.map(lambda g: 3 * g, g1)
    _, m_state = multi.update(g1, m_state, params)
    updates, m_state = multi.update(g2, m_state, params)
    want, want_state = pruner.update(jax.tree.map(lambda g: 2 * g, g1), inner, params)
    chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(hf.masks(m_state), hf.masks(want_state))


@pytest.mark.slow
def test_channel_hyperflows_on_a_mobilenet_v2_block():
    """Channel groups traced from a user's function (the Linen MNIST CNN: README's "Your own
    model", tests/test_compact.py): channel Hyperflows prunes them, and the exported model's
    multiply-adds are the groups' count, its logits the masked model's."""
    from tests.test_compact import InvertedResidual

    model = InvertedResidual()
    x = np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype(np.float32)
    # the stream (the stem and the projection write it); the expanded channels (the 1x1
    # expansion writes them, the depthwise conv and its BatchNorm carry them)
    want_groups = {"Conv_0": 8, "Conv_1": 32}
    variables = model.init(jax.random.key(0), x)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    fn = lambda p, x: model.apply({"params": p, **rest}, x)  # noqa: E731
    groups = channel_groups(fn, params, x)
    assert groups.sizes == want_groups
    y = np.arange(16) % 10
    tx = optax.chain(channel_hyperflows(groups, hf.pressure.constant(30.0), optax.adam(0.05),
                                        min_channels=2), optax.sgd(0.01))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            fn(q, x), y).mean())(hf.apply_masks(p, s))
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(15):
        params, state = step(params, state)
    kept = hf.find_pruner_state(state).channel_masks()
    assert all(2 <= int(np.sum(k)) < groups.sizes[g] for g, k in kept.items())
    final = hf.finalize(params, state)
    compact = hf.export(fn, final, hf.masks(state), x)
    assert compact.macs == float(groups.macs(kept)) < compact.dense_macs
    np.testing.assert_allclose(compact(x), fn(final, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrap, own, replaced", [
    (dhp.to_dhp, ("HyperConv_",), ("Conv_",)),
    (lambda m: ftwt.to_ftwt(m, 0.5), ("Gate_", "mass_threshold"), ()),
], ids=["dhp", "ftwt"])
def test_dhp_and_ftwt_networks_are_the_vgg_with_its_conv_layer_replaced(wrap, own, replaced):
    """They run the VGG's own layer loop and classifier, so that a change to the VGG is
    theirs too: beside their own layers, they have its variables, by name and shape."""
    vgg = models.VGG(layers=(8, "M", 16, "M", 16), num_classes=3, width=0.5)
    model = wrap(vgg)
    assert isinstance(model, models.VGG)
    assert type(model).backbone is models.VGG.backbone
    assert type(model).classifier is models.VGG.classifier
    x = jnp.zeros((2, 16, 16, 3))
    plain = jax.eval_shape(vgg.init, jax.random.key(0), x)
    wrapped = jax.eval_shape(model.init, jax.random.key(0), x)
    for collection in ("params", "batch_stats"):
        rest = {k: jax.tree.map(lambda a: a.shape, v)
                for k, v in wrapped[collection].items() if not k.startswith(own)}
        kept = {k: jax.tree.map(lambda a: a.shape, v)
                for k, v in plain[collection].items() if not k.startswith(replaced)}
        assert rest == kept, collection
    assert {"BatchNorm_2", "Dense_0"} <= set(wrapped["params"])


def test_pressure_by_macs_pushes_each_channel_by_what_it_costs():
    """A VGG (8, pool, 16) on 8x8 images: Conv_0 costs 64*9*3 per channel and Conv_1
    16*9 per pair of channels, the classifier 3 per Conv_1 channel. One more Conv_0
    channel adds 1728 + 144*16 = 4032, one more Conv_1 channel 144*8 + 3 = 1155."""
    model = models.VGG(layers=(8, "M", 16), num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    groups = channel_groups(model, params, (8, 8, 3))
    everything = {g: np.ones(n, bool) for g, n in groups.sizes.items()}
    cost = groups.marginal_macs(everything)
    assert {g: float(c) for g, c in cost.items()} == {"Conv_0": 4032.0, "Conv_1": 1155.0}
    gamma = 3.0
    tx = channel_hyperflows(groups, hf.pressure.constant(gamma), optax.sgd(1.0),
                            pressure_by="macs", min_channels=0)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, new = tx.update(zeros, state, params)  # no flow: the scores move by the push alone
    total = 8 * 4032 + 16 * 1155
    for g, c in (("Conv_0", 4032), ("Conv_1", 1155)):
        np.testing.assert_allclose(state.presence[g] - new.presence[g], gamma * c / total,
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="pressure_by"):
        channel_hyperflows(groups, hf.pressure.constant(0.0), pressure_by="flops")


@pytest.mark.slow
def test_dhp_and_ftwt_train_on_a_resnet(cifar_npz, tmp_path):
    """The loop's glue on a basic-block ResNet: DHP searches its hypernetwork ResNet, then
    fine-tunes the plain pruned one; FTWT takes over a plain ResNet's weights, keeping
    its heads inside the blocks, and reports the multiply-adds it executes."""
    small = subset_npz(cifar_npz, tmp_path / "small.npz", train=64, test=32)
    cfg = Config().replace(model="resnet20", width=0.25, dataset=small, batch_size=16,
                           augment=False, bn_batches=2, target_sparsity=0.5, dense_epochs=0,
                           pruning_epochs=1, regrowth_epochs=1)
    searched_cfg = cfg.replace(method="dhp_reach", workdir=str(tmp_path / "dhp"))
    searched = run(searched_cfg)
    assert [r["phase"] for r in searched["history"]] == ["pruning", "finetune"]
    opened, _, state = export_experiment.restore_last(searched_cfg)
    plain = models.create("resnet20", 10, width=0.25)
    assert type(opened.phase_of(2).model) is type(plain)
    assert jax.tree.structure(state.params) == jax.tree.structure(
        plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    groups = channel_groups(plain, state.params, (32, 32, 3))
    assert searched["target_removed"] == pytest.approx(
        1 - float(groups.flops_fraction(hf.channel_masks(state.opt_state))), abs=1e-6)
    assert searched["target_removed"] > 0

    # FTWT from a plain ResNet's weights: those DHP fine-tuned.
    gated_cfg = cfg.replace(method="ftwt", workdir=str(tmp_path / "ftwt"),
                            init_checkpoint=checkpoint_dir(str(tmp_path / "dhp"), "finetune"))
    gated = run(gated_cfg)
    assert gated["target"] == "flops" and 0 < gated["target_removed"] < 1
    _, _, state = export_experiment.restore_last(gated_cfg)
    assert set(state.params["ResNetBlock_8"]) >= {"Conv_0", "Conv_1", "Gate_0", "Gate_1"}


@pytest.mark.parametrize("lr, controller, expected", [
    (1e-4, "pi", "cannot reach"),  # 400 steps travel 0.04; the 29 %-quantile is 0.29 above 0
    (2e-3, "pi", "overshoot"),  # crosses in 144 steps; 400 < 5 * 144
    (1e-2, "pi", None),  # crosses in 29 steps
    (1e-2, "trajectory", "cannot pull back"),  # floored at 0: channels die past the target
])
def test_init_warns_in_a_users_loop_when_the_channel_schedule_misses(lr, controller,
                                                                     expected):
    """A 50 % multiply-add target is about 29 % of the channels (1 - sqrt(0.5)), a uniform
    cut's: hf.hyperflows' warnings on that fraction of the channel scores, and one for a
    controller that cannot pull back."""
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    pressure = (hf.pressure.log_density_pi(0.5, 400, 10, kp=0.25, ki=0.25, negative=True)
                if controller == "pi" else hf.pressure.trajectory(0.5, 400, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optax.chain(channel_hyperflows(groups, pressure, optax.adam(lr)),
                    optax.sgd(0.01)).init(params)
        channel_hyperflows(groups, pressure, optax.adam(lr), warn=False).init(params)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if expected is None:
        assert messages == []
    else:
        (message,) = messages
        assert message.startswith("hf.structured.channel_hyperflows:") and expected in message


def test_round_to_keeps_multiples_of_channels_in_every_layer():
    """Under a pressure that sends scores below zero, every layer keeps a multiple of
    ``round_to`` channels (or all), its highest scores, and never fewer than T >= 0."""
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    presence = {g: jnp.linspace(-1.0, 0.5, n) for g, n in groups.sizes.items()}
    from hflows_jax.structured.channel_hyperflows import kept_channels
    for round_to in (1, 4):
        kept = kept_channels(presence, 2, round_to)
        for g, n in groups.sizes.items():
            count = int(kept[g].sum())
            plain = max(int((presence[g] >= 0).sum()), min(2, n))
            assert count == min(n, -(-plain // round_to) * round_to), (g, round_to)
            assert kept[g][n - count:].all()  # the highest scores: the last ones
    # scores start in (0.2, 0.5); 5 steps of 0.06 push about a third below zero
    tx = channel_hyperflows(groups, hf.pressure.constant(0.06 * groups.total), optax.sgd(1.0),
                            min_channels=1, round_to=4)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    for _ in range(5):
        _, state = tx.update(grads, state, params)
    counts = {g: int(k.sum()) for g, k in hf.channel_masks(state).items()}
    assert any(c < groups.sizes[g] for g, c in counts.items())
    assert all(c % 4 == 0 or c == groups.sizes[g] for g, c in counts.items()), counts
    with pytest.raises(ValueError, match="round_to"):
        channel_hyperflows(groups, hf.pressure.constant(0.0), round_to=0)


def test_flops_fraction_of_a_model_past_two_billion_multiply_adds():
    """ResNet-50 at 224x224 has 4.1e9: the count must not pass through int32."""
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    kept = {g: np.arange(n) < n // 2 + 1 for g, n in groups.sizes.items()}
    scale = 2 ** 16  # LeNet-5's 0.4 M multiply-adds times this: 2.8e10
    big = dataclasses.replace(
        groups, dense_macs=groups.dense_macs * scale,
        layers=tuple((unit * scale, read, written) for unit, read, written in groups.layers))
    assert big.dense_macs > 2 ** 31
    assert float(big.flops_fraction(kept)) == pytest.approx(float(groups.flops_fraction(kept)))


@pytest.mark.slow
def test_the_channel_budget_lands_where_the_schedule_ends_and_stays():
    """A pressure far too strong for its controller sends every channel past a 50 %
    target; the landing shifts the scores onto the cut nearest the target (a brute-force
    search over every score as the cut is the oracle), and the channels stay after it.
    Without the landing the run ends where the controller left it."""
    from hflows_jax.structured.channel_hyperflows import LANDED, kept_channels
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    grads = jax.tree.map(jnp.zeros_like, params)
    steps, target = 20, 0.5
    removed = {}
    for land in (True, False):
        tx = channel_hyperflows(groups, hf.pressure.trajectory(target, steps, 1, step_size=50.0),
                                optax.sgd(1.0), min_channels=1, land=land, warn=False)
        state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(steps - 1):
            _, state = update(grads, state, params)
        before = state.presence
        _, state = update(grads, state, params)  # the schedule's last step: the landing
        removed[land] = 1 - float(flops_fraction(groups, state))
        if land:
            _, moved = jax.jit(channel_hyperflows(
                groups, hf.pressure.trajectory(target, steps, 1, step_size=50.0),
                optax.sgd(1.0), min_channels=1, land=False, warn=False).update)(
                grads, state._replace(count=state.count - 1, presence=before), params)
            scores = np.concatenate([np.asarray(t) for t in moved.presence.values()])
            cuts = [1 - float(groups.flops_fraction(kept_channels(
                {g: t - tau for g, t in moved.presence.items()}, 1)))
                for tau in scores]
            assert removed[land] == pytest.approx(min(cuts, key=lambda r: abs(r - target)),
                                                  abs=1e-6)
            masks = hf.channel_masks(state)
            for _ in range(3):
                _, state = update(grads, state, params)
            chex.assert_trees_all_equal(hf.channel_masks(state), masks)
    assert abs(removed[True] - target) < LANDED
    assert abs(removed[False] - target) > 4 * LANDED


def test_a_landing_that_cannot_reach_its_target_warns_from_inside_jit():
    """With every layer's floor at its whole width nothing can be removed: the landing
    says so at its step, in the user's own jitted loop."""
    shape = (28, 28, 1)
    model, params, _ = _init("lenet5", shape)
    groups = channel_groups(model, params, shape)
    tx = channel_hyperflows(groups, hf.pressure.trajectory(0.5, 4, 1), optax.sgd(1.0),
                            min_channels=max(groups.sizes.values()), warn=False)
    state, update = tx.init(params), jax.jit(tx.update)
    grads = jax.tree.map(jnp.zeros_like, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 5):
            _, state = update(grads, state, params)
            jax.effects_barrier()
            landed = [str(w.message) for w in caught if "landed at 0.00%" in str(w.message)]
            assert len(landed) == (step == 4), (step, landed)
    with pytest.raises(ValueError, match="land_step"):
        channel_hyperflows(groups, hf.pressure.constant(0.1), land_step=3)
