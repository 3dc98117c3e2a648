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

``FTWTVGG`` and ``FTWTResNet`` are our VGG and ResNet with these heads (``Gating``): a
VGG subclass replacing its ``conv_layer``, and a ResNet whose blocks take the gate. The
training settings are FTWT's (``heads_optimizer``, ``backbone_optimizer``).
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
from hflows_jax.models import VGG, ResNet, network_fields
from hflows_jax.models.resnet import ResNetBlock
from hflows_jax.structured.channels import path_of

PyTree = Any
GATE = "Gate_"  # the params of the gating heads are named Gate_0, Gate_1, ...
DELTA = 1e-5  # FTWT's tolerance on the cumulative mass
THRESHOLD_BITS = 20  # bisection steps: the threshold to 2**-20, below DELTA
TAPS = 9  # every gated conv is 3x3

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


class Gating(NamedTuple):
    """FTWT's gate of a conv's output channels, as every gated network calls it.

    ``gating(module, x, out, active_in) -> (out * mask, active)``: ``x`` is the conv's
    input and ``out`` its output after BatchNorm (and ReLU where the layer has one); the
    head (a ``Gate`` created in ``module``) reads ``x``. ``active_in`` and ``active``
    count, per input, the channels of ``x`` and of ``out`` the masks keep. Sown in
    ``module``'s "intermediates": ``gate_logits``, ``gate_targets``, and the conv's
    multiply-adds per input, ``executed_macs`` and ``dense_macs`` (``executed_fraction``).
    """

    threshold: jax.Array  # the mass threshold of the target masks
    by_targets: bool  # the target masks gate the convs, not the heads' (to count theirs)

    def __call__(self, module: nn.Module, x, out, active_in) -> tuple[jax.Array, jax.Array]:
        pooled = jax.lax.stop_gradient(jnp.mean(x, axis=(1, 2)).astype(jnp.float32))
        logits = Gate(out.shape[-1])(jax.nn.softmax(pooled, axis=-1))
        target = mass_target(jax.lax.stop_gradient(out), self.threshold)
        on = target if self.by_targets else jax.lax.stop_gradient(
            (logits > 0).astype(jnp.float32))  # sigmoid > 0.5
        module.sow("intermediates", "gate_logits", logits)
        module.sow("intermediates", "gate_targets", target)
        unit = out.shape[1] * out.shape[2] * TAPS  # per (input, output) channel pair
        active = jnp.sum(on, axis=-1)
        self.count(module, unit * x.shape[-1] * out.shape[-1], x.shape[0],
                   executed=unit * active_in * active)
        return out * on[:, None, None, :].astype(out.dtype), active

    def count(self, module: nn.Module, dense: int, batch: int, executed=None) -> None:
        """Sow a layer's multiply-adds per input: ``dense``, and ``executed`` (default:
        all of them, for a layer no mask gates)."""
        executed = jnp.full((batch,), dense, jnp.float32) if executed is None else executed
        module.sow("intermediates", "executed_macs", jnp.asarray(executed, jnp.float32))
        module.sow("intermediates", "dense_macs", jnp.asarray(dense, jnp.float32))


def sown(intermediates: PyTree, name: str) -> list:
    """Every value sown as ``name`` in ``intermediates``, whatever module sowed it, in
    tree order (the same for every name a module sows together)."""
    return [v for path, v in jax.tree.leaves_with_path(intermediates)
            if any(getattr(k, "key", None) == name for k in path)]


def executed_fraction(intermediates: PyTree) -> jax.Array:
    """Per input, the multiply-adds its masks execute over the dense model's (heads not
    counted, as in FTWT's own count)."""
    return sum(sown(intermediates, "executed_macs")) / sum(sown(intermediates, "dense_macs"))


class FTWTVGG(VGG):
    """The VGG with a gating head on every conv: its ``conv_layer`` replaced, its layer
    loop carrying the ``Gating`` and the channels the last masks keep.

    Its params are the VGG's, under the same names, plus ``Gate_i``; its batch stats add
    ``mass_threshold``, which the model reads and never changes (``calibrate_threshold``
    sets it). ``gate_by_targets=True``: the target masks gate the convs instead of the
    heads' (to count what the targets execute). The classifier's multiply-adds count its
    active inputs.
    """

    flops_target: float = 0.5  # the fraction of multiply-adds to remove

    @nn.compact
    def __call__(self, x, train: bool = False, gate_by_targets: bool = False):
        gating = Gating(mass_threshold(self), gate_by_targets)
        carry = (gating, jnp.full(x.shape[:1], x.shape[-1], jnp.float32))
        x, (_, active) = self.backbone(x, train, carry)
        gating.count(self, x.shape[-1] * self.num_classes, x.shape[0],
                     executed=active * self.num_classes)
        return self.classifier(x)

    def conv_layer(self, x, features: int, norm, carry: tuple) -> tuple[jax.Array, tuple]:
        """The VGG's conv layer, its output channels multiplied by the head's mask."""
        gating, active = carry
        out, _ = super().conv_layer(x, features, norm, None)
        out, active = gating(self, x, out, active)
        return out, (gating, active)


