"""FTWT against hand computations: the heatmap-mass target, the decoupled gating loss (no
gradient into the backbone), executed multiply-adds counted per input, the mass threshold
calibrated to the FLOP target and fixed in training, and FTWT's optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hflows_jax import methods, models
from hflows_jax.structured import ftwt
from hflows_jax.structured.ftwt import (FTWTVGG, gating_loss, is_gate, mass_target, to_ftwt,
                                        with_heads)
from hflows_jax.training import TrainState, make_train_step

SMALL_VGG = dict(layers=(8, "M", 16, 16), num_classes=3)


def test_mass_target_by_hand():
    # Spatial max of |activation| per channel: image 0 [4, 1, 3, 2] (one entry negative),
    # image 1 [1, 1, 1, 1].
    a = np.zeros((2, 2, 2, 4), np.float32)
    a[0, 0, 0] = [4, 1, -3, 2]
    a[0, 1, 1] = [1, 0.5, 1, 1]
    a[1, 0, 1] = [1, 1, 1, 1]
    # Image 0: masses 0.4, 0.1, 0.3, 0.2; sorted 0.4 (c0), 0.3 (c2), 0.2 (c3), 0.1 (c1),
    # cumulative 0.4, 0.7, 0.9, 1.0. Image 1: 0.25 each, cumulative 0.25 ... 1.0.
    for threshold, want in [(0.7, [[1, 0, 1, 0], [1, 1, 0, 0]]),
                            (0.35, [[0, 0, 0, 0], [1, 0, 0, 0]]),
                            (0.95, [[1, 0, 1, 1], [1, 1, 1, 0]]),
                            (1.0, [[1, 1, 1, 1], [1, 1, 1, 1]])]:
        got = np.asarray(mass_target(jnp.asarray(a), jnp.asarray(threshold)))
        # Image 1's channels tie; which of them are kept is the sort's choice, not how many.
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1].sum() == sum(want[1]), threshold


def _model_and_variables(seed=0):
    model = FTWTVGG(**SMALL_VGG, flops_target=0.5)
    x = jax.random.normal(jax.random.key(seed), (6, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    # Gate biases spread around 0, so masks differ from input to input.
    params = jax.tree.map(lambda v: v, variables["params"])
    for name in params:
        if is_gate(name):
            params[name]["kernel"] = params[name]["kernel"] * 20
    return model, x, {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.slow
def test_decoupled_gating_loss_reaches_only_the_heads_and_the_task_loss_not_them():
    model, x, variables = _model_and_variables()
    y = jnp.arange(6) % 3

    def losses(params):
        logits, sown = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=["intermediates", "batch_stats"])
        task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return task, gating_loss(params, sown["intermediates"])

    task_grads = jax.grad(lambda p: losses(p)[0])(variables["params"])
    gate_grads = jax.grad(lambda p: losses(p)[1])(variables["params"])
    for name in variables["params"]:
        gate_norm = optax.tree.norm(gate_grads[name])
        task_norm = optax.tree.norm(task_grads[name])
        if is_gate(name):
            assert float(gate_norm) > 0 and float(task_norm) == 0, name
        else:
            assert float(gate_norm) == 0 and float(task_norm) > 0, name
    # The two optimizers split the params the same way.
    tx = with_heads(optax.sgd(1.0), optax.sgd(0.0))
    updates, _ = tx.update(gate_grads, tx.init(variables["params"]), variables["params"])
    for name in variables["params"]:
        assert (float(optax.tree.norm(updates[name])) > 0) == is_gate(name)


def test_executed_flops_are_counted_per_input():
    model, x, variables = _model_and_variables()
    _, sown = model.apply(variables, x, train=False, mutable=["intermediates"])
    inter = sown["intermediates"]
    on = [np.asarray(g) > 0 for g in inter["gate_logits"]]  # sigmoid > 0.5
    # By hand: conv l costs H_l * W_l * 9 * (active inputs) * (active outputs) per input;
    # the classifier (active last) * 3. Dense: every channel active.
    want = _executed_by_hand(on)
    got = np.asarray(ftwt.executed_fraction(inter))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(set(np.round(want, 6))) > 1, "masks should differ between inputs"
    # The masks multiply the channels: a gated-off channel of the last conv feeds nothing.
    assert 0 < np.mean([m.mean() for m in on]) < 1


@pytest.mark.slow
def test_calibrated_threshold_has_the_target_masks_execute_the_flops_target():
    model, _, variables = _model_and_variables()
    batches = [jax.random.normal(jax.random.key(k), (8, 8, 8, 3)) for k in (2, 3)]
    threshold = ftwt.calibrate_threshold(model, variables, batches)

    def by_hand(t):  # the mean over batches of the multiply-adds the targets execute
        return np.mean([np.mean(_executed_by_hand(_gated_by_targets(model, variables, x, t)))
                        for x in batches])

    # Bisection's claim: the smallest threshold, to 2**-20, that reaches 1 - 0.5.
    below, at = by_hand(threshold - 2 ** -ftwt.THRESHOLD_BITS), by_hand(threshold)
    assert below < 0.5 <= at
    # The count moves in steps: one channel of one of the 16 inputs moves it by up to
    # (16 * 9 * 8 + 16 * 9 * 16) / 69168 / 16 = 0.3 % (a conv1 channel), a little more
    # where that moves the next layer's targets or, through BatchNorm's batch statistics,
    # its batch's (0.5 % here): a few such steps bound the miss.
    assert at - 0.5 <= at - below < 0.01


def test_the_threshold_stays_fixed_in_a_train_step():
    model, x, variables = _model_and_variables()
    stats = {**variables["batch_stats"], "mass_threshold": jnp.asarray(0.8)}
    tx = with_heads(ftwt.heads_optimizer(10), ftwt.backbone_optimizer(10))
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], stats,
                       tx.init(variables["params"]))
    step = jax.jit(make_train_step(model, tx, masked=False, loss_term=gating_loss,
                                   axis_name=None))
    new, _ = step(state, x, jnp.arange(6) % 3)
    assert float(new.batch_stats["mass_threshold"]) == pytest.approx(0.8)
    assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])


def test_ftwt_trains_with_ftwts_optimizers():
    """Backbone: lr 1e-2, x0.1 at 81, 122 and 151 of 200 epochs, weight decay 5e-4, in
    place of the run's weight links. Heads: lr 0.1 on the gradient times the mask-loss
    weight, 1 for the first half, then 0, after which they coast on their momentum."""
    lr = ftwt.backbone_lr(200)
    assert [float(lr(s)) for s in (0, 80, 81, 121, 122, 150, 151, 199)] == pytest.approx(
        [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    budget = methods.Budget(0.5, pruning_steps=150, regrowth_steps=50, steps_per_epoch=1,
                            controller_period=1, controller="trajectory", presence_lr=None,
                            weight_lr=None, regrowth_allowance=0.0, distribution=None, seed=0,
                            scoring=None, channel_groups=None)
    method = methods.get("ftwt")
    assert method.learning_rates(budget, 100) == {"lr": pytest.approx(1e-3), "heads_lr": 0.1,
                                                  "mask_loss_weight": 0.0}
    params = {"Conv_0": {"kernel": jnp.ones(2)}, "Gate_0": {"kernel": jnp.ones(2)}}
    ones = jax.tree.map(jnp.ones_like, params)
    tx = method.optimizer(budget, optax.sgd(1.0))  # the weight link gives way
    updates, opt_state = tx.update(ones, tx.init(params), params)
    np.testing.assert_allclose(updates["Conv_0"]["kernel"], -1e-2 * (1 + 5e-4), rtol=1e-6)
    np.testing.assert_allclose(updates["Gate_0"]["kernel"], -0.1, rtol=1e-6)
    for _ in range(99):  # to step 100, where the mask loss weighs 0
        updates, opt_state = tx.update(ones, opt_state, params)
    momentum = -updates["Gate_0"]["kernel"] / 0.1
    updates, _ = tx.update(ones, opt_state, params)
    np.testing.assert_allclose(updates["Gate_0"]["kernel"], -0.1 * 0.9 * momentum, rtol=1e-6)


def _executed_by_hand(on):
    """Per input, the fraction of SMALL_VGG's multiply-adds on 8x8 images that the channel
    masks ``on`` (one (batch, channels) array per conv) execute: conv l costs
    H_l * W_l * 9 * (active inputs) * (active outputs), the classifier (active last) * 3."""
    positions, widths = [64, 16, 16], [3, 8, 16, 16]
    dense = sum(p * 9 * widths[i] * widths[i + 1] for i, p in enumerate(positions)) + 16 * 3
    fractions = []
    for n in range(len(on[0])):
        active = [3] + [int(m[n].sum()) for m in on]
        macs = sum(p * 9 * active[i] * active[i + 1] for i, p in enumerate(positions))
        fractions.append((macs + active[-1] * 3) / dense)
    return fractions


def _gated_by_targets(model, variables, x, threshold):
    """The target masks of a forward pass with ``gate_by_targets``, checked to gate: the
    second conv sees the first's ReLU output, max-pooled, times its target mask."""
    stats = {**variables["batch_stats"], "mass_threshold": jnp.asarray(threshold)}
    _, sown = model.apply({**variables, "batch_stats": stats}, x, train=True,
                          gate_by_targets=True, capture_intermediates=True,
                          mutable=["intermediates", "batch_stats"])
    inter = sown["intermediates"]
    targets = [np.asarray(t) for t in inter["gate_targets"]]
    first = jax.nn.relu(inter["BatchNorm_0"]["__call__"][0]) * targets[0][:, None, None, :]
    pooled = jax.lax.reduce_window(first, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                   "VALID")
    conv = jax.lax.conv_general_dilated(pooled, variables["params"]["Conv_1"]["kernel"],
                                        (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv, inter["Conv_1"]["__call__"][0], rtol=1e-4, atol=1e-5)
    return targets


def test_ftwt_errors():
    with pytest.raises(ValueError, match="vgg19 and basic-block ResNets"):
        to_ftwt(object(), 0.5)
    with pytest.raises(ValueError, match="basic-block"):
        to_ftwt(models.ResNet50(num_classes=3), 0.5)


@pytest.mark.slow
def test_resnet_gates_every_conv_the_second_before_the_add_and_counts_per_input():
    """FTWT's ResNet: a head on the stem and on both convs of every block; the block's
    output is relu(residual + second conv's output * its mask); the multiply-adds by hand,
    a block's first conv reading all its input channels, projection and classifier whole."""
    plain = models.ResNet(stage_sizes=(1, 1), block_cls=models.resnet.ResNetBlock,
                          num_filters=4, num_classes=3, zero_init_residual=False)
    model = to_ftwt(plain, 0.5)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    params = jax.tree.map_with_path(  # heads spread, so masks differ from input to input
        lambda p, v: v * 20 if is_gate(ftwt.path_of(p)) and p[-1].key == "kernel" else v,
        variables["params"])
    variables = {**variables, "params": params}
    gates = sorted(ftwt.path_of(p) for p, _ in jax.tree.leaves_with_path(params)
                   if is_gate(ftwt.path_of(p)) and p[-1].key == "kernel")
    assert gates == ["Gate_0/kernel", "ResNetBlock_0/Gate_0/kernel",
                     "ResNetBlock_0/Gate_1/kernel", "ResNetBlock_1/Gate_0/kernel",
                     "ResNetBlock_1/Gate_1/kernel"]
    # The rest is the plain ResNet's, by path and shape; a dense ResNet's variables taken
    # over keep the heads, inside the blocks too.
    dense = plain.init(jax.random.key(2), x)
    rest = {ftwt.path_of(p): v.shape for p, v in jax.tree.leaves_with_path(params)
            if not is_gate(ftwt.path_of(p))}
    assert rest == {ftwt.path_of(p): v.shape
                    for p, v in jax.tree.leaves_with_path(dense["params"])}
    taken, _ = methods.get("ftwt").take_over((params, variables["batch_stats"]),
                                             (dense["params"], dense["batch_stats"]))
    np.testing.assert_array_equal(taken["ResNetBlock_0"]["Gate_1"]["kernel"],
                                  params["ResNetBlock_0"]["Gate_1"]["kernel"])
    np.testing.assert_array_equal(taken["ResNetBlock_0"]["Conv_1"]["kernel"],
                                  dense["params"]["ResNetBlock_0"]["Conv_1"]["kernel"])

    _, out = model.apply(variables, x, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
    inter = out["intermediates"]
    on = [np.asarray(g) > 0 for g in ftwt.sown(inter, "gate_logits")]
    assert 0 < np.mean([m.mean() for m in on]) < 1
    # Tree order: the stem's head (top level) after the blocks' (ResNetBlock_0, _1).
    b0a, b0b, b1a, b1b, stem = on
    block = inter["ResNetBlock_0"]
    z = block["BatchNorm_1"]["__call__"][0] * b0b[:, None, None, :]
    residual = jax.nn.relu(inter["bn_init"]["__call__"][0]) * stem[:, None, None, :]
    np.testing.assert_allclose(block["__call__"][0], jax.nn.relu(residual + z), rtol=1e-5,
                               atol=1e-6)
    active = lambda m: m.sum(-1)  # noqa: E731
    executed = (64 * 9 * 3 * active(stem) + 64 * 9 * 4 * active(b0a)
                + 64 * 9 * active(b0a) * active(b0b) + 16 * 9 * 4 * active(b1a)
                + 16 * 9 * active(b1a) * active(b1b) + 16 * 4 * 8 + 8 * 3)
    dense_macs = 64 * 9 * 3 * 4 + 64 * 9 * 16 * 2 + 16 * 9 * 4 * 8 + 16 * 9 * 64 + 16 * 32 + 24
    np.testing.assert_allclose(ftwt.executed_fraction(inter), executed / dense_macs,
                               rtol=1e-6)
