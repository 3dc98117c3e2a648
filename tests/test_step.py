"""The one masked train step and the one-program eval step, against plain computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.training import TrainState, make_eval_step, make_train_step
from hflows_jax.training.step import smoothed_cross_entropy


def setup(tx):
    model = models.create("resnet20", 10, width=0.25)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    variables = model.init(jax.random.key(2), x[:1])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"],
                       variables["batch_stats"], tx.init(variables["params"]))
    return model, state, x, y


@pytest.mark.slow
def test_train_step_differentiates_the_loss_at_the_masked_weights():
    tx = optax.chain(hf.baselines.random(0.7, "uniform"), optax.sgd(0.1))
    model, state, x, y = setup(tx)
    new_state, metrics = jax.jit(make_train_step(model, tx, masked=True, label_smoothing=0.1,
                                                 axis_name=None))(state, x, y)

    def loss(weights):  # written out: BatchNorm in training mode on W * M
        logits, updated = model.apply({"params": weights, "batch_stats": state.batch_stats},
                                      x, train=True, mutable=["batch_stats"])
        return smoothed_cross_entropy(logits, y, 0.1), updated["batch_stats"]

    masks = hf.masks(state.opt_state)
    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(
        hf.apply_masks(state.params, state.opt_state))
    assert float(metrics["loss"]) == pytest.approx(float(value), rel=1e-6)
    want = jax.tree.map(lambda p, g, m: p - 0.1 * (g if m is None else g * m),
                        state.params, grads, masks, is_leaf=lambda v: v is None)
    chex.assert_trees_all_close(new_state.params, want, atol=1e-6)
    chex.assert_trees_all_close(new_state.batch_stats, batch_stats, atol=1e-6)
    assert int(new_state.step) == 1
    pruned = ~masks["conv_init"]["kernel"]
    assert jnp.all(new_state.params["conv_init"]["kernel"][pruned]
                   == state.params["conv_init"]["kernel"][pruned])


def test_eval_step_scans_every_batch_and_ignores_padding():
    tx = optax.sgd(0.1)
    model, state, x, y = setup(tx)
    images = jnp.concatenate([x, jnp.zeros_like(x[:4])]).reshape(3, 4, 32, 32, 3)
    labels = jnp.concatenate([y, jnp.zeros_like(y[:4])]).reshape(3, 4)
    valid = jnp.concatenate([jnp.ones(8), jnp.zeros(4)]).reshape(3, 4)
    correct, count = jax.jit(make_eval_step(model, masked=False, axis_name=None))(
        state, images, labels, valid)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
    assert float(count) == 8
    assert float(correct) == float(np.sum(np.argmax(logits, -1) == y))
