"""FTWT (Elkerdawy et al., selkerdawy/FTWT; METHOD.md section 9): channels gated per input.

Every conv gets a small gating head: the layer's input, average-pooled over space and
softmaxed over channels, through a dense layer (FTWT's 1x1 conv) to one logit per output
channel. The channel runs for this input when ``sigmoid(logit) > 0.5``; the mask multiplies
the output of conv + BatchNorm + ReLU and carries no gradient. The heads learn, as a
self-supervised classification, a target mask per input: the "heatmap mass" of each output
channel (its spatial max of |activation|, normalized over channels), sorted, keeps the
channels whose cumulative mass stays within a threshold. In the decoupled mode (FTWT's
default, the only one here) a head's input is detached, so its binary cross-entropy
reaches the heads only.

FTWT picks the mass threshold by hand for each FLOP target. Here it is steered to the
target while training, like a BatchNorm statistic: every training batch moves it by
``THRESHOLD_RATE`` times the gap between the multiply-adds the heads' masks execute and
the target's (``"batch_stats"/"mass_threshold"``). Steered on the target masks' FLOPs
instead, one run removed 76.9 % for a 70 % target: the heads keep fewer channels than
their targets. The mask changes with the input, so the FLOPs to report are the mean
executed over the test set (``executed_flops``).

``FTWTVGG`` is the VGG with these heads: a subclass replacing its ``conv_layer``, whose
layer loop carries the multiply-add counts (``Counts``) from conv to conv.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hflows_jax.models import VGG
from hflows_jax.models.vgg import vgg_fields

PyTree = Any
GATE = "Gate_"  # the params of the gating heads are named Gate_0, Gate_1, ...
HEADS_LR = 0.1  # FTWT's mask-predictor learning rate (SGD, momentum 0.9, no weight decay)
THRESHOLD_RATE = 0.01  # mass-threshold change per training batch and unit of FLOP error
DELTA = 1e-5  # FTWT's tolerance on the cumulative mass


def mass_target(activations: jax.Array, threshold: jax.Array) -> jax.Array:
    """FTWT's target mask, ``(batch, channels)`` in {0, 1}, of NHWC ``activations``.

    Per input: each channel's mass is its spatial max of |activation| over the sum over
    channels; sorted by mass, a channel is kept while the cumulative mass up to and
    including it is at most ``threshold`` (+ ``DELTA``).
    """
    heat = jnp.max(jnp.abs(activations), axis=(1, 2)).astype(jnp.float32)
    mass = heat / jnp.maximum(jnp.sum(heat, axis=-1, keepdims=True), 1e-12)
    order = jnp.argsort(-mass, axis=-1)
    cumulative = jnp.cumsum(jnp.take_along_axis(mass, order, axis=-1), axis=-1)
    keep_sorted = (cumulative - threshold <= DELTA).astype(jnp.float32)
    ranks = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, ranks, axis=-1)


class Gate(nn.Dense):
    """A gating head: a dense layer of its own class, so that its params are auto-named
    ``Gate_0``, ``Gate_1``, ... (``GATE``), apart from the classifier's ``Dense_0``."""


class Counts(NamedTuple):
    """What FTWT's conv layers hand on (the carry of the VGG's layer loop)."""

    active: jax.Array  # (batch,): the channels the last layer's masks keep, per input
    executed: jax.Array  # (batch,): the multiply-adds the masks execute so far, per input
    dense: int  # the multiply-adds of the dense model so far
    threshold: jax.Array  # the mass threshold of the target masks


