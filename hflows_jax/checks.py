"""Misuse of a pruner that can be seen from its optimizer state and one step's gradients.

Two mistakes train without an error and report a sparsity while the network does not
prune as it should:

* the pruner chained *after* the weight optimizer (``optax.chain(optax.sgd(...),
  hf.hyperflows(...))``): it then receives updates (``-lr * grad``, or Adam's
  normalized steps) instead of gradients, and its flows point the wrong way. Seen here
  when a transformation with an optimizer's state (momentum, Adam moments, a learning-rate
  schedule, injected ``learning_rate``) comes before the pruner in the chain. Plain
  ``optax.sgd(lr)`` without momentum keeps no state and cannot be told from
  ``optax.identity()``: that placement is not seen.
* the gradient taken through ``hf.apply_masks`` (with respect to ``W``, not ``W * M``):
  every pruned entry then gets an exactly zero gradient and no flow, so no weight can
  regrow. With respect to ``W * M``, a pruned entry's gradient is zero only where its
  input or output unit is dead, so zeros on *every* pruned entry, with gradient
  elsewhere, are the sign.

Forgetting ``hf.apply_masks`` in the forward pass cannot be seen here: the gradients of
the dense network and of the masked one look alike to the optimizer. The helpers
``hf.masked_value_and_grad`` and ``hf.nnx.masked_value_and_grad`` apply the masks
themselves, so the mistake cannot be made with them.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking

PyTree = Any

MIN_PRUNED = 16  # fewer pruned entries than this prove nothing about the gradient


def _is_optimizer_state(x: Any) -> bool:
    """A state that only a transformation scaling gradients into updates keeps."""
    if isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict):
        return "learning_rate" in x.hyperparams  # optax.inject_hyperparams of an optimizer
    return isinstance(x, tuple) and (type(x).__name__.startswith("ScaleBy")
                                      or isinstance(x, optax.TraceState))


def _contains_optimizer_state(tree: PyTree) -> bool:
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: _is_optimizer_state(x)
                            or masking._is_pruner_state(x))
    return any(_is_optimizer_state(x) for x in nodes)


def _before_the_pruner(node: PyTree) -> list | None:
    """The states of the transformations chained before the pruner in ``node`` (an
    ``optax.chain`` state is a plain tuple), or None if no pruner state is in ``node``."""
    if masking._is_pruner_state(node):
        return []
    children = jax.tree.leaves(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:  # an array
        return None
    for i, child in enumerate(children):
        found = _before_the_pruner(child)
        if found is not None:
            return (list(children[:i]) if type(node) is tuple else []) + found
    return None


def check(opt_state: PyTree, grads: PyTree | None = None) -> list[str]:
    """What is wrong in the way the pruner is used, as far as it shows; each finding is
    also issued as a ``UserWarning`` (Python shows each one once).

    Call it once, after the first step, outside ``jax.jit``. ``grads`` (optional) is one
    step's gradient as passed to ``tx.update``; ``opt_state`` may be an NNX optimizer's.
    """
    opt_state = masking.unwrap_nnx(opt_state)
    state = masking.find_pruner_state(opt_state)
    found = []
    if any(map(_contains_optimizer_state, _before_the_pruner(opt_state) or [])):
        found.append("the pruner is chained after a transformation that turns gradients "
                     "into updates (an optimizer): it receives updates, and its flows point "
                     "the wrong way. Chain it first: optax.chain(hf.hyperflows(...), "
                     "optax.sgd(...)).")
    if grads is not None:
        mask_tree = state.pruning_masks()
        grads = masking.unwrap_nnx(grads)
        masking.check_same_structure("gradients", grads, mask_tree)
        pairs = list(zip(masking.prunable_leaves(mask_tree), masking.prunable_leaves(
            masking.map_prunable(lambda m, g: g, mask_tree, grads))))
        count = sum(int(jnp.sum(~m)) for m, _ in pairs)
        on_pruned = sum(float(jnp.sum(jnp.where(m, 0, jnp.abs(g)))) for m, g in pairs)
        on_present = sum(float(jnp.sum(jnp.where(m, jnp.abs(g), 0))) for m, g in pairs)
        if count >= MIN_PRUNED and on_pruned == 0 and on_present > 0:
            found.append(f"the gradient is exactly 0 on all {count} pruned weights: it was "
                         "taken with respect to W through hf.apply_masks, so pruned weights "
                         "get no flow and cannot regrow. Take it with respect to the "
                         "effective weights W * M (hf.masked_value_and_grad).")
    for message in found:
        warnings.warn(f"hf.check: {message}", UserWarning, stacklevel=2)
    return found
