"""Masks: which leaves are prunable, applying masks, and sparsity statistics.

Every pruner in this package (Hyperflows and the baselines) keeps its masks inside its
optax state, a NamedTuple with a ``pruning_masks()`` method. The helpers here find that
state anywhere in an optimizer state (inside ``optax.chain``, ``optax.MultiSteps``, ...)
so users never have to unpack the chain by hand. Masks are trees shaped like params,
boolean where a leaf is prunable and ``None`` where it is not.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

PyTree = Any
IsPrunable = Callable[[tuple, Any], bool]


def default_is_prunable(path: tuple, leaf: Any) -> bool:
    """Conv and dense kernels: every leaf of rank >= 2. Biases and norm scales are rank 1."""
    del path
    return len(leaf.shape) >= 2


def _is_none(x: Any) -> bool:
    return x is None


def map_prunable(fn: Callable, like: PyTree, *trees: PyTree) -> PyTree:
    """``jax.tree.map`` over the prunable leaves of ``like`` (non-None), keeping None elsewhere."""
    return jax.tree.map(lambda t, *xs: None if t is None else fn(t, *xs),
                        like, *trees, is_leaf=_is_none)


def prunable_leaves(tree: PyTree) -> list:
    """The non-None leaves of a masks or presence tree, in tree order."""
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_none) if x is not None]


def check_same_structure(name: str, tree: PyTree, params: PyTree) -> None:
    """A clear error instead of a deep jax one when two trees disagree."""
    tree_def = jax.tree.structure(tree, is_leaf=_is_none)
    params_def = jax.tree.structure(params, is_leaf=_is_none)
    if tree_def != params_def:
        raise ValueError(f"{name} do not have the structure of params.\n"
                         f"  {name}: {tree_def}\n  params: {params_def}")


def _is_pruner_state(x: Any) -> bool:
    return isinstance(x, tuple) and callable(getattr(type(x), "pruning_masks", None))


def find_pruner_state(opt_state: PyTree) -> Any:
    """The one pruner state (Hyperflows or a baseline) inside an optimizer state."""
    if _is_pruner_state(opt_state):
        return opt_state
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_pruner_state)
             if _is_pruner_state(s)]
    if not found:
        raise ValueError("No pruning state found in this optimizer state: chain "
                         "hf.hyperflows(...) or a baseline pruner into the optimizer.")
    if len(found) > 1:
        raise ValueError(f"Found {len(found)} pruning states in this optimizer state; "
                         "pass the one you mean directly.")
    return found[0]


def masks(opt_state: PyTree) -> PyTree:
    """Boolean masks shaped like params (``None`` for non-prunable leaves)."""
    return find_pruner_state(opt_state).pruning_masks()


def _masked(params: PyTree, opt_state: PyTree, fn: Callable) -> PyTree:
    mask_tree = masks(opt_state)
    check_same_structure("masks", mask_tree, params)
    return jax.tree.map(lambda m, p: p if m is None else fn(m, p), mask_tree, params,
                        is_leaf=_is_none)


def apply_masks(params: PyTree, opt_state: PyTree) -> PyTree:
    """The effective weights ``W * M`` the network runs on (differentiable in W)."""
    return _masked(params, opt_state, lambda m, p: p * m.astype(p.dtype))


def finalize(params: PyTree, opt_state: PyTree) -> PyTree:
    """Params with every pruned entry exactly 0 (even if W held inf or NaN), for export."""
    return _masked(params, opt_state, lambda m, p: jnp.where(m, p, jnp.zeros_like(p)))


def count_present(mask_tree: PyTree) -> tuple[jax.Array, int]:
    """(present entries, prunable entries) over all prunable leaves."""
    leaves = prunable_leaves(mask_tree)
    present = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    return present, sum(m.size for m in leaves)


def density_of(mask_tree: PyTree) -> jax.Array:
    present, total = count_present(mask_tree)
    return present.astype(jnp.float32) / total


def sparsity(opt_state: PyTree) -> jax.Array:
    """Global fraction of prunable entries that are pruned, a float32 scalar."""
    return 1.0 - density_of(masks(opt_state))


def layer_sparsity(opt_state: PyTree) -> dict[str, jax.Array]:
    """Fraction pruned per prunable leaf, keyed by its path (``'Dense_0/kernel'``)."""
    out = {}
    for path, m in jax.tree.leaves_with_path(masks(opt_state), is_leaf=_is_none):
        if m is not None:
            out[keystr(path, simple=True, separator="/")] = 1.0 - jnp.mean(m, dtype=jnp.float32)
    return out
