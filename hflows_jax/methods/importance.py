"""Pruning by an importance measure during training, once or in rounds, as Lubana and
Dick's code runs it (EkdeepSLubana/flowandprune: train, score, prune, and again).

``--measure`` names the score (``hf.importance.MEASURES``), ``--rounds`` how many prunes
are spread evenly over the pruning epochs, the last reaching ``--target_sparsity``; the
regrowth epochs fine-tune what is left. Each round scores the network as it runs, with
BatchNorm in eval mode on the loop's current running statistics (the paper's
``model.eval()``): the train step hands them to ``tx.update`` as ``batch_stats``.
"""

from __future__ import annotations

import hflows_jax as hf
from hflows_jax.methods.base import Budget, Method


def round_steps(pruning_steps: int, rounds: int) -> list[int]:
    """The update counts that prune: the first update, then every ``pruning_steps /
    rounds`` updates."""
    return [1 + k * pruning_steps // rounds for k in range(rounds)]


class Importance(Method):
    name = "importance"
    distributions = ("global", "uniform", "N:M")
    options = ("measure", "rounds")

    def pruner(self, b: Budget):
        rounds = b.rounds or 1
        if rounds > b.pruning_steps:
            raise ValueError(f"--rounds={rounds} exceeds the {b.pruning_steps} steps of the "
                             "pruning epochs.")
        return hf.prune_at(b.measure or "magnitude", b.target_sparsity,
                           round_steps(b.pruning_steps, rounds),
                           loss_fn=b.scoring.eval_loss_fn, batches=b.scoring.batches,
                           distribution=b.distribution, loss_args=("batch_stats",))
