"""Multiply-adds of a forward pass against a hand count."""

import jax
import jax.numpy as jnp

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.flops import forward_macs


def test_forward_macs_against_hand_count():
    model = models.create("lenet5", 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    # conv 5x5x1x6 at 24x24, conv 5x5x6x16 at 8x8, dense 256x120, 120x84, 84x10
    dense = 150 * 576 + 2400 * 64 + 256 * 120 + 120 * 84 + 84 * 10
    tx = hf.hyperflows(hf.pressure.constant(1.0))
    state = tx.init(variables["params"])
    presence = jax.tree.map(lambda t: t, state.presence)
    presence["Conv_1"]["kernel"] = presence["Conv_1"]["kernel"].at[:, :, :3, :].set(-1.0)
    presence["Dense_0"]["kernel"] = -jnp.ones_like(presence["Dense_0"]["kernel"])
    masks = hf.masks(state._replace(presence=presence))
    got_dense, got_sparse = forward_macs(model, variables["params"], (28, 28, 1), masks)
    assert got_dense == dense
    assert got_sparse == dense - (5 * 5 * 3 * 16) * 64 - 256 * 120
    # The same through a function of params and a batch, as a user's model gives it.
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    assert forward_macs(fn, variables["params"], jnp.ones((3, 28, 28, 1)), masks) == (
        got_dense, got_sparse)
