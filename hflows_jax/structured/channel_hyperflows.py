"""Channel Hyperflows: one presence score per channel, as one optax transformation.

Everything is Hyperflows (``hf.hyperflows``) with the weight replaced by a channel group
(``ChannelGroups``): the mask ``M = [T >= 0]`` of channel c zeroes the kernel rows that
read c (every conv or dense layer's input rows for c), and

- the channel's flow is the sum of its rows' flows ``ste_scale * w * grad``;
- the pressure ``gamma / C`` (C channels in all) is the gradient of ``gamma * mean(T)``;
- the controller steers gamma on the fraction of multiply-adds kept (``target="flops"``)
  or of channels kept (``target="channels"``), so its target sparsity is the fraction
  removed;
- ``grads * M`` goes down the chain;
- where the pressure schedule ends, the budget lands: every score shifts by the one
  amount that keeps the fraction nearest the target, and the channels stay as they are
  from then on (``land``).

Why the reading side. Put a scale ``s_c`` on channel c where every layer reads it: a
reader computes ``sum_c s_c a_c W[c, :]``, so ``s_c`` and the rows ``W[c, :]`` enter only
as their product, and ``dL/ds_c = sum_rows W[c, o] dL/dW_eff[c, o]`` with ``W_eff`` the
rows the network runs on (``s_c W``). At ``s = M`` that is the channel's flow. A kept
channel's flow is the loss's first-order change when the channel is scaled; a pruned one's
(``s_c = 0``, rows zeroed, the activation ``a_c`` still made by its own filter, BatchNorm
and ReLU) is the change from bringing it back, the flow METHOD.md section 2 asks for. With
the writing side masked instead (filter, BatchNorm scale and shift), a pruned channel is
exactly 0 after its ReLU, whose gradient at 0 is 0: its flow was exactly 0 and a score
below zero never came back. Pruned rows get no gradient (``grads * M``), nor does a
pruned channel's filter (nothing reads it): only weight decay moves them, as it moves a
pruned weight in Hyperflows.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hflows_jax import masking
from hflows_jax.hyperflows import finite_step, schedule_warnings, weight_flows
from hflows_jax.pressure import PressureController
from hflows_jax.structured.channels import ChannelGroups, keep_at_least
from hflows_jax.structured.latency import LatencyTable

PyTree = Any
TARGETS = ("flops", "channels", "latency")
PRESSURE_BY = ("channel", "macs", "latency")
LANDED = 0.02  # a landing further than this from the target (fraction removed) warns


class ChannelHyperflowsState(NamedTuple):
    """Presence scores per channel group; ``masks`` are their per-weight broadcast."""

    count: jax.Array  # int32: steps applied (finite gradients)
    presence: dict  # group name -> T, float32, one per channel
    presence_opt_state: optax.OptState
    pressure: NamedTuple  # controller state; its ``gamma`` is the pressure of the next step
    skipped: jax.Array  # int32: steps skipped because the gradients held NaN or Inf
    ste_scale: jax.Array  # float32
    kept: dict  # group name -> bool per channel: T >= 0, or among the layer's floor
    masks: PyTree  # bool, shaped like params, None off the groups

    def pruning_masks(self) -> PyTree:
        return self.masks

    def channel_masks(self) -> dict:
        return self.kept

    def pressure_value(self) -> jax.Array:
        return self.pressure.gamma

    def skipped_steps(self) -> jax.Array:
        return self.skipped


def kept_channels(presence: dict, min_channels: int, round_to: int = 1) -> dict:
    """``T >= 0``, and in every layer at least its ``min_channels`` highest scores; with
    ``round_to``, its next highest too, up to a multiple of ``round_to`` (or all).

    The floor (DHP's ``mc``) keeps a layer from losing every channel, which makes the
    whole network a constant; at 85 % one such run did (docs/journal.md). Rounding keeps
    the channel counts the served model runs fast (Torch-Pruning's ``round_to``), so that
    the network trained is the one served.
    """
    def keep(t):
        n = t.shape[-1]
        count = jnp.maximum(jnp.sum(t >= 0), min(min_channels, n))
        return keep_at_least(t, 0.0, jnp.minimum(n, -(-count // round_to) * round_to))

    return {g: keep(t) for g, t in presence.items()}


def landing_shift(presence: dict, kept_fraction, goal: float, min_channels: int,
                  round_to: int) -> jax.Array:
    """The score ``tau`` whose cut ``T >= tau`` (with the floors and rounding) keeps the
    fraction nearest ``goal``: a bisection over the sorted scores, as the fraction kept
    falls as ``tau`` rises."""
    scores = jnp.sort(jnp.concatenate([t.reshape(-1) for t in presence.values()]))
    n = scores.shape[0]

    def kept_at(i):
        shifted = {g: t - scores[i] for g, t in presence.items()}
        return kept_fraction(kept_channels(shifted, min_channels, round_to))

    def halve(_, bounds):  # kept_at(lo) >= goal, or lo == 0
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        enough = kept_at(mid) >= goal
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, max(1, n.bit_length()), halve, (0, n - 1))
    up = jnp.minimum(lo + 1, n - 1)
    closer = jnp.abs(kept_at(up) - goal) < jnp.abs(kept_at(lo) - goal)
    return scores[jnp.where(closer, up, lo)]


def _warn_if_missed(target: float, removed: np.ndarray) -> None:
    """Host side of the landing (``jax.debug.callback``): numpy only, no JAX call."""
    removed = min(max(float(np.asarray(removed)), 0.0), 1.0)  # no "-0.00 %"
    if abs(removed - target) > LANDED:
        warnings.warn(f"hf.structured.channel_hyperflows: the channel budget landed at "
                      f"{removed:.2%} removed for a {target:.2%} target: no cut of "
                      "the scores comes nearer with these floors (min_channels) and "
                      "round_to.", UserWarning, stacklevel=2)


def pushes(groups: ChannelGroups, kept: dict, gamma: jax.Array, by: str,
           latency: LatencyTable | None = None) -> dict:
    """Per group, the pressure on each of its channels; they sum to ``gamma``."""
    if by == "channel":
        return {g: gamma / groups.total for g in groups.sizes}
    if by == "macs":
        cost = groups.marginal_macs(kept)
    else:
        cost = latency.marginal({g: jnp.sum(k) for g, k in kept.items()})
    total = jnp.maximum(sum(n * cost[g] for g, n in groups.sizes.items()), 1e-30)
    return {g: gamma * cost[g] / total for g in groups.sizes}


def channel_hyperflows(
    groups: ChannelGroups,
    pressure: PressureController,
    presence_optimizer: optax.GradientTransformation | None = None,
    target: str = "flops",
    pressure_by: str = "channel",
    presence_init: tuple[float, float] = (0.2, 0.5),
    ste_scale: float = 0.25,
    min_channels: int = 4,
    seed: int = 0,
    warn: bool = True,
    round_to: int = 1,
    land: bool = True,
    land_step: int | None = None,
    latency: LatencyTable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Hyperflows over channels; chain it before the weight optimizer, like ``hf.hyperflows``.

    Args:
      groups: ``hf.structured.channel_groups(model, params, image_shape)``.
      pressure: a controller from ``hf.pressure``; its target sparsity is the fraction of
        multiply-adds (``target="flops"``), channels (``"channels"``) or measured latency
        (``"latency"``: ``1 - 1 / speed-up``) removed.
      presence_optimizer: optimizer of the channel scores (default ``optax.adam(1e-3)``).
      target: what the controller measures, ``"flops"``, ``"channels"`` or ``"latency"``
        (the model's latency as ``latency`` predicts it from the live channel counts).
      pressure_by: how gamma is shared out: ``"channel"``, ``gamma / C`` on every channel;
        ``"macs"``, on each channel in proportion to the multiply-adds one more channel of
        its group costs with the channels kept now (``ChannelGroups.marginal_macs``), so a
        channel of a layer that costs little is pushed little; ``"latency"``, likewise by
        the seconds it costs (``LatencyTable.marginal``). The pushes sum to gamma.
      presence_init: T starts uniform in this range (every channel present).
      ste_scale: derivative of the step function in the straight-through estimator.
      min_channels: every layer keeps at least this many channels (its highest scores),
        as DHP's ``mc``; 0 for none.
      round_to: every layer keeps a multiple of this many channels (or all of them): the
        next highest scores below zero fill the count up. ``hf.export`` then serves these
        counts as trained (8 suits XLA:CPU's convs: ``experiments.conv_speed``).
      seed: seed of the presence initialization.
      warn: at ``init``, a ``UserWarning`` if the pressure schedule is likely to miss its
        target: too short for the presence lr to prune that many channels, or so short
        that the controller overshoots (``hf.hyperflows``' rule, on the fraction of
        channels a uniform cut removes for a multiply-add target: ``1 - sqrt(1 - s)``).
        ``False`` silences it.
      land: at step ``land_step`` every score shifts by the one amount that brings the
        fraction removed nearest the controller's target, and from then on scores and
        channels stay (the weights train on). A controller alone missed by 2 to 50
        points in a user's loop (docs/results/channel_landing). A landing still further
        than ``LANDED`` from the target (floors, rounding) warns at that step, from
        inside ``jit``. Needs a controller with a target.
      land_step: the step (count of steps applied) to land at; default the end of the
        pressure schedule, ``total_steps + hold_steps``.
      latency: ``hf.structured.latency.measure(model, params, shape, batch)``, a table of
        the model's layers' measured latency against their channel counts, for
        ``target="latency"`` and ``pressure_by="latency"``.
    """
    if not isinstance(groups, ChannelGroups):
        raise ValueError("groups must come from hf.structured.channel_groups(model, params, "
                         f"image_shape), got {type(groups).__name__}.")
    if not isinstance(pressure, PressureController):
        raise ValueError("pressure must be a controller from hf.pressure, got "
                         f"{type(pressure).__name__}.")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if pressure_by not in PRESSURE_BY:
        raise ValueError(f"pressure_by must be one of {PRESSURE_BY}, got {pressure_by!r}.")
    if "latency" in (target, pressure_by):
        if not isinstance(latency, LatencyTable):
            raise ValueError(
                "target='latency' and pressure_by='latency' need latency="
                "hf.structured.latency.measure(model, params, input_shape, batch), got "
                f"{type(latency).__name__}.")
        if set(latency.points) != set(groups.sizes) or any(
                latency.points[g][-1] != n for g, n in groups.sizes.items()):
            raise ValueError("this latency table was measured on another model than these "
                             "channel groups': measure it on the same model and params.")
    if not (math.isfinite(ste_scale) and ste_scale > 0):
        raise ValueError(f"ste_scale must be positive and finite, got {ste_scale!r}.")
    low, high = presence_init
    if not low <= high:
        raise ValueError(f"presence_init must be a (low, high) range, got {presence_init!r}.")
    if min_channels < 0:
        raise ValueError(f"min_channels must be >= 0, got {min_channels!r}.")
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}.")
    presence_optimizer = presence_optimizer or optax.adam(1e-3)
    kept_fraction = {
        "flops": groups.flops_fraction, "channels": groups.channels_fraction,
        "latency": lambda kept: latency.fraction(groups.live_counts(kept)),
    }[target]
    goal = pressure.target_sparsity
    if land and goal is not None:
        land_step = (pressure.total_steps + pressure.hold_steps if land_step is None
                     else land_step)
        if int(land_step) != land_step or land_step < 1:
            raise ValueError(f"land_step must be a positive integer, got {land_step!r}.")
    elif land and land_step is not None:
        raise ValueError("land_step needs a pressure controller with a target sparsity "
                         "(hf.pressure.trajectory or log_density_pi).")
    else:
        land_step = None

    def landed(presence, count):
        """The scores shifted onto the budget at ``land_step``; unchanged before."""
        def shift(presence):
            tau = landing_shift(presence, kept_fraction, 1.0 - goal, min_channels, round_to)
            presence = {g: t - tau for g, t in presence.items()}
            removed = 1.0 - kept_fraction(kept_channels(presence, min_channels, round_to))
            jax.debug.callback(functools.partial(_warn_if_missed, goal), removed)
            return presence
        return jax.lax.cond(count == land_step, shift, lambda p: p, presence)

    def init(params):
        params = masking.unwrap_nnx(params)
        groups.check(params)
        if warn:
            for message in channel_schedule_warnings(pressure, presence_optimizer,
                                                     presence_init, target):
                warnings.warn(message, UserWarning, stacklevel=2)
        key = jax.random.key(seed)
        presence = {g: jax.random.uniform(jax.random.fold_in(key, i), (n,), jnp.float32,
                                          low, high)
                    for i, (g, n) in enumerate(groups.sizes.items())}
        return ChannelHyperflowsState(
            count=jnp.zeros((), jnp.int32), presence=presence,
            presence_opt_state=presence_optimizer.init(presence), pressure=pressure.init(),
            skipped=jnp.zeros((), jnp.int32), ste_scale=jnp.asarray(ste_scale, jnp.float32),
            kept=(kept := kept_channels(presence, min_channels, round_to)),
            masks=groups.expand(kept, params))

    def update(grads, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(grads, params, state.masks)
        flows = weight_flows(ste_scale, state.masks, params, grads)
        push = pushes(groups, state.kept, state.pressure.gamma, pressure_by, latency)
        presence_grads = {g: f + push[g] for g, f in groups.reduce(flows).items()}
        steps, presence_opt_state = presence_optimizer.update(
            presence_grads, state.presence_opt_state, state.presence)
        presence = jax.tree.map(lambda t, s: t + s.astype(jnp.float32), state.presence, steps)
        count = optax.safe_increment(state.count)
        if land_step is not None:  # landed: the channels stay
            presence = jax.tree.map(lambda new, old: jnp.where(count > land_step, old, new),
                                    landed(presence, count), state.presence)
        kept = kept_channels(presence, min_channels, round_to)
        stepped = state._replace(
            count=count, presence=presence, presence_opt_state=presence_opt_state,
            pressure=pressure.update(state.pressure, kept_fraction(kept), count),
            kept=kept, masks=groups.expand(kept, params))
        return finite_step(grads, stepped, state, state.masks)

    return optax.GradientTransformationExtraArgs(init, update)


def channel_schedule_warnings(pressure: PressureController,
                              presence_optimizer: optax.GradientTransformation,
                              presence_init: tuple[float, float], target: str) -> list[str]:
    """Why this schedule is likely to miss its target: ``hf.hyperflows``' warnings on the
    channels to prune, and a controller with a target that cannot pull back. In a user's
    loop (the Flax MNIST example's CNN, one epoch) every run under ``trajectory`` ran 2 to
    40 points past its target before the landing: pruned channels keep dying at zero
    pressure (docs/results/channel_landing)."""
    out = schedule_warnings(pressure, presence_optimizer, presence_init,
                            "hf.structured.channel_hyperflows",
                            channels_to_prune(pressure, target))
    if pressure.target_sparsity is not None and not pressure.pulls_back:
        out.append("hf.structured.channel_hyperflows: this pressure controller cannot pull "
                   "back (no negative pressure), and channels keep dying at zero pressure: "
                   "the mask runs past its target (2 to 40 points in "
                   "docs/results/channel_landing), and the landing then brings back "
                   "channels that did not train with the rest. Use "
                   "hf.pressure.log_density_pi(..., kp=0.25, ki=0.25, negative=True).")
    return out


def channels_to_prune(pressure: PressureController, target: str) -> float | None:
    """The fraction of channels whose scores must cross zero to reach the controller's
    target: itself for ``target="channels"``; for multiply-adds (and latency, taken as
    following them), that of a uniform cut (a conv's cost goes with its input times its
    output channels): ``1 - sqrt(1 - s)``."""
    s = pressure.target_sparsity
    if s is None or target == "channels":
        return s
    return 1.0 - math.sqrt(max(0.0, 1.0 - s))


def flops_fraction(groups: ChannelGroups, opt_state: PyTree) -> jax.Array:
    """The fraction of multiply-adds the channels kept in ``opt_state`` cost (a channel
    pruner's: channel Hyperflows, DHP)."""
    return groups.flops_fraction(masking.channel_masks(opt_state))
