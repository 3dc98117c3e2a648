"""Flax (linen) model definitions, created by ``--model`` name."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from hflows_jax.models.lenet import LeNet5, LeNet300

MODELS = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
}


def create(name: str, num_classes: int, width: float = 1.0,
           dtype: jnp.dtype = jnp.float32) -> nn.Module:
    """The linen module for a ``--model`` name; apply it as ``module.apply(v, x, train=...)``."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}: known models are {sorted(MODELS)}.")
    return MODELS[name](num_classes=num_classes, width=width, dtype=dtype)


__all__ = ["MODELS", "LeNet300", "LeNet5", "create"]
