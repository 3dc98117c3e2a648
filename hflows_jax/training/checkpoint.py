"""Orbax checkpoints of a run: the whole TrainState plus a JSON record of where the run is.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. The JSON side holds the
data position (epochs done), the seed (batch order and augmentation are pure functions
of seed, epoch and step, so the seed is the whole RNG state), the metrics history and
the run's config.

In a multi-process run every process takes part in a save: the state is handed to orbax
as global arrays replicated over all devices, so orbax writes each array once and the
JSON record from process 0, and commits the checkpoint when every process is done.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hflows_jax.training.parallel import batch_mesh, global_replicated, local_copy


class Checkpoints:
    def __init__(self, directory: str, max_to_keep: int | None = 2):
        # Orbax also writes to cloud storage (gs://...), which has no absolute path.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def epochs(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, state: Any, record: dict) -> None:
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(global_replicated(state)),
            record=ocp.args.JsonSave(record)))

    def restore(self, epoch: int, abstract: Any, part: bool = False) -> tuple[Any, dict]:
        """The state saved at ``epoch``, restored onto ``abstract`` (``jax.ShapeDtypeStruct``
        leaves, e.g. from ``jax.eval_shape``), and its JSON record. The state comes back
        as this process's copy. ``part``: ``abstract`` names only some of the state's
        fields (a dict, e.g. ``params`` and ``batch_stats``), and only those are read."""
        replicated = jax.sharding.NamedSharding(batch_mesh(), jax.sharding.PartitionSpec())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
        state = ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True) if part else ocp.args.StandardRestore(abstract)
        restored = self._manager.restore(epoch, args=ocp.args.Composite(
            state=state, record=ocp.args.JsonRestore()))
        return local_copy(restored.state), restored.record

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_dir(workdir: str, phase: str) -> str:
    """Where a run keeps the checkpoints of one phase ("dense", "pruning", a method's
    "finetune"); a dense run's ``checkpoint_dir(workdir, "dense")`` is what
    ``--init_checkpoint`` takes."""
    return os.path.join(workdir, "checkpoints", phase)
