"""The BatchNorm of every model here."""

from __future__ import annotations

from functools import partial

import flax.linen as nn

EPSILON = 1e-5
MOMENTUM = 0.9  # running = MOMENTUM * running + (1 - MOMENTUM) * batch


def batch_norm(train: bool, dtype, axis_name: str | None, use_scale: bool):
    """``nn.BatchNorm`` as every model uses it: momentum 0.9, running averages in eval."""
    return partial(nn.BatchNorm, use_running_average=not train, momentum=MOMENTUM,
                   epsilon=EPSILON, dtype=dtype, axis_name=axis_name, use_scale=use_scale)
