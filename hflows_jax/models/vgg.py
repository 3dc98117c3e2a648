"""VGG-19 for CIFAR: 16 conv 3x3 layers with BatchNorm and ReLU, then one dense layer.

Each conv layer goes through the method ``conv_layer``, so that a pruning method's network
(DHP's hypernetwork convs, FTWT's gated convs) is a subclass that replaces that one method
and shares the layer loop, the classifier and their parameter names. ``backbone`` and
``classifier`` are plain methods called from the compact ``__call__``: the layers they
create are ``__call__``'s, named as if written there (``Conv_0``, ``BatchNorm_0``, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

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
        x, _ = self.backbone(x, train, None)
        return self.classifier(x)

    def backbone(self, x, train: bool, carry: Any) -> tuple[Any, Any]:
        """``(pooled features, carry)``: the layer loop, every conv through ``conv_layer``
        with ``carry`` passed from layer to layer, then the global average pool."""
        norm = batch_norm(train, self.dtype, self.axis_name, self.train_bn_scale)
        x = x.astype(self.dtype)
        for layer in self.layers:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x, carry = self.conv_layer(x, max(1, int(layer * self.width)), norm, carry)
        return jnp.mean(x, axis=(1, 2)), carry

    def conv_layer(self, x, features: int, norm, carry: Any) -> tuple[Any, Any]:
        """Conv 3x3 without bias, BatchNorm (``norm()``), ReLU; ``carry`` passes through.

        The one method a subclass replaces; ``carry`` is whatever its layers hand on.
        """
        conv = nn.Conv(features, (3, 3), use_bias=False, dtype=self.dtype,
                       kernel_init=kernel_initializer(self.kernel_init))
        return nn.relu(norm()(conv(x))), carry

    def classifier(self, x):
        return nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=kernel_initializer(self.kernel_init))(x).astype(jnp.float32)
