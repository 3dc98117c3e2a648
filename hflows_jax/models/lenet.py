"""LeNet-300-100 and LeNet-5: the small networks of the MNIST experiments."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from hflows_jax.models.initializers import kernel_initializer


class LeNet300(nn.Module):
    """Fully connected 784-300-100-classes (266 k params for MNIST)."""

    num_classes: int = 10
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32
    kernel_init: str = "lecun_normal"  # or "he_uniform"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        init = kernel_initializer(self.kernel_init)
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=init)
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for features in (300, 100):
            x = nn.relu(dense(max(1, int(features * self.width)))(x))
        return dense(self.num_classes)(x)


class LeNet5(nn.Module):
    """Two 5x5 convolutions with max-pooling, then dense 120-84-classes."""

    num_classes: int = 10
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32
    kernel_init: str = "lecun_normal"  # or "he_uniform"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        init = kernel_initializer(self.kernel_init)
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=init)
        x = x.astype(self.dtype)
        for features in (6, 16):
            x = nn.Conv(max(1, int(features * self.width)), (5, 5), padding="VALID",
                        dtype=self.dtype, kernel_init=init)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for features in (120, 84):
            x = nn.relu(dense(max(1, int(features * self.width)))(x))
        return dense(self.num_classes)(x)
