"""The pruner contract, and what every pruner shares: prunable leaves, masks, statistics.

Every pruner in this package (Hyperflows and the baselines) keeps its masks inside its
optax state, a NamedTuple satisfying :class:`PrunerState`. The helpers here find that
state anywhere in an optimizer state (inside ``optax.chain``, ``optax.MultiSteps``,
``optax.inject_hyperparams``, ...) so users never have to unpack the chain by hand.
Masks are trees shaped like params, boolean where a leaf is prunable and ``None``
where it is not.

Flax NNX works too: the helpers take ``nnx.Optimizer.opt_state`` (every leaf wrapped in an
``OptVariable``/``OptArray``) and ``nnx.state(model, nnx.Param)`` (leaves wrapped in
``Param``). They read the values inside those wrappers (:func:`unwrap_nnx`); helpers that
return params return them in the wrappers they were given, ready for ``nnx.update``.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.tree_util import keystr

PyTree = Any
IsPrunable = Callable[[tuple, Any], bool]


@runtime_checkable
class PrunerState(Protocol):
    """The pruner contract: an optax state (a NamedTuple) that knows its masks.

    ``pruning_masks()`` returns boolean masks shaped like params, ``None`` on leaves
    that are not prunable. Any NamedTuple state whose type defines it works with
    ``hf.masks``, ``hf.sparsity``, ``hf.apply_masks`` and ``hf.finalize``.
    """

    def pruning_masks(self) -> PyTree: ...


@runtime_checkable
class ChannelPrunerState(PrunerState, Protocol):
    """A pruner that removes whole channels (channel Hyperflows, DHP): ``channel_masks()``
    maps each channel group's name to a boolean per channel, kept or not."""

    def channel_masks(self) -> dict: ...


@runtime_checkable
class PressureState(PrunerState, Protocol):
    """A pruner driven by a pressure (Hyperflows, weights or channels): ``pressure_value()``
    is the pressure the next step applies."""

    def pressure_value(self) -> jax.Array: ...


@runtime_checkable
class SkippingState(PrunerState, Protocol):
    """A pruner that skips steps whose gradients hold NaN or Inf: ``skipped_steps()``
    counts them."""

    def skipped_steps(self) -> jax.Array: ...


def default_is_prunable(path: tuple, leaf: Any) -> bool:
    """Conv and dense kernels: every leaf of rank >= 2. Biases and norm scales are rank 1."""
    del path
    return len(leaf.shape) >= 2


def path_name(path: tuple) -> str:
    """A leaf's name as :func:`layer_sparsity` keys it: ``'Conv_0/kernel'``.

    ``is_prunable`` receives the jax key path itself (``(DictKey('Conv_0'),
    DictKey('kernel'))``, printed ``['Conv_0']['kernel']``); ``path_name(path)`` turns it
    into that name, so a rule can be written against the names ``layer_sparsity`` shows.
    """
    return keystr(path, simple=True, separator="/")


def is_static_number(x: Any) -> bool:
    """Whether ``x`` is a Python (or NumPy) number, which can be validated at construction.

    Arrays are left unchecked: under ``optax.inject_hyperparams`` they may be traced.
    """
    return isinstance(x, numbers.Number)


def _is_none(x: Any) -> bool:
    return x is None


def unwrap_nnx(tree: PyTree) -> PyTree:
    """Every Flax NNX Variable in ``tree`` (``Param``, ``OptVariable``, ...) replaced by its value.

    A tree without NNX Variables (linen params, optax states) comes back as it is.
    """
    # NNX Variables exist only once flax.nnx is loaded: no import here, and none needed.
    # (Since flax 0.11, nnx.state leaves are Variables too: VariableState is an alias.)
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if not any(map(is_variable, jax.tree.leaves(tree, is_leaf=is_variable))):
        return tree
    return jax.tree.map(lambda x: (x.get_value() if hasattr(x, "get_value") else x.value)
                        if is_variable(x) else x, tree, is_leaf=is_variable)


def rewrap_nnx(like: PyTree, tree: PyTree) -> PyTree:
    """``tree`` (shaped like ``unwrap_nnx(like)``) in the NNX Variables of ``like``, if any."""
    if unwrap_nnx(like) is like:
        return tree
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))


def map_prunable(fn: Callable, like: PyTree, *trees: PyTree) -> PyTree:
    """``jax.tree.map`` over the prunable leaves of ``like`` (non-None), keeping None elsewhere."""
    return jax.tree.map(lambda t, *xs: None if t is None else fn(t, *xs),
                        like, *trees, is_leaf=_is_none)


