"""FTWT against hand computations: the heatmap-mass target, the decoupled gating loss (no
gradient into the backbone), executed multiply-adds counted per input, and the steered
mass threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hflows_jax.structured.ftwt import (THRESHOLD_RATE, FTWTVGG, gating_loss, is_gate,
                                        mass_target, to_ftwt, with_heads)

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
    positions, widths = [64, 16, 16], [3, 8, 16, 16]
    dense = sum(p * 9 * widths[i] * widths[i + 1] for i, p in enumerate(positions)) + 16 * 3
    want = []
    for n in range(len(x)):
        active = [3] + [int(m[n].sum()) for m in on]
        macs = sum(p * 9 * active[i] * active[i + 1] for i, p in enumerate(positions))
        want.append((macs + active[-1] * 3) / dense)
    got = np.asarray(inter["executed_fraction"][0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(set(np.round(want, 6))) > 1, "masks should differ between inputs"
    # The masks multiply the channels: a gated-off channel of the last conv feeds nothing.
    assert 0 < np.mean([m.mean() for m in on]) < 1


def test_mass_threshold_steps_towards_the_flops_target_by_the_executed_flops():
    model, x, variables = _model_and_variables()
    _, sown = model.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"])
    kept = float(np.mean(sown["intermediates"]["executed_fraction"][0]))  # checked above
    old = float(variables["batch_stats"]["mass_threshold"])
    new = float(sown["batch_stats"]["mass_threshold"])
    assert new == pytest.approx(np.clip(old + THRESHOLD_RATE * (0.5 - kept), 0, 1), abs=1e-6)


def test_ftwt_errors():
    with pytest.raises(ValueError, match="vgg19 only"):
        to_ftwt(object(), 0.5)
