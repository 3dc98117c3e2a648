"""Kernel initializers by name: Flax's default, or the reference's He-uniform."""

from __future__ import annotations

import flax.linen as nn

KERNEL_INITS = {
    "lecun_normal": nn.initializers.lecun_normal(),  # Flax's default
    # PyTorch's kaiming_uniform_ with the ReLU gain: U(+-sqrt(6 / fan_in)) (METHOD.md 8).
    "he_uniform": nn.initializers.he_uniform(),
}


def kernel_initializer(name: str):
    if name not in KERNEL_INITS:
        raise ValueError(f"Unknown kernel init {name!r}: use one of {list(KERNEL_INITS)}.")
    return KERNEL_INITS[name]
