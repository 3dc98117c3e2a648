"""Multiply-adds of one forward pass, dense and under masks, read off the traced graph."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.tree_util import keystr

from hflows_jax import graph as graph_lib
from hflows_jax.masking import unwrap_nnx


def forward_macs(fn: Callable, params: Any, example: Any, masks: Any = None
                 ) -> tuple[int, int]:
    """Multiply-adds per example of ``fn(params, x)``'s conv and dense layers: (dense, with
    ``masks``). A layer costs its output entries times the kernel entries each reads; under
    a mask, only its present kernel entries count. ``fn`` and ``example`` as in
    ``graph.function_of`` (a linen module and an input shape will do)."""
    fn, example = graph_lib.function_of(fn, example)
    params = unwrap_nnx(params)
    graph = graph_lib.trace(fn, params, example, strict=False)
    present = {}
    if masks is not None:
        for path, m in jax.tree.leaves_with_path(unwrap_nnx(masks), is_leaf=lambda x: x is None):
            if m is not None:
                present[keystr(path, simple=True, separator="/")] = np.asarray(m)
    paths = dict(zip(graph.param_ids, graph.param_paths))
    dense = masked = 0
    for c in graph.contractions:
        macs = graph_lib.contraction_macs(graph, c, graph.per_example_shape)
        dense += macs
        mask = present.get(paths.get(c.param))
        if mask is not None and c.layer is not None:
            mask = mask[c.layer]
        masked += macs if mask is None else graph_lib.masked_macs(graph, c, int(np.sum(mask)))
    return dense, masked