def prunable_like(params: PyTree, is_prunable: IsPrunable | None,
                  fill: Callable[[int, Any], Any]) -> PyTree:
    """``fill(index, leaf)`` on prunable leaves, ``None`` elsewhere.

    ``index`` counts every leaf of params, prunable or not, in tree order.
    ``is_prunable=None`` means :func:`default_is_prunable`.

    Raises:
      ValueError: if no leaf is prunable.
    """
    is_prunable = default_is_prunable if is_prunable is None else is_prunable
    leaves, treedef = jax.tree.flatten_with_path(unwrap_nnx(params))
    out = [fill(i, leaf) if is_prunable(path, leaf) else None
           for i, (path, leaf) in enumerate(leaves)]
    if all(x is None for x in out):
        raise ValueError("no prunable leaf in params (by default, leaves of rank >= 2: conv "
                         "and dense kernels). Check is_prunable.")
    return jax.tree.unflatten(treedef, out)


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


def check_update_args(grads: PyTree, params: PyTree | None, mask_tree: PyTree) -> None:
    """The checks every pruner's ``update`` makes on its inputs."""
    if params is None:
        raise ValueError("this pruner needs the params: call tx.update(grads, opt_state, params).")
    check_same_structure("gradients", grads, params)
    check_same_structure("masks in the optimizer state", mask_tree, params)


def _map_masked(fn: Callable, tree: PyTree, mask_tree: PyTree) -> PyTree:
    """``fn(m, x)`` where the mask is set; leaves where it is None unchanged."""
    check_same_structure("masks", mask_tree, tree)
    return jax.tree.map(lambda m, x: x if m is None else fn(m, x), mask_tree, tree,
                        is_leaf=_is_none)


def multiply_masks(tree: PyTree, mask_tree: PyTree) -> PyTree:
    """``x * M`` on prunable leaves, in the dtype of ``x``; leaves where M is None unchanged."""
    out = _map_masked(lambda m, x: x * m.astype(x.dtype), unwrap_nnx(tree), unwrap_nnx(mask_tree))
    return rewrap_nnx(tree, out)


def _is_pruner_state(x: Any) -> bool:
    # The structural check of PrunerState, restricted to tuples (optax states).
    return isinstance(x, tuple) and callable(getattr(type(x), "pruning_masks", None))


def _looks_like_masks(tree: PyTree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(getattr(x, "dtype", None) == jnp.bool_ for x in leaves)


def has_pruner_state(opt_state: PyTree) -> bool:
    """Whether ``opt_state`` holds a pruning state (e.g. pruning switched off by a flag)."""
    opt_state = unwrap_nnx(opt_state)
    return _is_pruner_state(opt_state) or any(
        _is_pruner_state(s) for s in jax.tree.leaves(opt_state, is_leaf=_is_pruner_state))


def find_pruner_state(opt_state: PyTree) -> PrunerState:
    """The one :class:`PrunerState` (a NamedTuple) inside an optimizer state.

    In an NNX optimizer state, the pruner state comes back with plain values in its fields.
    """
    opt_state = unwrap_nnx(opt_state)
    if _is_pruner_state(opt_state):
        return opt_state
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_pruner_state)
             if _is_pruner_state(s)]
    if not found and _looks_like_masks(opt_state):
        raise ValueError("This is a tree of masks, not an optimizer state: pass the "
                         "optimizer state (it holds the masks), or apply these masks with "
                         "hf.multiply_masks(params, masks).")
    if not found:
        raise ValueError("No pruning state found in this optimizer state: chain "
                         "hf.hyperflows(...) or a baseline pruner into the optimizer.")
    if len(found) > 1:
        raise ValueError(f"Found {len(found)} pruning states in this optimizer state; "
                         "pass the one you mean directly.")
    return found[0]


def replace_pruner_state(opt_state: PyTree, new: PrunerState) -> PyTree:
    """``opt_state`` with its one pruner state (``find_pruner_state``) replaced by ``new``."""
    find_pruner_state(opt_state)  # exactly one, or a clear error
    return jax.tree.map(lambda s: new if _is_pruner_state(s) else s, opt_state,
                        is_leaf=_is_pruner_state)


