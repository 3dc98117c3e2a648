"""Mask helpers on opt states, inside chains, and on export."""

from typing import Any, NamedTuple

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


class FixedMasks(NamedTuple):
    """A pruner state written outside the package: the protocol is all it needs."""

    fixed: Any

    def pruning_masks(self):
        return self.fixed


def test_any_namedtuple_with_pruning_masks_is_a_pruner_state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    mask = jnp.array([[True, False, True], [False, False, True]])
    state = (optax.sgd(0.1).init(params), FixedMasks({"w": mask, "b": None}))
    assert isinstance(state[1], hf.PrunerState)
    assert not isinstance(state[0], hf.PrunerState)
    assert hf.find_pruner_state(state) is state[1]
    assert float(hf.sparsity(state)) == 0.5
    assert hf.apply_masks(params, state)["w"].tolist() == [[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]]


def test_multiply_masks_keeps_dtype_and_non_prunable_leaves():
    tree = {"w": jnp.full((2, 2), 3.0, jnp.bfloat16), "b": jnp.full(2, jnp.nan)}
    out = hf.multiply_masks(tree, {"w": jnp.array([[True, False], [False, True]]), "b": None})
    assert out["w"].dtype == jnp.bfloat16 and out["w"].tolist() == [[3.0, 0.0], [0.0, 3.0]]
    assert out["b"] is tree["b"]


def test_prunable_like_indexes_every_leaf_and_needs_one_prunable():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "c": jnp.ones((1, 2))}
    assert hf.prunable_like(params, None, lambda i, leaf: i) == {"a": None, "b": 1, "c": 2}
    only_c = lambda path, leaf: jax.tree_util.keystr(path) == "['c']"  # noqa: E731
    assert hf.prunable_like(params, only_c, lambda i, leaf: i) == {"a": None, "b": None, "c": 2}
    with pytest.raises(ValueError, match="no prunable leaf"):
        hf.prunable_like({"a": jnp.ones(3)}, None, lambda i, leaf: i)


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
