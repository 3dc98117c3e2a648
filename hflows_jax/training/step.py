"""Per-device train and eval steps, written with named-axis collectives.

The functions below see one device's share of the batch and average over the axis
``'batch'``: gradients, BatchNorm statistics and metrics. They therefore run unchanged
under ``jax.pmap(..., axis_name='batch')`` and under ``jax.shard_map`` over a mesh with a
``'batch'`` axis (see ``parallel.py``); with one device either is a plain step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

import hflows_jax as hf
from hflows_jax.training.state import TrainState

AXIS = "batch"


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def effective_params(state: TrainState, pruned: bool):
    """The weights the network runs on: ``W * M`` while pruning, ``W`` when dense."""
    return hf.apply_masks(state.params, state.opt_state) if pruned else state.params


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, pruned: bool,
                    label_smoothing: float = 0.0):
    """``(state, images, labels) -> (state, metrics)`` for one device's shard."""

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        def loss_fn(weights):
            logits, new_vars = model.apply({"params": weights, "batch_stats": state.batch_stats},
                                           images, train=True, mutable=["batch_stats"])
            loss = smoothed_cross_entropy(logits, labels, label_smoothing)
            return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(effective_params(state, pruned))
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=lax.pmean(batch_stats, AXIS),
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        return new_state, lax.pmean(metrics, AXIS)

    return train_step


def make_eval_step(model: nn.Module, pruned: bool):
    """``(state, images, labels, valid) -> (correct, count)``, summed over devices."""

    def eval_step(state: TrainState, images, labels, valid):
        logits = model.apply({"params": effective_params(state, pruned),
                              "batch_stats": state.batch_stats}, images, train=False)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * valid)
        return lax.psum(correct, AXIS), lax.psum(jnp.sum(valid), AXIS)

    return eval_step
