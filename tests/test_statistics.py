"""BatchNorm statistics re-estimated for the current masks: one batch's statistics against a
hand computation, and a net whose masks jump right before an evaluation, which reads chance
on its running statistics and its true accuracy on re-estimated ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.training.state import TrainState
from hflows_jax.training.step import (batch_statistics, make_eval_step, make_train_step,
                                      mean_statistics)


def _data(n, seed):
    """Four classes of 8x8 images: the bright quadrant is the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.3, (n, 8, 8, 3)).astype(np.float32)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    return x, y.astype(np.int32)


def test_batch_statistics_are_the_batch_mean_and_variance():
    model = models.VGG(layers=(4,), num_classes=2)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    stats = batch_statistics(model, variables, x)
    conv = jax.lax.conv_general_dilated(x, variables["params"]["Conv_0"]["kernel"], (1, 1),
                                        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], conv.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], conv.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    twice = mean_statistics([stats, jax.tree.map(lambda s: 3 * s, stats)],
                            variables["batch_stats"])
    np.testing.assert_allclose(twice["BatchNorm_0"]["mean"], 2 * stats["BatchNorm_0"]["mean"],
                               rtol=1e-6)


@pytest.mark.slow
def test_a_mask_jump_reads_chance_on_running_statistics_and_recovers_on_fresh_ones():
    model = models.VGG(layers=(16, "M", 32), num_classes=4)
    x, y = _data(512, 0)
    x_test, y_test = _data(256, 1)
    variables = model.init(jax.random.key(0), x[:1])
    tx = optax.sgd(0.05, momentum=0.9)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"],
                       variables["batch_stats"], tx.init(variables["params"]))
    step = jax.jit(make_train_step(model, tx, masked=False, axis_name=None))
    for i in range(150):
        batch = slice((i % 8) * 64, (i % 8) * 64 + 64)
        state, _ = step(state, x[batch], y[batch])
    evaluate = jax.jit(make_eval_step(model, masked=False, axis_name=None))

    def accuracy(s):
        correct, count = evaluate(s, x_test[None], y_test[None], np.ones((1, 256), np.float32))
        return float(correct / count)

    assert accuracy(state) > 0.95
    # The jump: every kernel keeps its 2 % largest weights at once.
    pruner = hf.baselines.magnitude(0.98, end_step=1, update_every=1, distribution="uniform")
    masks = hf.masks(pruner.update(state.params, pruner.init(state.params), state.params)[1])
    jumped = state._replace(params=hf.multiply_masks(state.params, masks))
    stale = accuracy(jumped)
    fresh_stats = mean_statistics(
        [batch_statistics(model, {"params": jumped.params, "batch_stats": jumped.batch_stats},
                          x[i:i + 64]) for i in range(0, 512, 64)], jumped.batch_stats)
    fresh = accuracy(jumped._replace(batch_stats=fresh_stats))
    # The oracle: the jumped net normalized by the whole test set's own statistics.
    logits, _ = model.apply({"params": jumped.params, "batch_stats": jumped.batch_stats},
                            x_test, train=True, mutable=["batch_stats"])
    true = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    assert stale < 0.35, stale  # chance is 0.25
    assert true > 0.7 and abs(fresh - true) < 0.05, (fresh, true)
