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

The mass threshold is fixed for the whole run, as FTWT's ``--mthresh``. FTWT sets it by
hand and reports the FLOPs that follow; here ``calibrate_threshold`` sets it once, before
training, on the weights training starts from: the smallest threshold at which the
target masks, gating every conv (``gate_by_targets``: the network the heads learn to
be), execute ``1 - flops_target`` of the multiply-adds over a few training batches. It is
kept in ``"batch_stats"/"mass_threshold"`` and the model never changes it. The heads'
own masks are what runs, and they need not keep what their targets keep: the FLOPs to
report are the mean executed over the test set (``executed_flops``).

``FTWTVGG`` is the VGG with these heads: a subclass replacing its ``conv_layer``, whose
layer loop carries the multiply-add counts (``Counts``) from conv to conv. The training
settings are FTWT's (``heads_optimizer``, ``backbone_optimizer``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hflows_jax import recipe
from hflows_jax.models import VGG
from hflows_jax.models.vgg import vgg_fields

PyTree = Any
GATE = "Gate_"  # the params of the gating heads are named Gate_0, Gate_1, ...
DELTA = 1e-5  # FTWT's tolerance on the cumulative mass
THRESHOLD_BITS = 20  # bisection steps: the threshold to 2**-20, below DELTA

# FTWT's training from a trained model (job_dynamic.sh, trainwithpred; cifar.py): two SGD
# optimizers with momentum 0.9.
BACKBONE_LR = 1e-2  # --lr
BACKBONE_STEPS = (81 / 200, 122 / 200, 151 / 200)  # MultiStepLR milestones of 200 epochs
BACKBONE_GAMMA = 0.1  # the lr's factor at each milestone (--gamma)
WEIGHT_DECAY = 5e-4  # --wd, the backbone's only
HEADS_LR = 0.1  # --mlr: constant, no weight decay
MASK_LOSS_UNTIL = 0.5  # --cooldown: mask loss weight 1 for this share of the epochs, then 0


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
    by_targets: bool  # the target masks gate the convs, not the heads' masks


class FTWTVGG(VGG):
    """The VGG with a gating head on every conv: its ``conv_layer`` replaced, its layer
    loop carrying the ``Counts``.

    Its params are the VGG's, under the same names, plus ``Gate_i``; its batch stats add
    ``mass_threshold``, which the model reads and never changes (``calibrate_threshold``
    sets it). Sown in "intermediates": ``gate_logits`` and ``gate_targets`` per conv, and
    ``executed_fraction``: per input, the multiply-adds of the convs and the classifier
    that its masks execute over the dense model's (heads not counted, as in FTWT's own
    count). ``gate_by_targets=True``: the target masks gate the convs instead of the
    heads' (to count what the targets execute).
    """

    flops_target: float = 0.5  # the fraction of multiply-adds to remove

    @nn.compact
    def __call__(self, x, train: bool = False, gate_by_targets: bool = False):
        # The initial value stands until calibrate_threshold sets the run's.
        threshold = self.variable("batch_stats", "mass_threshold",
                                  lambda: jnp.asarray(1.0 - self.flops_target / 2, jnp.float32))
        batch = x.shape[:1]
        counts = Counts(jnp.full(batch, x.shape[-1], jnp.float32), jnp.zeros(batch, jnp.float32),
                        0, threshold.value, gate_by_targets)
        x, counts = self.backbone(x, train, counts)
        # The classifier: every active channel of the last layer feeds every class.
        dense = counts.dense + x.shape[-1] * self.num_classes
        executed = counts.executed + counts.active * self.num_classes
        self.sow("intermediates", "executed_fraction", executed / dense)
        return self.classifier(x)

    def conv_layer(self, x, features: int, norm, counts: Counts) -> tuple[jax.Array, Counts]:
        """The VGG's conv layer, its output channels multiplied by the head's mask."""
        pooled = jax.lax.stop_gradient(jnp.mean(x, axis=(1, 2)).astype(jnp.float32))
        logits = Gate(features)(jax.nn.softmax(pooled, axis=-1))
        out, _ = super().conv_layer(x, features, norm, None)
        target = mass_target(jax.lax.stop_gradient(out), counts.threshold)
        on = target if counts.by_targets else jax.lax.stop_gradient(
            (logits > 0).astype(jnp.float32))  # sigmoid > 0.5
        self.sow("intermediates", "gate_logits", logits)
        self.sow("intermediates", "gate_targets", target)
        unit = out.shape[1] * out.shape[2] * 9  # per (input, output) channel pair
        active = jnp.sum(on, axis=-1)
        counts = counts._replace(active=active,
                                 executed=counts.executed + unit * counts.active * active,
                                 dense=counts.dense + unit * x.shape[-1] * features)
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


