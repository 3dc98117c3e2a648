"""Multiply-adds of one forward pass, dense and under masks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr


def forward_macs(model: nn.Module, variables: dict, image_shape: tuple, masks: Any = None
                 ) -> tuple[int, int]:
    """Multiply-adds of one forward pass of one image: (dense, with ``masks``).

    Every conv or dense kernel costs (its entries) x (its output positions); under a mask,
    only its present entries count. Output positions are read off the layer outputs.
    """
    positions = layer_positions(model, image_shape)
    kernels = dict(_kernels(variables["params"]))
    mask_of = dict(_kernels(masks)) if masks is not None else {}
    dense = sparse = 0
    for layer, kernel in kernels.items():
        per_position = int(kernel.size)
        present = int(np.sum(mask_of[layer])) if mask_of.get(layer) is not None else per_position
        dense += per_position * positions[layer]
        sparse += present * positions[layer]
    return dense, sparse


def layer_positions(model: nn.Module, image_shape: tuple) -> dict[str, int]:
    """Output positions (H x W, 1 for dense layers) of every conv and dense layer, by its
    path in params; from shapes only, nothing is computed."""
    def is_layer(module, method_name):
        return isinstance(module, (nn.Conv, nn.Dense)) and method_name == "__call__"

    def capture(images):
        variables = model.init(jax.random.key(0), images, train=False)
        return model.apply(variables, images, train=False, capture_intermediates=is_layer,
                           mutable=["intermediates"])[1]

    state = jax.eval_shape(capture, jax.ShapeDtypeStruct((1,) + tuple(image_shape),
                                                         jnp.float32))
    positions = {}
    for path, out in jax.tree.leaves_with_path(state["intermediates"]):
        layer = keystr(path[:-2], simple=True, separator="/")  # drop '__call__' and tuple index
        positions[layer] = int(np.prod(out.shape[1:-1]))
    return positions


def _kernels(tree):
    for path, leaf in jax.tree.leaves_with_path(tree, is_leaf=lambda x: x is None):
        if path and getattr(path[-1], "key", None) == "kernel":
            yield keystr(path[:-1], simple=True, separator="/"), leaf
