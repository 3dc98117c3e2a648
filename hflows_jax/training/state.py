"""The training state: everything a step reads and writes, one pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax


class TrainState(NamedTuple):
    step: jax.Array  # int32, steps taken in the current phase
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: optax.OptState
