"""hflows_jax: Hyperflows pruning as an optax transformation."""

from hflows_jax import n_m, nnx, pressure, recipe
from hflows_jax.checks import check
from hflows_jax.hyperflows import HyperflowsState, flows, hyperflows
from hflows_jax.masking import (
    ChannelPrunerState,
    PressureState,
    PrunerState,
    SkippingState,
    apply_masks,
    channel_masks,
    default_is_prunable,
    finalize,
    find_pruner_state,
    has_pruner_state,
    layer_sparsity,
    masked_value_and_grad,
    masks,
    multiply_masks,
    path_name,
    pressure_value,
    prunable_like,
    skipped_steps,
    sparsity,
)

from hflows_jax import baselines  # noqa: E402  (after the core: baselines build on it)
from hflows_jax import graph  # noqa: E402  (the traced layer graph of any function)
from hflows_jax import compact  # noqa: E402
from hflows_jax.compact import export  # noqa: E402  (hf.export(fn, params, masks, example))
from hflows_jax import structured  # noqa: E402  (channel pruning)
from hflows_jax import importance  # noqa: E402  (importance measures, weights and filters)
from hflows_jax.pruning import fixed_masks, prune, prune_at  # noqa: E402  (by scores)

__all__ = [
    "baselines",
    "channel_masks",
    "compact",
    "export",
    "graph",
    "ChannelPrunerState",
    "HyperflowsState",
    "PressureState",
    "PrunerState",
    "SkippingState",
    "apply_masks",
    "check",
    "default_is_prunable",
    "finalize",
    "find_pruner_state",
    "fixed_masks",
    "flows",
    "has_pruner_state",
    "hyperflows",
    "importance",
    "layer_sparsity",
    "masked_value_and_grad",
    "masks",
    "multiply_masks",
    "n_m",
    "nnx",
    "path_name",
    "prunable_like",
    "pressure",
    "pressure_value",
    "prune",
    "prune_at",
    "recipe",
    "skipped_steps",
    "sparsity",
    "structured",
]