def masks(opt_state: PyTree) -> PyTree:
    """Boolean masks shaped like params (``None`` for non-prunable leaves)."""
    return find_pruner_state(opt_state).pruning_masks()


def channel_masks(opt_state: PyTree) -> dict:
    """Channel group name -> boolean per channel, kept or not (a channel pruner's state)."""
    state = find_pruner_state(opt_state)
    if not isinstance(state, ChannelPrunerState):
        raise ValueError(f"channel_masks needs a channel pruner's state (channel Hyperflows, "
                         f"DHP), got {type(state).__name__}.")
    return state.channel_masks()


def pressure_value(opt_state: PyTree) -> jax.Array:
    """The pressure gamma the next step applies (Hyperflows, weights or channels)."""
    state = find_pruner_state(opt_state)
    if not isinstance(state, PressureState):
        raise ValueError(f"pressure_value needs a Hyperflows state, got {type(state).__name__}.")
    return state.pressure_value()


def skipped_steps(opt_state: PyTree) -> jax.Array:
    """Steps the pruner skipped for NaN or Inf gradients; 0 for a pruner that never skips."""
    state = find_pruner_state(opt_state)
    if isinstance(state, SkippingState):
        return state.skipped_steps()
    return jnp.zeros((), jnp.int32)


def apply_masks(params: PyTree, opt_state: PyTree, missing: str = "raise") -> PyTree:
    """The effective weights ``W * M`` the network runs on (differentiable in W).

    ``missing="ignore"`` returns ``params`` unchanged when ``opt_state`` holds no pruning
    state, so one training step serves runs with pruning on and off; the default raises,
    since a pruned run without masks in its forward pass trains the dense network.
    """
    if missing not in ("raise", "ignore"):
        raise ValueError(f"missing must be 'raise' or 'ignore', got {missing!r}.")
    if missing == "ignore" and not has_pruner_state(opt_state):
        return params
    return multiply_masks(params, masks(opt_state))


def masked_value_and_grad(fn: Callable, *, has_aux: bool = False,
                          missing: str = "raise") -> Callable:
    """``jax.value_and_grad(fn)`` at the effective weights: the gradient w.r.t. ``W * M``.

    Returns ``grad_fn(params, opt_state, *args)``, which evaluates ``fn(W * M, *args)``;
    its gradients go to ``tx.update(grads, opt_state, params)``. Hyperflows needs this
    gradient (not the one w.r.t. ``W`` through the mask, which is 0 on pruned weights): the
    flow ``W * grad`` of a pruned weight is what lets it regrow. ``missing`` as in
    :func:`apply_masks`.
    """
    value_and_grad = jax.value_and_grad(fn, has_aux=has_aux)

    def grad_fn(params, opt_state, *args, **kwargs):
        return value_and_grad(apply_masks(params, opt_state, missing), *args, **kwargs)

    return grad_fn


def finalize(params: PyTree, opt_state: PyTree) -> PyTree:
    """Params with every pruned entry exactly 0 (even if W held inf or NaN), for export."""
    out = _map_masked(lambda m, p: jnp.where(m, p, jnp.zeros_like(p)), unwrap_nnx(params),
                      masks(opt_state))
    return rewrap_nnx(params, out)


def count_present(mask_tree: PyTree) -> tuple[jax.Array, int]:
    """(present entries, prunable entries) over all prunable leaves."""
    leaves = prunable_leaves(mask_tree)
    present = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    return present, sum(m.size for m in leaves)


def density_of(mask_tree: PyTree) -> jax.Array:
    """Global fraction of prunable entries present, a float32 scalar."""
    present, total = count_present(mask_tree)
    return present.astype(jnp.float32) / total


def sparsity(opt_state: PyTree) -> jax.Array:
    """Global fraction of prunable entries that are pruned, a float32 scalar."""
    return 1.0 - density_of(masks(opt_state))


def layer_sparsity(opt_state: PyTree) -> dict[str, float | jax.Array]:
    """Fraction pruned per prunable leaf, keyed by :func:`path_name` (``'Dense_0/kernel'``).

    Python floats (ready for ``json.dumps``) when the masks are concrete; under ``jax.jit``
    the values are traced scalars.
    """
    out = {}
    for path, m in jax.tree.leaves_with_path(masks(opt_state), is_leaf=_is_none):
        if m is not None:
            value = 1.0 - jnp.mean(m, dtype=jnp.float32)
            out[path_name(path)] = value if isinstance(value, jax.core.Tracer) else float(value)
    return out
