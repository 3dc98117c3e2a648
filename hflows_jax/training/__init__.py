"""Training: state, per-device steps, pmap/shard_map, orbax checkpoints, reports, the loop."""

from hflows_jax.training import cli, parallel
from hflows_jax.training.loop import Config, Run, run
from hflows_jax.training.state import TrainState
from hflows_jax.training.step import make_eval_step, make_train_step

__all__ = ["Config", "Run", "TrainState", "cli", "make_eval_step", "make_train_step",
           "parallel", "run"]
