"""The method registry: what the training loop needs to know about each pruning method.

A ``Method`` says how to build its optax part from a run's ``Budget``, which sparsity
distributions it takes (the first is its default), whether it prunes at initialization,
whether it has a pressure, and optional hooks for methods that change the model, the loss
or the optimizer: ``wrap_model`` (add parameters or modules), ``loss_term`` (a term added
to the task loss), ``combine`` (how its optax part and the weight optimizer combine),
``plain`` (the plain model a wrapped one stands for, for counts and export), and for
methods whose masks change with the input, ``static_masks=False`` and ``executed_flops``.
The loop reads these fields and never tests a method by name; a new method is one
``register(Method(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import hflows_jax as hf
from hflows_jax import recipe

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Scoring:
    """A loss and a few training batches, for scores computed at initialization."""

    loss_fn: Callable[[PyTree, Any], jax.Array]  # (params, batch) -> scalar
    batches: Sequence[Any]


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a method may use of the run it prunes in."""

    target_sparsity: float
    pruning_steps: int
    regrowth_steps: int  # after the pruning steps, in the same phase
    steps_per_epoch: int
    controller_period: int  # steps between pressure-controller decisions
    controller: str  # a name in CONTROLLERS
    presence_lr: optax.Schedule
    weight_lr: optax.Schedule  # the weight optimizer's, by step of the pruning phase
    regrowth_allowance: float
    distribution: str | None  # resolved by Method.distribution; None for methods without
    seed: int
    scoring: Scoring
    channel_groups: Callable[[], Any]  # the model's hf.structured.ChannelGroups, built on call


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Budget], optax.GradientTransformation]
    distributions: tuple[str, ...] = ()  # accepted distributions, the default first
    prunes_at_init: bool = False  # masks fixed (or first drawn) before any training: starts
    # from initialization, not from a dense model, in comparisons
    has_pressure: bool = False  # a pressure controller and presence scores
    # (model, target_sparsity) -> model: extra parameters or modules the method trains with
    # the network.
    wrap_model: Callable[[nn.Module, float], nn.Module] | None = None
    # (params, intermediates) -> scalar added to the task loss; ``intermediates`` is the
    # model's "intermediates" collection from the same forward pass.
    loss_term: Callable[[PyTree, PyTree], jax.Array] | None = None
    # What --target_sparsity removes: "weights", or "flops" (multiply-adds, channel methods).
    target: str = "weights"
    controller: str = "trajectory"  # the pressure controller unless --controller says
    # (method's optax part, *the weight optimizer's links) -> the phase's optimizer. The
    # default chain keeps the optimizer state's layout of earlier checkpoints.
    combine: Callable[..., optax.GradientTransformation] = optax.chain
    # (wrapped model, params, batch_stats) -> (plain model, params, batch_stats): the model
    # of hflows_jax.models that computes what the wrapped one does (DHP: generated kernels).
    plain: Callable[[nn.Module, PyTree, PyTree], tuple] | None = None
    # False: no masks in the optimizer state; the model gates its channels per input (FTWT).
    static_masks: bool = True
    # (model, variables, normalized images) -> mean fraction of multiply-adds executed, for
    # a method whose masks change with the input.
    executed_flops: Callable[[nn.Module, PyTree, Any], float] | None = None

    def distribution(self, requested: str | None) -> str | None:
        """The distribution to build with: the requested one, checked, or the default."""
        if requested is None:
            return self.distributions[0] if self.distributions else None
        if requested not in self.distributions:
            raise ValueError(f"--distribution={requested} does not apply to {self.name}: "
                             f"it takes {list(self.distributions) or 'none'}.")
        return requested


REGISTRY: dict[str, Method] = {}
# Pressure controllers that track the expected-density trajectory, by --controller name.
CONTROLLERS = {"trajectory": hf.pressure.trajectory, "pi": hf.pressure.log_density_pi}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}: use one of {list(REGISTRY)}.")
    return REGISTRY[name]


def _hyperflows(b: Budget):
    target = recipe.pruning_phase_sparsity(b.target_sparsity, b.regrowth_allowance)
    return hf.hyperflows(
        pressure=CONTROLLERS[b.controller](target, b.pruning_steps,
                                           update_every=b.controller_period),
        presence_optimizer=optax.adam(b.presence_lr), seed=b.seed,
        warn=False)  # the run prints train.start_warnings, in its own flags' words


register(Method("hyperflows", _hyperflows, has_pressure=True))


