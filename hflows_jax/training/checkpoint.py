"""Orbax checkpoints of a run: the whole TrainState plus a JSON record of where the run is.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. The JSON side holds the
data position (epochs done), the seed (batch order and augmentation are pure functions
of seed, epoch and step, so the seed is the whole RNG state), the metrics history and
the run's config.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state: Any, record: dict) -> None:
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))

    def restore(self, epoch: int, abstract: Any) -> tuple[Any, dict]:
        """The state saved at ``epoch``, restored onto ``abstract`` (``jax.ShapeDtypeStruct``
        leaves, e.g. from ``jax.eval_shape``), and its JSON record."""
        restored = self._manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
