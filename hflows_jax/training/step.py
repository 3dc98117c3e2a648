"""The one masked train step, and the eval step, written with named-axis collectives.

The network runs on ``W * M`` (``hf.apply_masks``) and the gradient is taken with respect
to those effective weights: that is what every pruner in this package expects. With
``axis_name`` set, the step sees one device's share of the batch and averages gradients,
BatchNorm statistics and metrics over that axis, so it runs unchanged under
``jax.pmap(..., axis_name=AXIS)`` and under ``jax.shard_map`` over a mesh with that axis
(``parallel.py``). With ``axis_name=None`` it is a plain step for ``jax.jit``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

import hflows_jax as hf
from hflows_jax.models.norm import MOMENTUM
from hflows_jax.training.state import TrainState

AXIS = "batch"


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def effective_params(state: TrainState, masked: bool):
    """The weights the network runs on: ``W * M`` while pruning, ``W`` when dense."""
    return hf.apply_masks(state.params, state.opt_state) if masked else state.params


def _mean(tree, axis_name: str | None):
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, masked: bool,
                    label_smoothing: float = 0.0, loss_term: Callable | None = None,
                    axis_name: str | None = AXIS):
    """``(state, images, labels) -> (state, metrics)``.

    ``loss_term(weights, intermediates)``, when given, is added to the task loss; the
    model's ``intermediates`` collection is then collected in the forward pass.
    """
    collections = ["batch_stats"] + (["intermediates"] if loss_term else [])

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        def loss_fn(weights):
            logits, new_vars = model.apply({"params": weights, "batch_stats": state.batch_stats},
                                           images, train=True, mutable=collections)
            loss = smoothed_cross_entropy(logits, labels, label_smoothing)
            if loss_term is not None:
                loss = loss + loss_term(weights, new_vars.get("intermediates", {}))
            return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(effective_params(state, masked))
        grads = _mean(grads, axis_name)
        # The running statistics before this step, for pruners that score in eval mode.
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       batch_stats=state.batch_stats)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=_mean(batch_stats, axis_name),
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        return new_state, _mean(metrics, axis_name)

    return train_step


def make_eval_step(model: nn.Module, masked: bool, axis_name: str | None = AXIS):
    """``(state, images, labels, valid) -> (correct, count)`` over a stack of batches.

    ``images`` is ``(batches, batch, ...)``: the whole test set is one program, a scan over
    its batches, summed over devices.
    """

    def eval_step(state: TrainState, images, labels, valid):
        variables = {"params": effective_params(state, masked), "batch_stats": state.batch_stats}

        def one_batch(totals, batch):
            x, y, v = batch
            logits = model.apply(variables, x, train=False)
            correct = jnp.sum((jnp.argmax(logits, -1) == y) * v)
            return (totals[0] + correct, totals[1] + jnp.sum(v)), None

        zero = jnp.zeros((), jnp.float32)
        (correct, count), _ = lax.scan(one_batch, (zero, zero), (images, labels, valid))
        if axis_name is not None:
            correct, count = lax.psum(correct, axis_name), lax.psum(count, axis_name)
        return correct, count

    return eval_step


def _is_statistic(path) -> bool:
    return getattr(path[-1], "key", None) in ("mean", "var")


def batch_statistics(model: nn.Module, variables: dict, images: jax.Array) -> dict:
    """The BatchNorm statistics of one batch (train mode), shaped like ``batch_stats``.

    BatchNorm's update is ``running = MOMENTUM * running + (1 - MOMENTUM) * batch``: from
    zeroed running statistics it writes ``(1 - MOMENTUM) * batch``. Other entries of
    ``batch_stats`` (FTWT's mass threshold) come back unchanged.
    """
    stats = variables["batch_stats"]
    zeros = jax.tree.map_with_path(lambda p, s: jnp.zeros_like(s) if _is_statistic(p) else s,
                                   stats)
    _, new = model.apply({**variables, "batch_stats": zeros}, images, train=True,
                         mutable=["batch_stats"])
    return jax.tree.map_with_path(
        lambda p, s, n: n / (1 - MOMENTUM) if _is_statistic(p) else s, stats,
        new["batch_stats"])


def reestimated_statistics(model: nn.Module, variables: dict, image_batches) -> dict:
    """BatchNorm statistics for the network as ``variables`` now are (pruned, say): the mean
    of each batch's over ``image_batches``. Running statistics describe the network before
    its masks last changed."""
    step = jax.jit(lambda v, x: batch_statistics(model, v, x))
    return mean_statistics([step(variables, images) for images in image_batches],
                           variables["batch_stats"])


def make_statistics_step(model: nn.Module, masked: bool):
    """``(state, images) -> batch_stats`` of one batch on the weights the network runs on
    (under pmap or shard_map the model's BatchNorm averages over the devices itself)."""

    def statistics_step(state: TrainState, images: jax.Array):
        variables = {"params": effective_params(state, masked), "batch_stats": state.batch_stats}
        return batch_statistics(model, variables, images)

    return statistics_step


def mean_statistics(batch_stats: list, like: dict) -> dict:
    """The mean of several batches' statistics; other entries as in ``like``."""
    return jax.tree.map_with_path(
        lambda p, s, *batches: sum(batches) / len(batches) if _is_statistic(p) else s,
        like, *batch_stats)
