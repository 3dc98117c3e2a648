"""What the training loop asks of a pruning method, and the defaults every method shares.

A method is an object. ``Method`` holds the defaults: an optax part chained before the
weight optimizer, the model as ``--model`` builds it, masks in the optimizer state, and
``--target_sparsity`` counted in weights. A method's file overrides only what differs, as
jaxpruner's algorithms do; the loop asks the method and never tests a name or a flag.
``PressureMethod`` and ``ChannelMethod`` hold what the Hyperflows methods and the channel
methods share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

import hflows_jax as hf
from hflows_jax import recipe

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Scoring:
    """A loss and a few training batches, for scores computed at initialization."""

    loss_fn: Callable[[PyTree, Any], jax.Array]  # (params, batch) -> scalar
    batches: Sequence[Any]
    # (params, batch, batch_stats) -> scalar, BatchNorm in eval mode on the statistics the
    # train step hands to ``tx.update`` (``batch_stats=``): scores during training.
    eval_loss_fn: Callable[..., jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a method may use of the run it prunes in."""

    target_sparsity: float
    pruning_steps: int
    regrowth_steps: int  # after the pruning steps: in the same phase, or the retraining one
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
    model: str = ""  # --model's name, for settings an official script sets per network
    measure: str | None = None  # --measure, for the methods whose options hold it
    rounds: int | None = None  # --rounds, likewise
    round_to: int | None = None  # --round_to, likewise
    # --target=latency: the model's hf.structured.LatencyTable, measured or loaded on call
    latency: Callable[[], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Retraining:
    """A phase over the run's regrowth epochs that trains another network than the pruning
    phase's, from where that one ended (``Method.retraining``)."""

    model: nn.Module  # the network it trains
    tx: optax.GradientTransformation  # its optimizer, masks in its state
    # The pruning phase's last TrainState -> this phase's first (step 0, ``tx``'s state):
    # traceable, as ``jax.eval_shape`` of it is the template a checkpoint restores onto.
    start: Callable[[Any], Any]
    learning_rates: Callable[[int], dict[str, float]]  # phase step -> {"lr": ...}


# Pressure controllers that track the expected-density trajectory, by --controller name.
CONTROLLERS = ("trajectory", "pi")


def pressure_controller(b: Budget, target: float, signed: bool = False, hold: bool = False,
                        pi_gains: tuple[float, float] = (1.0, 0.5)):
    """The ``--controller`` steering the pressure to ``target`` over the pruning steps.
    ``signed``: the PI controller may push back with a negative pressure. ``hold``: it
    goes on holding the target over the regrowth steps (``hold_steps``). ``pi_gains``:
    the PI controller's ``(kp, ki)``."""
    hold_steps = b.regrowth_steps if hold else 0
    if b.controller == "pi":
        kp, ki = pi_gains
        return hf.pressure.log_density_pi(target, b.pruning_steps,
                                          update_every=b.controller_period, kp=kp, ki=ki,
                                          negative=signed, hold_steps=hold_steps)
    return hf.pressure.trajectory(target, b.pruning_steps, update_every=b.controller_period,
                                  hold_steps=hold_steps)


def presence_settings(cfg, steps_per_epoch: int) -> tuple[float, int]:
    """(presence lr, controller period in steps): the flags where given, else the
    reference regime for this run's length (``recipe.presence_regime``)."""
    p = cfg.method
    lr, period = recipe.presence_regime(cfg.schedule.pruning_epochs * steps_per_epoch)
    if p.pressure_updates_per_epoch:
        period = max(1, steps_per_epoch // p.pressure_updates_per_epoch)
    return p.presence_lr or lr, period


def no_readings(opt_state: PyTree) -> dict[str, float]:
    """The log's pruning figures where nothing is pruned (a dense phase; FTWT's gates)."""
    del opt_state
    return {"sparsity": 0.0, "pressure": 0.0, "skipped_steps": 0}


class Method:
    """A pruning method as the training loop sees it. Subclasses set ``name`` and
    ``pruner``, and override what differs."""

    name: str
    distributions: tuple[str, ...] = ()  # accepted distributions, the default first
    # Masks fixed (or first drawn) before any training: a comparison starts it from
    # initialization, not from a dense model.
    prunes_at_init: bool = False
    target: str = "weights"  # what --target_sparsity removes: "weights" or "flops"
    # The pruning phase's network runs on W * M with M in the optimizer state; False: on W
    # as it is (FTWT's model gates its channels per input; DHP's search is unmasked).
    masked: bool = True
    # (params, intermediates) -> scalar added to the task loss; ``intermediates`` is the
    # model's "intermediates" collection from the same forward pass. None: none.
    loss_term: Callable[[PyTree, PyTree], jax.Array] | None = None
    controller: str = "trajectory"  # the pressure controller unless --controller says
    options: tuple[str, ...] = ()  # the method flags only some methods read, that this one does

    # --- building the run -----------------------------------------------------------------

    def pruner(self, budget: Budget) -> optax.GradientTransformation:
        """The method's optax part."""
        raise NotImplementedError(f"{type(self).__name__} defines no pruner.")

    def optimizer(self, budget: Budget, *weight_links: optax.GradientTransformation
                  ) -> optax.GradientTransformation:
        """The pruning phase's optimizer: the pruner, then the weight optimizer."""
        return optax.chain(self.pruner(budget), *weight_links)

    def model(self, plain: nn.Module, target_sparsity: float) -> nn.Module:
        """The network the method trains: ``plain`` (``--model``), or a wrapper of it."""
        del target_sparsity
        return plain

    def retraining(self, budget: Budget, model: nn.Module) -> Retraining | None:
        """What trains in the run's regrowth epochs in place of the pruning phase's own
        network (DHP: its pruned plain VGG, fine-tuned with its own schedule). ``model``:
        the pruning phase's. None: the pruning phase runs on through them."""
        del budget, model
        return None

    def take_over(self, fresh: tuple, dense: tuple) -> tuple:
        """``(params, batch_stats)`` starting from a plain dense model's (``--init_checkpoint``):
        its variables, by path, over the ``fresh`` initialization of ``model``'s, which
        keeps what the plain model lacks (FTWT's heads, in the ResNet's blocks too)."""
        return tuple(self._over(f, d, "") for f, d in zip(fresh, dense))

    def _over(self, fresh, dense, where: str):
        if not isinstance(dense, Mapping):
            return dense
        missing = sorted(f"{where}{k}" for k in set(dense) - set(fresh))
        if missing:
            raise ValueError(f"--method={self.name} has no layers {missing} to take over a "
                             "plain dense model: train it from initialization (--dense_epochs).")
        return {**fresh, **{k: self._over(fresh[k], v, f"{where}{k}/") for k, v in dense.items()}}

    def calibrate(self, model: nn.Module, variables: tuple, batches: Sequence[Any]) -> tuple:
        """``(params, batch_stats)`` to train from, given the ``variables`` a run starts
        from (fresh, or taken over) and a few of its training batches (``Scoring``'s):
        where a method sets what depends on those weights (FTWT its mass threshold).
        Default: as given."""
        del model, batches
        return variables

    def distribution(self, requested: str | None) -> str | None:
        """The distribution to build with: the requested one, checked, or the default."""
        if requested is None:
            return self.distributions[0] if self.distributions else None
        try:
            return hf.baselines.distributions.check_distribution(requested, self.distributions)
        except ValueError:
            raise ValueError(f"--distribution={requested} does not apply to {self.name}: "
                             f"it takes {list(self.distributions) or 'none'}.") from None

    def learning_rates(self, budget: Budget, step: int) -> dict[str, float]:
        """The rates logged for a step of the pruning phase."""
        return {"lr": float(budget.weight_lr(step))}

    def start_warnings(self, cfg, steps_per_epoch: int) -> list[str]:
        """What can be told before the run that keeps it from its target."""
        del cfg, steps_per_epoch
        return []

    # --- reading the run ------------------------------------------------------------------

    def readings(self, opt_state: PyTree) -> dict[str, float]:
        """The pruning state's figures for an epoch's log row."""
        return {"sparsity": float(hf.sparsity(opt_state)), "pressure": 0.0,
                "skipped_steps": int(hf.skipped_steps(opt_state))}

    def layer_sparsity(self, opt_state: PyTree) -> dict[str, float]:
        return {k: float(v) for k, v in hf.layer_sparsity(opt_state).items()}

    def plain(self, model: nn.Module, params: PyTree, batch_stats: PyTree) -> tuple:
        """``(model, params, batch_stats)`` as a model of ``hflows_jax.models``, which
        channel groups, counts and export read (DHP: the VGG its hypernetworks generate)."""
        return model, params, batch_stats

    def pruned_network(self, model: nn.Module, params: PyTree, batch_stats: PyTree,
                       opt_state: PyTree, image_shape: tuple) -> tuple:
        """``(model, variables, masks, groups)``: what a pruning state stands for, ready for
        ``hf.export``, pruned entries exactly 0; ``groups``: channel methods' (else None)."""
        del image_shape
        model, params, batch_stats = self.plain(model, hf.finalize(params, opt_state),
                                                batch_stats)
        return (model, {"params": params, "batch_stats": batch_stats}, hf.masks(opt_state),
                None)

    def removed(self, network: tuple, opt_state: PyTree,
                test_images: Callable[[], np.ndarray]) -> tuple[float, str]:
        """(the fraction of the target's measure removed, that measure in words)."""
        del network, test_images
        return float(hf.sparsity(opt_state)), "sparsity"

    def structured_row(self, report: dict, state, exported: Callable[[], dict]) -> dict:
        """A row of ``experiments.structured``: ``exported()`` measures the exported model."""
        del report, state
        return exported()


class PressureMethod(Method):
    """A method with presence scores and a pressure controller (Hyperflows)."""

    def learning_rates(self, budget: Budget, step: int) -> dict[str, float]:
        return {**super().learning_rates(budget, step),
                "presence_lr": float(budget.presence_lr(step))}

    def readings(self, opt_state: PyTree) -> dict[str, float]:
        return {**super().readings(opt_state),
                "pressure": float(hf.pressure_value(opt_state))}

    def scores_pruned(self, target_sparsity: float) -> float:
        """The fraction of presence scores that must cross zero to reach the target."""
        return target_sparsity

    def start_warnings(self, cfg, steps_per_epoch: int) -> list[str]:
        """A pruning phase too short for the presence scores to reach the target, or so
        short that they overshoot it."""
        p = cfg.method
        target = self.scores_pruned(
            recipe.pruning_phase_sparsity(p.target_sparsity, p.regrowth_allowance))
        steps = cfg.schedule.pruning_epochs * steps_per_epoch
        args = (target, presence_settings(cfg, steps_per_epoch)[0], steps)
        remedy = " Give it more pruning epochs."
        fitting = recipe.fitting_presence_lr(target, steps)
        if p.presence_lr is not None and fitting is not None:
            remedy = (" Give it more pruning epochs, or drop --presence_lr: its default "
                      f"(recipe.presence_regime) is {fitting:.3g} here, which fits.")
        warnings = [recipe.unreachable_warning(*args), recipe.overshoot_warning(*args)]
        return super().start_warnings(cfg, steps_per_epoch) + [w + remedy for w in warnings
                                                               if w]


class ChannelMethod(Method):
    """A method that removes whole channels: ``--target_sparsity`` counts multiply-adds."""

    target = "flops"

    def pruned_network(self, model, params, batch_stats, opt_state, image_shape) -> tuple:
        """Masks expanded from the kept channels onto the rows that read them."""
        params = hf.finalize(params, opt_state)
        model, params, batch_stats = self.plain(model, params, batch_stats)
        groups = hf.structured.channel_groups(model, params, image_shape)
        masks = groups.expand(hf.channel_masks(opt_state), params)
        return model, {"params": params, "batch_stats": batch_stats}, masks, groups

    def removed(self, network, opt_state, test_images) -> tuple[float, str]:
        groups = network[3]
        return (1.0 - float(hf.structured.flops_fraction(groups, opt_state)),
                "of the multiply-adds removed")
