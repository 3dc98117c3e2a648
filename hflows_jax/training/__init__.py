"""Training: config and presets, the masked step, pmap/shard_map, checkpoints, the run."""

from hflows_jax.training import parallel, presets
from hflows_jax.training.config import Config
from hflows_jax.training.runs import OpenRun, open_run
from hflows_jax.training.state import TrainState
from hflows_jax.training.step import make_eval_step, make_train_step
from hflows_jax.training.train import run

__all__ = ["Config", "OpenRun", "TrainState", "make_eval_step", "make_train_step", "open_run",
           "parallel", "presets", "run"]
