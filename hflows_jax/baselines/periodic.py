"""When a periodic pruner (magnitude, RigL) recomputes its masks."""

from __future__ import annotations

import jax


def update_due(step, update_every, begin_step, end_step) -> jax.Array:
    """Whether ``step`` is a multiple of ``update_every`` in ``[begin_step, end_step)``."""
    return (step % update_every == 0) & (begin_step <= step) & (step < end_step)
