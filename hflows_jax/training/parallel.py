"""Running the per-device steps over devices and processes: pmap (the default) or shard_map.

Both run the same per-device function from ``step.py`` and take batches shaped
``(devices, per_device, ...)``, this process's devices first:

- ``Pmap`` keeps the state replicated with a leading axis over this process's devices
  and passes host arrays straight to ``jax.pmap``;
- ``ShardMap`` keeps the state as global arrays replicated over a mesh of every device
  of every process, and assembles each batch into one global array sharded on its
  leading axis.

In a multi-process run (``initialize_distributed``) each process feeds its own slice of
every global batch; gradients and metrics are averaged over all devices of all processes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hflows_jax.training.step import AXIS

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run: explicitly, or when the environment describes a cluster
    (``JAX_COORDINATOR_ADDRESS``, a multi-host TPU slice, SLURM or Open MPI with more than
    one task), through JAX's own auto-detection. Nothing happens on a lone machine.

    Must run before anything touches a device. On CPU, collectives between processes
    go over gloo.
    """
    env = os.environ
    cluster = (env.get("JAX_COORDINATOR_ADDRESS")
               or "," in env.get("TPU_WORKER_HOSTNAMES", "")
               or int(env.get("SLURM_NTASKS", "1")) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if jax.distributed.is_initialized() or not (coordinator_address or cluster):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
    """Process 0 alone prints the log and writes a run's files (checkpoints aside)."""
    return jax.process_index() == 0


def primary_first(fn: Callable):
    """``fn()`` on process 0, then on the others: a download into a directory the hosts
    share happens once."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    if not is_primary():
        multihost_utils.sync_global_devices("hflows_jax: process 0 first")
    result = fn()
    if is_primary():
        multihost_utils.sync_global_devices("hflows_jax: process 0 first")
    return result


def split_for_devices(batch: np.ndarray, num_devices: int) -> np.ndarray:
    """(global, ...) -> (devices, global / devices, ...)."""
    return batch.reshape((num_devices, batch.shape[0] // num_devices) + batch.shape[1:])


def replicate(tree, num_devices: int):
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + np.shape(x)),
                        tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def batch_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def global_replicated(tree, mesh: Mesh | None = None):
    """Every leaf as one global array replicated over ``mesh`` (default: all devices of all
    processes), from this process's copy; every process must hold the same values."""
    sharding = NamedSharding(mesh or batch_mesh(), P())
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_copy(tree):
    """This process's copy of every leaf of a replicated tree (any layout above)."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def shard_mapped(fn: Callable, mesh: Mesh, num_batch_args: int,
                 donate_state: bool = False) -> Callable:
    """``fn(state, *batch)`` with state replicated and each batch argument split on AXIS.

    The step averages local gradients with an explicit ``pmean``, as under pmap. With
    ``check_vma=True`` shard_map would already sum the gradients of the replicated params
    across devices (the transpose of an implicit broadcast), and the pmean would then see
    a sum; ``check_vma=False`` keeps pmap's per-device semantics.
    """
    specs = (P(),) + (P(AXIS),) * num_batch_args
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(),
                                 check_vma=False),
                   donate_argnums=(0,) if donate_state else ())


@dataclasses.dataclass(frozen=True)
class Pmap:
    """State replicated over this process's devices, a leading device axis on every leaf."""

    name = "pmap"

    def compile(self, fn: Callable, num_batch_args: int, donate_state: bool = False):
        return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else ())

    def precompile(self, compiled: Callable, *args):
        """Compile now for these arguments, so compile time is measured apart. Across
        processes a precompiled pmap executable rejects process-local arrays (it expects
        global shapes), so there pmap compiles at its first call instead."""
        return compiled.lower(*args).compile() if jax.process_count() == 1 else compiled

    def put_state(self, state):
        return replicate(state, jax.local_device_count())

    def get_state(self, placed):
        return unreplicate(placed)

    def put_batch(self, local: np.ndarray):
        """``local``: this process's part, ``(local devices, per_device, ...)``."""
        return local

    def put_resident(self, *arrays: np.ndarray):
        """Arrays laid out as for ``put_batch``, kept on the devices (the test set)."""
        return jax.pmap(lambda *a: a)(*arrays)

    def scalar(self, x) -> float:
        return float(np.asarray(x)[0])  # one transfer to the host, no device-side slice


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """State as global arrays replicated over ``mesh``; batches global, split on AXIS."""

    mesh: Mesh
    name = "shard_map"

    def compile(self, fn: Callable, num_batch_args: int, donate_state: bool = False):
        def per_device(state, *batch):  # each device sees its (1, per_device, ...) block
            return fn(state, *(b[0] for b in batch))

        return shard_mapped(per_device, self.mesh, num_batch_args, donate_state)

    def precompile(self, compiled: Callable, *args):
        return compiled.lower(*args).compile()

    def put_state(self, state):
        return global_replicated(state, self.mesh)

    def get_state(self, placed):
        return local_copy(placed)

    def put_batch(self, local: np.ndarray):
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.make_array_from_process_local_data(sharding, local)

    def put_resident(self, *arrays: np.ndarray):
        return tuple(self.put_batch(a) for a in arrays)

    def scalar(self, x) -> float:
        return float(x.addressable_data(0))


def backend(name: str) -> Pmap | ShardMap:
    """``pmap`` or ``shard_map`` (``config.PARALLEL``) over every device of every process."""
    return Pmap() if name == "pmap" else ShardMap(batch_mesh())
