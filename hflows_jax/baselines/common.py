"""What every mask-based pruner shares: gating the gradient and checking its inputs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hflows_jax import masking


def gate(grads: Any, masks: Any) -> Any:
    """``grads * M`` on prunable leaves: a pruned weight receives no task gradient."""
    return jax.tree.map(lambda m, g: g if m is None else g * m.astype(g.dtype), masks, grads,
                        is_leaf=lambda x: x is None)


def prunable_like(params: Any, is_prunable: masking.IsPrunable, fill) -> Any:
    """``fill(leaf)`` on prunable leaves, None elsewhere; fails clearly when there is none."""
    out = jax.tree_util.tree_map_with_path(
        lambda path, p: fill(p) if is_prunable(path, p) else None, params)
    if not masking.prunable_leaves(out):
        raise ValueError("no prunable leaf in params (by default, leaves of rank >= 2: conv "
                         "and dense kernels). Check is_prunable.")
    return out


def check_update_args(grads: Any, params: Any, masks: Any) -> None:
    if params is None:
        raise ValueError("this pruner needs the params: call tx.update(grads, opt_state, params).")
    masking.check_same_structure("gradients", grads, params)
    masking.check_same_structure("masks in the optimizer state", masks, params)


def all_ones(p) -> jax.Array:
    return jnp.ones(p.shape, bool)
