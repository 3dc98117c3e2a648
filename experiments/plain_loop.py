"""A plain optax loop, as a user's own would be, for the experiments that prune outside
the training harness (oneshot, gradient_flow): a linen model, its params and BatchNorm
statistics, and whatever pruner the optimizer chain holds (``hf.apply_masks``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hflows_jax as hf
from hflows_jax.data import ArrayDataset, channel_stats, load_dataset, normalize, train_batches
from hflows_jax.training.step import reestimated_statistics

BATCH = 128


@dataclasses.dataclass(frozen=True)
class Data:
    """A data set as the loop reads it: normalized test images, training batches on call."""

    raw: ArrayDataset
    mean: np.ndarray
    std: np.ndarray
    augment: bool

    @property
    def x_test(self) -> np.ndarray:
        return normalize(self.raw.x_test, self.mean, self.std)

    def epoch(self, seed: int, epoch: int):
        return train_batches(self.raw.x_train, self.raw.y_train, BATCH, seed, epoch,
                             self.mean, self.std, self.augment)

    def scoring(self, per_class: int, seed: int, batch: int = 256) -> list:
        """Class-balanced, normalized, unaugmented batches for importance measures."""
        x, y = hf.importance.class_balanced(self.raw.x_train, self.raw.y_train, per_class,
                                            seed)
        x = normalize(x, self.mean, self.std)
        return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def load(spec: str, augment: bool) -> Data:
    raw = load_dataset(spec)
    return Data(raw, *channel_stats(raw.x_train), augment)


def variables(params, stats) -> dict:
    return {"params": params, **({"batch_stats": stats} if stats else {})}


def init(model, data: Data, seed: int) -> tuple:
    """(params, BatchNorm statistics, empty for a model without)."""
    v = model.init(jax.random.key(seed), data.x_test[:1], train=False)
    return v["params"], v.get("batch_stats", {})


def eval_loss(model, stats):
    """``(params, batch) -> loss`` with BatchNorm on ``stats`` (eval mode): what importance
    measures read."""
    def loss(params, batch):
        logits = model.apply(variables(params, stats), batch[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    return loss


def reestimated(model, params, stats, data: Data, batches: int = 32, seed: int = 0) -> dict:
    """BatchNorm statistics of the network as ``params`` now are (pruned, say), over
    ``batches`` unaugmented training batches: the running ones describe the network before
    pruning, and a pruned model evaluated on them can test near chance."""
    if not stats:
        return stats
    epoch = train_batches(data.raw.x_train, data.raw.y_train, BATCH, seed, 0, data.mean,
                          data.std, augment=False)
    return reestimated_statistics(model, variables(params, stats),
                                  (x for _, (x, _) in zip(range(batches), epoch)))


def train(model, params, stats, tx, data: Data, epochs: int, seed: int) -> tuple:
    """``epochs`` of ``tx`` on ``hf.apply_masks(params)`` (dense when ``tx`` holds no
    pruner): ``(params, stats, opt_state, train losses per epoch)``, params masked."""
    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(p):
            logits, new = model.apply(variables(p, stats), x, train=True,
                                      mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, new.get("batch_stats", stats)
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(
            hf.apply_masks(params, opt_state, missing="ignore"))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    opt_state, losses = tx.init(params), []
    for epoch in range(epochs):
        values = []
        for x, y in data.epoch(seed, epoch):
            params, stats, opt_state, value = step(params, stats, opt_state, x, y)
            values.append(value)
        losses.append(float(np.mean(values)))
    return hf.apply_masks(params, opt_state, missing="ignore"), stats, opt_state, losses


def accuracy(model, params, stats, data: Data) -> float:
    logits = jax.jit(lambda p, x: model.apply(variables(p, stats), x, train=False))
    x_test, y_test = data.x_test, data.raw.y_test
    hits = sum(int(jnp.sum(jnp.argmax(logits(params, x_test[i:i + 1000]), -1) ==
                           y_test[i:i + 1000]))
               for i in range(0, len(x_test), 1000))
    return hits / len(x_test)