def _hyperflows_channel(b: Budget):
    # No regrowth allowance: channels do not come back after pruning (the pressure is 0,
    # and they keep dying); with it, a 50 % target ended at 56 % (docs/RESULTS.md).
    target = b.target_sparsity
    make = CONTROLLERS[b.controller]
    # Channels keep dying at zero pressure, so the PI controller may pull back (negative
    # pressure): 54 % and 70 % removed for 50 % and 70 % targets, against 56 % and 77 %
    # floored at zero (docs/RESULTS.md).
    signed = {"negative": True} if make is hf.pressure.log_density_pi else {}
    return hf.structured.channel_hyperflows(
        b.channel_groups(),
        pressure=make(target, b.pruning_steps, update_every=b.controller_period, **signed),
        presence_optimizer=optax.adam(b.presence_lr), seed=b.seed)


# PI: with trajectory, one raised pressure period sent every weak channel across zero at
# once (74 % of the multiply-adds removed for a 50 % target; PI: 55.5 %, docs/RESULTS.md).
register(Method("hyperflows_channel", _hyperflows_channel, has_pressure=True, target="flops",
                controller="pi"))
# DHP's reg (1e-4) shrinks a latent by reg * lr a step: about 0.01 over the 30 epochs of the
# cifar10_5k setting, against about 1 over DHP's own runs of hundreds of epochs. The reg is
# set from the run's schedule so that the search can shrink a latent by this much.
DHP_SHRINK = 1.0


def _dhp(b: Budget):
    lr_sum = float(jnp.sum(b.weight_lr(jnp.arange(max(b.pruning_steps, 1)))))
    return hf.structured.dhp.dhp(b.channel_groups(), b.target_sparsity, b.weight_lr,
                                 reg=DHP_SHRINK / lr_sum)


# It trains its hypernetwork model from initialization: no dense model to start from. Its
# proximal step acts on the weight optimizer's final updates: it comes last in the chain.
register(Method("dhp", _dhp, prunes_at_init=True, target="flops",
                wrap_model=lambda model, _: hf.structured.dhp.to_dhp(model),
                combine=lambda search, *weights: optax.chain(*weights, search),
                plain=hf.structured.dhp.plain_variables))


def _ftwt_heads(b: Budget):
    # FTWT weighs its mask loss 1 for the first half of the epochs, then 0. Decoupled, that
    # loss reaches only the heads, so this is the heads' learning rate going to 0.
    half = (b.pruning_steps + b.regrowth_steps) // 2
    return optax.sgd(optax.join_schedules([optax.constant_schedule(hf.structured.ftwt.HEADS_LR),
                                           optax.constant_schedule(0.0)], [half]),
                     momentum=0.9)


register(Method("ftwt", _ftwt_heads, target="flops", wrap_model=hf.structured.ftwt.to_ftwt,
                loss_term=hf.structured.ftwt.gating_loss,
                combine=hf.structured.ftwt.with_heads, static_masks=False,
                executed_flops=hf.structured.ftwt.executed_flops))
register(Method(
    "magnitude", lambda b: hf.baselines.magnitude(
        b.target_sparsity, end_step=b.pruning_steps, update_every=b.steps_per_epoch,
        distribution=b.distribution),
    distributions=("global", "uniform")))
register(Method(
    "snip", lambda b: hf.baselines.snip(
        b.target_sparsity, b.scoring.loss_fn, b.scoring.batches,
        distribution=b.distribution),
    distributions=("global", "uniform", "erk"), prunes_at_init=True))
register(Method(
    "grasp", lambda b: hf.baselines.grasp(
        b.target_sparsity, b.scoring.loss_fn, b.scoring.batches,
        distribution=b.distribution),
    distributions=("global", "uniform", "erk"), prunes_at_init=True))
register(Method(
    "random", lambda b: hf.baselines.random(
        b.target_sparsity, distribution=b.distribution, seed=b.seed),
    distributions=("erk", "uniform"), prunes_at_init=True))


def _rigl(b: Budget):
    return hf.baselines.rigl(b.target_sparsity, end_step=b.pruning_steps,
                             update_every=b.steps_per_epoch, distribution=b.distribution,
                             seed=b.seed)


# Grown connections start at 0 with no momentum, as in RigL's official code (before issue
# 20 they came back with the weight they kept while dropped: optax.chain instead).
register(Method("rigl", _rigl, distributions=("erk", "uniform"), prunes_at_init=True,
                combine=hf.baselines.grow_at_zero))