class FTWTVGG(VGG):
    """The VGG with a gating head on every conv: its ``conv_layer`` replaced, its layer
    loop carrying the ``Counts``.

    Its params are the VGG's, under the same names, plus ``Gate_i``; its batch stats add
    ``mass_threshold``. Sown in "intermediates": ``gate_logits`` and ``gate_targets`` per
    conv, and ``executed_fraction``: per input, the multiply-adds of the convs and the
    classifier that its masks execute over the dense model's (heads not counted, as in
    FTWT's own count).
    """

    flops_target: float = 0.5  # the fraction of multiply-adds to remove

    @nn.compact
    def __call__(self, x, train: bool = False):
        threshold = self.variable("batch_stats", "mass_threshold",
                                  lambda: jnp.asarray(1.0 - self.flops_target / 2, jnp.float32))
        batch = x.shape[:1]
        counts = Counts(jnp.full(batch, x.shape[-1], jnp.float32), jnp.zeros(batch, jnp.float32),
                        0, threshold.value)
        x, counts = self.backbone(x, train, counts)
        # The classifier: every active channel of the last layer feeds every class.
        dense = counts.dense + x.shape[-1] * self.num_classes
        executed = counts.executed + counts.active * self.num_classes
        self.sow("intermediates", "executed_fraction", executed / dense)
        if train and not self.is_initializing():
            gap = (1.0 - self.flops_target) - jnp.mean(executed / dense)
            threshold.value = jnp.clip(threshold.value + THRESHOLD_RATE * gap, 0.0, 1.0)
        return self.classifier(x)

    def conv_layer(self, x, features: int, norm, counts: Counts) -> tuple[jax.Array, Counts]:
        """The VGG's conv layer, its output channels multiplied by the head's mask."""
        pooled = jax.lax.stop_gradient(jnp.mean(x, axis=(1, 2)).astype(jnp.float32))
        logits = Gate(features)(jax.nn.softmax(pooled, axis=-1))
        out, _ = super().conv_layer(x, features, norm, None)
        on = jax.lax.stop_gradient((logits > 0).astype(jnp.float32))  # sigmoid > 0.5
        self.sow("intermediates", "gate_logits", logits)
        self.sow("intermediates", "gate_targets",
                 mass_target(jax.lax.stop_gradient(out), counts.threshold))
        unit = out.shape[1] * out.shape[2] * 9  # per (input, output) channel pair
        active = jnp.sum(on, axis=-1)
        counts = Counts(active, counts.executed + unit * counts.active * active,
                        counts.dense + unit * x.shape[-1] * features, counts.threshold)
        return out * on[:, None, None, :].astype(out.dtype), counts


def to_ftwt(model: nn.Module, flops_target: float) -> FTWTVGG:
    """The FTWT network of a ``hflows_jax.models`` model (VGG only, so far)."""
    if not isinstance(model, VGG):
        raise ValueError(f"ftwt builds on vgg19 only, got {type(model).__name__}.")
    return FTWTVGG(**vgg_fields(model), flops_target=flops_target)


def gating_loss(params: PyTree, intermediates: PyTree) -> jax.Array:
    """Mean over gated convs of the binary cross-entropy between head logits and target
    masks, summed over channels and averaged over the batch (FTWT's mask loss, weight 1)."""
    del params
    losses = [jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, target), axis=-1))
              for logits, target in zip(intermediates["gate_logits"],
                                        intermediates["gate_targets"])]
    return sum(losses) / len(losses)


def is_gate(path: str) -> bool:
    return path.startswith(GATE)


def with_heads(heads_tx: optax.GradientTransformation,
               *weights_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """FTWT's two optimizers: ``heads_tx`` for the gating heads, the chain of ``weights_tx``
    for the rest."""
    def labels(params):
        return {k: jax.tree.map(lambda _: "heads" if is_gate(k) else "weights", v)
                for k, v in params.items()}
    return optax.multi_transform({"heads": heads_tx, "weights": optax.chain(*weights_tx)},
                                 labels)


def executed_flops(model: FTWTVGG, variables: PyTree, images: np.ndarray,
                   batch_size: int = 500) -> float:
    """The mean over ``images`` (normalized) of the fraction of multiply-adds executed."""
    @jax.jit
    def fractions(x):
        _, sown = model.apply(variables, x, train=False, mutable=["intermediates"])
        return sown["intermediates"]["executed_fraction"][0]
    parts = [fractions(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate([np.asarray(p) for p in parts])))
