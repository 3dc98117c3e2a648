"""hflows_jax: Hyperflows pruning as an optax transformation."""

from hflows_jax import nnx, pressure, recipe
from hflows_jax.checks import check
from hflows_jax.hyperflows import HyperflowsState, flows, hyperflows, pressure_value
from hflows_jax.masking import (
    PrunerState,
    apply_masks,
    default_is_prunable,
    finalize,
    find_pruner_state,
    has_pruner_state,
    layer_sparsity,
    masked_value_and_grad,
    masks,
    multiply_masks,
    path_name,
    prunable_like,
    sparsity,
)

from hflows_jax import baselines  # noqa: E402  (after the core: baselines build on it)
from hflows_jax import export  # noqa: E402  (compact models: hf.export.export(...))
from hflows_jax import structured  # noqa: E402  (channel pruning, built on export's graph)

__all__ = [
    "baselines",
    "export",
    "HyperflowsState",
    "PrunerState",
    "apply_masks",
    "check",
    "default_is_prunable",
    "finalize",
    "find_pruner_state",
    "flows",
    "has_pruner_state",
    "hyperflows",
    "layer_sparsity",
    "masked_value_and_grad",
    "masks",
    "multiply_masks",
    "nnx",
    "path_name",
    "prunable_like",
    "pressure",
    "pressure_value",
    "recipe",
    "sparsity",
    "structured",
]
