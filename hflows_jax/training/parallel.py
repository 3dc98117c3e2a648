"""Running the per-device steps over devices: pmap (the default) or shard_map.

pmap takes replicated state (a leading device axis) and batches shaped
``(devices, per_device, ...)``; shard_map takes plain state and flat global batches.
Both run the same per-device function from ``step.py``.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from hflows_jax.training.step import AXIS


def maybe_initialize_distributed() -> None:
    """Join a multi-host run when the environment describes one (coordinator or TPU pod)."""
    env = os.environ
    pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if (env.get("JAX_COORDINATOR_ADDRESS") or pod) and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def pmapped(fn: Callable, donate_state: bool = False) -> Callable:
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else ())


def shard_mapped(fn: Callable, mesh: Mesh, num_batch_args: int) -> Callable:
    """``fn(state, *batch)`` with state replicated and each batch argument split on AXIS.

    The step averages local gradients with an explicit ``pmean``, as under pmap. With
    ``check_vma=True`` shard_map would already sum the gradients of the replicated params
    across devices (the transpose of an implicit broadcast), and the pmean would then see
    a sum; ``check_vma=False`` keeps pmap's per-device semantics.
    """
    specs = (P(),) + (P(AXIS),) * num_batch_args
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(),
                                 check_vma=False))


def batch_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicate(tree, num_devices: int):
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + np.shape(x)),
                        tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def split_for_devices(batch: np.ndarray, num_devices: int) -> np.ndarray:
    """(global, ...) -> (devices, global / devices, ...)."""
    return batch.reshape((num_devices, batch.shape[0] // num_devices) + batch.shape[1:])
