"""Mask helpers on opt states, inside chains, and on export."""

import jax
import jax.numpy as jnp
import optax
import pytest

import hflows_jax as hf
from hflows_jax import masking


def test_default_is_prunable_takes_kernels_only():
    shapes = {"conv": (3, 3, 4, 8), "dense": (10, 5), "bias": (5,), "scale": (8,)}
    got = {k: hf.default_is_prunable((), jax.ShapeDtypeStruct(s, jnp.float32))
           for k, s in shapes.items()}
    assert got == {"conv": True, "dense": True, "bias": False, "scale": False}


def test_finalize_zeros_exactly_even_non_finite_weights():
    params = {"w": jnp.array([[1.0, jnp.nan], [jnp.inf, -2.0]]), "b": jnp.array([jnp.nan])}
    state = hf.hyperflows(hf.pressure.constant(1.0)).init(params)
    state = state._replace(presence={"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]]), "b": None})
    final = hf.finalize(params, state)
    assert final["w"].tolist() == [[1.0, 0.0], [0.0, -2.0]]
    assert jnp.isnan(final["b"][0])  # not prunable: left alone
    effective = hf.apply_masks(params, state)
    assert jnp.isnan(effective["w"][0, 1])  # W * M keeps NaN * 0: finalize is the export path


def test_count_present_and_mismatched_params():
    params = {"a": jnp.ones((2, 5)), "b": jnp.ones((4, 5)), "c": jnp.ones(5)}
    state = hf.hyperflows(hf.pressure.constant(1.0)).init(params)
    present, total = masking.count_present(hf.masks(state))
    assert (int(present), total) == (30, 30)
    with pytest.raises(ValueError, match="structure of params"):
        hf.apply_masks({"a": params["a"]}, state)


def test_two_pruners_in_one_state_is_an_error():
    params = {"a": jnp.ones((2, 5))}
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(1.0)),
                     hf.hyperflows(hf.pressure.constant(1.0)))
    with pytest.raises(ValueError, match="2 pruning states"):
        hf.masks(tx.init(params))
