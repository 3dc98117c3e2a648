"""ResNets in the shape of the Flax ImageNet example: CIFAR's stem (3x3, stride 1, no
max-pool) by default, ImageNet's (7x7 stride 2, 3x3 max-pool stride 2) with
``imagenet_stem=True``."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from hflows_jax.models.initializers import kernel_initializer
from hflows_jax.models.norm import batch_norm

ModuleDef = Any


def last_norm(block) -> nn.Module:
    """A block's last BatchNorm: scale initialized to 0 (Goyal et al.), or to 1."""
    return block.norm(scale_init=nn.initializers.zeros) if block.zero_init_residual \
        else block.norm()


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/20).

    ``gate``: None, or a channel gate (FTWT's ``Gating``) that multiplies each conv's
    output by a mask per input, the second one's before the residual add; it is called as
    ``gate(block, conv input, conv output, active input channels) -> (output, active
    output channels)`` and told the multiply-adds of the projection (``gate.count``).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = True  # the last BatchNorm's scale starts at 0
    gate: Any = None

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)))
        y, active = self.gated(x, y, x.shape[-1])
        z = last_norm(self)(self.conv(self.filters, (3, 3))(y))
        z, _ = self.gated(y, z, active)
        if residual.shape != z.shape:
            residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                                 name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
            if self.gate is not None:
                self.gate.count(self, residual[0].size * x.shape[-1], x.shape[0])
        return nn.relu(residual + z)

    def gated(self, x, out, active):
        return (out, active) if self.gate is None else self.gate(self, x, out, active)


class BottleneckResNetBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = True  # the last BatchNorm's scale starts at 0

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)))
        y = last_norm(self)(self.conv(self.filters * 4, (1, 1))(y))
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides),
                                 name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


def block_layout(stage_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(stage, strides)`` of every block in order: stride 2 opens each stage after the
    first (where the filters double)."""
    return [(i, 2 if i > 0 and j == 0 else 1)
            for i, count in enumerate(stage_sizes) for j in range(count)]


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_filters: int = 64
    num_classes: int = 10
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None  # BatchNorm statistics are averaged over this axis
    kernel_init: str = "lecun_normal"  # or "he_uniform" (the reference)
    train_bn_scale: bool = True  # False: BatchNorm scale fixed at 1 (the reference)
    zero_init_residual: bool = True  # False: every BatchNorm scale starts at 1 (the reference)
    imagenet_stem: bool = False  # 7x7 stride 2 and a 3x3 max-pool stride 2: 224x224 images

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.classifier(self.backbone(x, train))

    def backbone(self, x, train: bool, gate: Any = None):
        """The pooled features: stem, blocks, global average pool. ``gate``: None, or a
        channel gate for the stem's output and every block's convs (``ResNetBlock``).
        Called from the compact ``__call__``, its layers are ``__call__``'s."""
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype,
                       kernel_init=kernel_initializer(self.kernel_init))
        norm = batch_norm(train, self.dtype, self.axis_name, self.train_bn_scale)
        filters = max(1, int(self.num_filters * self.width))
        image = x.astype(self.dtype)
        if self.imagenet_stem:
            x = conv(filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init")(image)
            x = nn.max_pool(nn.relu(norm(name="bn_init")(x)), (3, 3), (2, 2), "SAME")
        else:
            x = nn.relu(norm(name="bn_init")(conv(filters, (3, 3), name="conv_init")(image)))
        if gate is not None:
            x, _ = gate(self, image, x, image.shape[-1])
        gated = {} if gate is None else {"gate": gate}
        for stage, strides in block_layout(self.stage_sizes):
            x = self.block_cls(filters * 2 ** stage, conv=conv, norm=norm, strides=strides,
                               zero_init_residual=self.zero_init_residual, **gated)(x)
        return jnp.mean(x, axis=(1, 2))

    def classifier(self, x):
        return nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=kernel_initializer(self.kernel_init))(x).astype(jnp.float32)


ResNet20 = partial(ResNet, stage_sizes=(3, 3, 3), block_cls=ResNetBlock, num_filters=16)
ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