def backbone_lr(total_steps: int) -> optax.Schedule:
    """FTWT's backbone lr over a run of ``total_steps``: ``BACKBONE_LR``, times
    ``BACKBONE_GAMMA`` at each milestone (``BACKBONE_STEPS``, as fractions of the run)."""
    return recipe.multistep(BACKBONE_LR, BACKBONE_GAMMA,
                            [int(f * total_steps) for f in BACKBONE_STEPS])


def mask_loss_weight(total_steps: int) -> optax.Schedule:
    """FTWT's mask-loss weight: 1 for the first ``MASK_LOSS_UNTIL`` of the run, then 0."""
    until = int(MASK_LOSS_UNTIL * total_steps)
    return lambda step: jnp.where(step < until, 1.0, 0.0)


def backbone_optimizer(total_steps: int) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                       optax.sgd(backbone_lr(total_steps), momentum=0.9))


def heads_optimizer(total_steps: int) -> optax.GradientTransformation:
    """SGD at a constant ``HEADS_LR`` on the heads' gradient times the mask-loss weight.
    Decoupled, the mask loss is all that reaches the heads, so this is FTWT's weighted
    loss: after the cooldown the heads coast on their momentum, as in FTWT."""
    return optax.chain(optax.scale_by_schedule(mask_loss_weight(total_steps)),
                       optax.sgd(HEADS_LR, momentum=0.9))


def targets_executed(model: FTWTVGG, variables: PyTree, images: jax.Array,
                     threshold: jax.Array) -> jax.Array:
    """The mean over ``images`` of the fraction of multiply-adds executed when the target
    masks at ``threshold`` gate every conv; BatchNorm on batch statistics, as training
    computes the targets."""
    stats = {**variables["batch_stats"], "mass_threshold": jnp.asarray(threshold, jnp.float32)}
    _, sown = model.apply({**variables, "batch_stats": stats}, images, train=True,
                          gate_by_targets=True, mutable=["intermediates", "batch_stats"])
    return jnp.mean(sown["intermediates"]["executed_fraction"][0])


def calibrate_threshold(model: FTWTVGG, variables: PyTree, batches, bits: int = THRESHOLD_BITS
                        ) -> float:
    """The smallest mass threshold, to ``2**-bits``, at which the target masks execute at
    least ``1 - model.flops_target`` of the multiply-adds: ``targets_executed``, the mean
    over ``batches`` of images.

    Bisection keeps ``f(low) < goal <= f(high)`` from ``f(0) = 0`` (no channel within
    the threshold) and ``f(1) = 1``. ``f`` is a step function, so ``f(high)`` overshoots
    the goal by at most its last step, ``f(high) - f(low)``.
    """
    model = model.clone(axis_name=None)  # this process's batches, outside the device loop
    executed = jax.jit(functools.partial(targets_executed, model))
    goal = 1.0 - model.flops_target

    def f(threshold: float) -> float:
        return float(np.mean([executed(variables, x, threshold) for x in batches]))

    low, high = 0.0, 1.0
    for _ in range(bits):
        middle = (low + high) / 2
        low, high = (low, middle) if f(middle) >= goal else (middle, high)
    return high


def executed_flops(model: FTWTVGG, variables: PyTree, images: np.ndarray,
                   batch_size: int = 500) -> float:
    """The mean over ``images`` (normalized) of the fraction of multiply-adds executed."""
    @jax.jit
    def fractions(x):
        _, sown = model.apply(variables, x, train=False, mutable=["intermediates"])
        return sown["intermediates"]["executed_fraction"][0]
    parts = [fractions(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate([np.asarray(p) for p in parts])))
