"""VGG-19 for CIFAR: 16 conv 3x3 layers with BatchNorm and ReLU, then one dense layer."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from hflows_jax.models.initializers import kernel_initializer
from hflows_jax.models.norm import batch_norm

VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG(nn.Module):
    """The CIFAR VGG of the reference: features, global average pool, dense 512 -> classes."""

    layers: Sequence[int | str] = VGG19_LAYERS
    num_classes: int = 10
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None  # BatchNorm statistics are averaged over this axis
    kernel_init: str = "lecun_normal"  # or "he_uniform" (the reference)
    train_bn_scale: bool = True  # False: BatchNorm scale fixed at 1 (the reference)

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = batch_norm(train, self.dtype, self.axis_name, self.train_bn_scale)
        init = kernel_initializer(self.kernel_init)
        x = x.astype(self.dtype)
        for layer in self.layers:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nn.Conv(max(1, int(layer * self.width)), (3, 3), use_bias=False,
                            dtype=self.dtype, kernel_init=init)(x)
                x = nn.relu(norm()(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init)(x).astype(
            jnp.float32)
