"""Flax (linen) model definitions, created by ``--model`` name.

Every module is applied as ``module.apply(variables, images, train=...)`` on NHWC float
images. Modules with BatchNorm take ``axis_name``: under pmap or shard_map, batch
statistics are then averaged over that axis.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from hflows_jax.models.initializers import KERNEL_INITS, kernel_initializer
from hflows_jax.models.lenet import LeNet5, LeNet300
from hflows_jax.models.resnet import ResNet, ResNet18, ResNet20, ResNet50
from hflows_jax.models.vgg import VGG

MODELS = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "resnet50": ResNet50,
    "vgg19": VGG,
}
BATCHNORM_MODELS = {"resnet18", "resnet20", "resnet50", "vgg19"}


def create(name: str, num_classes: int, width: float = 1.0, dtype: jnp.dtype = jnp.float32,
           axis_name: str | None = None, kernel_init: str = "lecun_normal",
           train_bn_scale: bool = True, zero_init_residual: bool = True) -> nn.Module:
    """The linen module for a ``--model`` name.

    The recipe options apply where the model has the part they name: ``train_bn_scale``
    and ``axis_name`` to BatchNorm nets, ``zero_init_residual`` to ResNets.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}: known models are {sorted(MODELS)}.")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width!r}.")
    kernel_initializer(kernel_init)  # a clear error for an unknown name
    kwargs = {}
    if name in BATCHNORM_MODELS:
        kwargs.update(axis_name=axis_name, train_bn_scale=train_bn_scale)
    if name.startswith("resnet"):
        kwargs.update(zero_init_residual=zero_init_residual)
    return MODELS[name](num_classes=num_classes, width=width, dtype=dtype,
                        kernel_init=kernel_init, **kwargs)


def network_fields(model: nn.Module, network: type) -> dict:
    """The fields of ``network`` (VGG, ResNet) that define ``model``'s layers: to build
    another network of that class, or of a subclass, with the same layers."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(network)
            if f.name not in ("parent", "name")}


__all__ = ["BATCHNORM_MODELS", "KERNEL_INITS", "MODELS", "LeNet300", "LeNet5", "ResNet", "ResNet18", "ResNet20", "ResNet50",
           "VGG", "create", "network_fields"]