class FTWTResNet(ResNet):
    """The CIFAR ResNet (basic blocks) with a gating head on the stem and on both convs of
    every block, the second one's mask before the residual add (FTWT's default,
    ``gtafterblock=False``); names, ``mass_threshold`` and ``gate_by_targets`` as
    ``FTWTVGG``'s. Counted: a block's first conv reads all its input channels (the sum
    of a residual add is not gated), its projection and the classifier run whole. FTWT's
    own count takes the active channels of the last gated conv instead, across the add,
    which counts fewer multiply-adds than the network runs."""

    flops_target: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False, gate_by_targets: bool = False):
        gating = Gating(mass_threshold(self), gate_by_targets)
        x = self.backbone(x, train, gating)
        gating.count(self, x.shape[-1] * self.num_classes, x.shape[0])
        return self.classifier(x)


def mass_threshold(model: nn.Module) -> jax.Array:
    """The run's threshold, a batch stat; its initial value stands until
    ``calibrate_threshold`` sets it."""
    return model.variable("batch_stats", "mass_threshold", lambda: jnp.asarray(
        1.0 - model.flops_target / 2, jnp.float32)).value


def to_ftwt(model: nn.Module, flops_target: float) -> FTWTVGG | FTWTResNet:
    """The FTWT network of a ``hflows_jax.models`` VGG or basic-block ResNet."""
    if isinstance(model, VGG):
        return FTWTVGG(**network_fields(model, VGG), flops_target=flops_target)
    if isinstance(model, ResNet) and model.block_cls is ResNetBlock:
        return FTWTResNet(**network_fields(model, ResNet), flops_target=flops_target)
    raise ValueError(f"ftwt builds on vgg19 and basic-block ResNets (resnet18, resnet20), got "
                     f"{type(model).__name__}.")


def gating_loss(params: PyTree, intermediates: PyTree) -> jax.Array:
    """Mean over gated convs of the binary cross-entropy between head logits and target
    masks, summed over channels and averaged over the batch (FTWT's mask loss, weight 1)."""
    del params
    losses = [jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, target), axis=-1))
              for logits, target in zip(sown(intermediates, "gate_logits"),
                                        sown(intermediates, "gate_targets"))]
    return sum(losses) / len(losses)


def is_gate(path: str) -> bool:
    """Whether a param path (``"ResNetBlock_0/Gate_1/kernel"``) is a gating head's."""
    return any(part.startswith(GATE) for part in path.split("/"))


def with_heads(heads_tx: optax.GradientTransformation,
               *weights_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """FTWT's two optimizers: ``heads_tx`` for the gating heads, the chain of ``weights_tx``
    for the rest."""
    def labels(params):
        return jax.tree.map_with_path(
            lambda path, _: "heads" if is_gate(path_of(path)) else "weights", params)
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


def targets_executed(model: FTWTVGG | FTWTResNet, variables: PyTree, images: jax.Array,
                     threshold: jax.Array) -> jax.Array:
    """The mean over ``images`` of the fraction of multiply-adds executed when the target
    masks at ``threshold`` gate every conv; BatchNorm on batch statistics, as training
    computes the targets."""
    stats = {**variables["batch_stats"], "mass_threshold": jnp.asarray(threshold, jnp.float32)}
    _, out = model.apply({**variables, "batch_stats": stats}, images, train=True,
                         gate_by_targets=True, mutable=["intermediates", "batch_stats"])
    return jnp.mean(executed_fraction(out["intermediates"]))


def calibrate_threshold(model: FTWTVGG | FTWTResNet, variables: PyTree, batches,
                        bits: int = THRESHOLD_BITS) -> float:
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


def executed_flops(model: FTWTVGG | FTWTResNet, variables: PyTree, images: np.ndarray,
                   batch_size: int = 500) -> float:
    """The mean over ``images`` (normalized) of the fraction of multiply-adds executed."""
    @jax.jit
    def fractions(x):
        _, out = model.apply(variables, x, train=False, mutable=["intermediates"])
        return executed_fraction(out["intermediates"])
    parts = [fractions(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate([np.asarray(p) for p in parts])))
