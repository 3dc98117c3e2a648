"""Hyperflows as one optax transformation.

Each prunable weight W has a presence score T; the network runs on ``W * [T >= 0]``.
The transformation receives the gradient of the task loss with respect to those
effective weights and, per step:

1. computes the flow ``ste_scale * W * grad`` (the straight-through gradient of the task
   loss with respect to T, defined for present and pruned weights alike);
2. adds the pressure ``gamma / N`` (N = number of prunable entries), i.e. the gradient of
   ``gamma * mean(T)``;
3. steps T with its own optimizer, then steps the pressure controller on the new density;
4. passes ``grad * M`` down the chain, so a pruned weight receives no task gradient.

All of it is optimizer state, updated by pure functions: it jits, pmaps and checkpoints
like any optax state.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hflows_jax import masking, recipe
from hflows_jax.n_m import centered, fits, parse_n_m
from hflows_jax.pressure import PressureController

PyTree = Any


class HyperflowsState(NamedTuple):
    """Everything Hyperflows knows. The mask is derived: ``presence >= 0``."""

    count: jax.Array  # int32: steps applied (finite gradients)
    presence: PyTree  # T, float32, shaped like params; None for non-prunable leaves
    presence_opt_state: optax.OptState
    pressure: NamedTuple  # controller state; its ``gamma`` is the pressure of the next step
    skipped: jax.Array  # int32: steps skipped because the gradients held NaN or Inf
    ste_scale: jax.Array  # float32: the ste_scale of the last init or update

    def pruning_masks(self) -> PyTree:
        return masking.map_prunable(lambda t: t >= 0, self.presence)

    def pressure_value(self) -> jax.Array:
        return self.pressure.gamma

    def skipped_steps(self) -> jax.Array:
        return self.skipped


def weight_flows(ste_scale: Any, like: PyTree, params: PyTree, grads: PyTree) -> PyTree:
    """``ste_scale * W * grad`` on the prunable leaves of ``like`` (non-None), float32."""
    return masking.map_prunable(
        lambda t, w, g: ste_scale * w.astype(jnp.float32) * g.astype(jnp.float32),
        like, params, grads)


def finite_step(grads: PyTree, stepped: NamedTuple, state: NamedTuple, masks: PyTree):
    """``(grads * masks, stepped)``; where the gradients hold NaN or Inf, ``(zeros, state)``
    with the step counted in ``skipped``: a bad batch moves no score, mask or pressure."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), stepped, state)
    new_state = new_state._replace(skipped=state.skipped + (~finite).astype(jnp.int32))
    updates = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)),
                           masking.multiply_masks(grads, masks))
    return updates, new_state


def presence_step_size(optimizer: optax.GradientTransformation) -> float | None:
    """How far ``optimizer`` moves a score per step of one-signed flow, or None if that
    depends on the flow's size.

    Probed on a one-entry tree: the first update for gradients 1 and 1e-3. Adam-like
    optimizers (the reference's) move by their lr for both; for SGD the distance scales
    with the flows, which are not known before training, and the answer is None.
    """
    sizes = []
    with jax.ensure_compile_time_eval():  # concrete numbers even under jit or eval_shape
        zero = jnp.zeros((1,), jnp.float32)
        for g in (1.0, 1e-3):
            try:
                step, _ = optimizer.update(jnp.full((1,), g, jnp.float32),
                                           optimizer.init(zero), zero)
            except Exception:  # noqa: BLE001  (one needing more than (grads, state, params))
                return None
            if isinstance(step, jax.core.Tracer):  # a traced hyperparameter: unknown
                return None
            sizes.append(float(jnp.abs(step[0])))
    return sizes[0] if math.isclose(sizes[0], sizes[1], rel_tol=0.05) else None


def schedule_warnings(pressure: PressureController,
                      presence_optimizer: optax.GradientTransformation,
                      presence_init: tuple[float, float] = (0.2, 0.5),
                      caller: str = "hf.hyperflows",
                      scores_pruned: float | None = None) -> list[str]:
    """Why this pressure schedule and presence optimizer miss the schedule's target.

    ``recipe.unreachable_warning`` and ``recipe.overshoot_warning`` on the fraction of
    scores that must cross zero (``scores_pruned``; default the controller's target) and
    the controller's steps and the presence optimizer's probed step size; nothing for
    controllers without a target (``constant``, ``exponential``) or optimizers whose step
    depends on the flows' size (SGD). ``caller`` opens each message.
    """
    target, steps = pressure.target_sparsity, pressure.total_steps
    low, high = presence_init
    if target is None or not (masking.is_static_number(low) and masking.is_static_number(high)):
        return []
    step = presence_step_size(presence_optimizer)
    if not step:
        return []
    quantile = target if scores_pruned is None else scores_pruned
    args = (quantile, step, steps, (low, high))
    fitting = recipe.fitting_presence_lr(quantile, steps, (low, high))
    hint = ""
    if fitting is not None and not math.isclose(fitting, step, rel_tol=0.05):
        hint = (f" hf.recipe.presence_regime({steps}) gives a presence lr of {fitting:.3g}, "
                "which fits.")
    out = []
    if message := recipe.unreachable_warning(*args):
        out.append(f"{caller}: {message} Give the pressure schedule more steps "
                   f"(total_steps) or the presence optimizer a larger learning rate.{hint}")
    if message := recipe.overshoot_warning(*args):
        out.append(f"{caller}: {message} Give the pressure schedule more steps "
                   f"(total_steps).{hint}")
    return out


def hyperflows(
    pressure: PressureController,
    presence_optimizer: optax.GradientTransformation | None = None,
    is_prunable: masking.IsPrunable | None = None,
    presence_init: tuple[float, float] = (0.2, 0.5),
    ste_scale: float | jax.Array = 0.25,
    seed: int | jax.Array = 0,
    warn: bool = True,
    n_m: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Hyperflows pruner; chain it before the weight optimizer.

    Works under ``optax.inject_hyperparams``, with ``ste_scale`` injectable; a custom
    ``is_prunable`` must then be listed in ``static_args`` (optax takes callables for
    schedules).

    Args:
      pressure: a controller from ``hf.pressure`` (``constant``, ``exponential``,
        ``trajectory``).
      presence_optimizer: optimizer of the presence scores T (default ``optax.adam(1e-3)``,
        the reference).
      is_prunable: ``(path, leaf) -> bool``; default (None): every leaf of rank >= 2.
      presence_init: T starts uniform in this range (all weights present).
      ste_scale: derivative of the step function in the straight-through estimator.
      seed: seed of the presence initialization (an int or an int array).
      warn: at ``init``, a ``UserWarning`` if the pressure schedule's target cannot be
        reached in its ``total_steps`` at the presence optimizer's step size, or is likely
        to be overshot (:func:`schedule_warnings`). ``False`` silences it.
      n_m: ``"2:4"`` and the like: N:M masks. After every step the scores of each group of
        M along a kernel's input axis are shifted so that 0 lies between their N-th and
        N+1-th highest (``hf.n_m.centered``), so ``T >= 0`` keeps exactly N: the pattern
        sets the density and the flows choose which N, a pruned weight coming back when
        its score overtakes a kept one's. Pass ``hf.pressure.constant(0.0)``. A kernel
        whose input axis M does not divide keeps the plain rule ``T >= 0`` (a warning).
    """
    if not isinstance(pressure, PressureController):
        raise ValueError("pressure must be a controller from hf.pressure (constant, "
                         f"exponential or trajectory), got {type(pressure).__name__}.")
    if presence_optimizer is None:
        presence_optimizer = optax.adam(1e-3)
    low, high = presence_init
    if masking.is_static_number(low) and masking.is_static_number(high) and not low <= high:
        raise ValueError(f"presence_init must be a (low, high) range, got {presence_init!r}.")
    if masking.is_static_number(ste_scale) and not (math.isfinite(ste_scale) and ste_scale > 0):
        raise ValueError(f"ste_scale must be positive and finite, got {ste_scale!r}.")
    pattern = None if n_m is None else parse_n_m(n_m)
    if n_m is not None and pattern is None:
        raise ValueError(f"n_m must read like '2:4', got {n_m!r}.")
    if pattern and pressure.target_sparsity is not None:
        raise ValueError(f"with n_m={n_m!r} the pattern sets the density: pass "
                         "pressure=hf.pressure.constant(0.0), not a controller with a target.")

    def to_pattern(presence):
        """Each group of M centred on its N-th and N+1-th scores (n_m); else as is."""
        if pattern is None:
            return presence
        return masking.map_prunable(
            lambda t: centered(t, *pattern) if fits(t.shape, pattern[1]) else t, presence)

    def init(params):
        # Under optax.inject_hyperparams a passed warn arrives as an array, maybe traced.
        if not isinstance(warn, jax.core.Tracer) and bool(warn):
            for message in schedule_warnings(pressure, presence_optimizer, presence_init):
                warnings.warn(message, UserWarning, stacklevel=2)
        key = jax.random.key(seed)
        presence = masking.prunable_like(
            params, is_prunable,
            lambda i, leaf: jax.random.uniform(jax.random.fold_in(key, i), leaf.shape,
                                               jnp.float32, low, high))
        if pattern:
            plain = [f"{tuple(t.shape)}" for t in masking.prunable_leaves(presence)
                     if not fits(t.shape, pattern[1])]
            if plain:
                warnings.warn(f"hf.hyperflows n_m={n_m!r}: kernels {', '.join(plain)} do not "
                              f"split into groups of {pattern[1]} along their input axis; "
                              "they keep the plain rule T >= 0.", UserWarning, stacklevel=2)
            presence = to_pattern(presence)
        return HyperflowsState(
            count=jnp.zeros((), jnp.int32),
            presence=presence,
            presence_opt_state=presence_optimizer.init(presence),
            pressure=pressure.init(),
            skipped=jnp.zeros((), jnp.int32),
            ste_scale=jnp.asarray(ste_scale, jnp.float32),
        )

    def update(grads, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(grads, params, state.presence)
        num_prunable = sum(t.size for t in masking.prunable_leaves(state.presence))

        push = state.pressure.gamma / num_prunable
        presence_grads = masking.map_prunable(lambda f: f + push,
                                              weight_flows(ste_scale, state.presence, params,
                                                           grads))
        steps, presence_opt_state = presence_optimizer.update(
            presence_grads, state.presence_opt_state, state.presence)
        presence = to_pattern(masking.map_prunable(lambda t, s: t + s.astype(jnp.float32),
                                                   state.presence, steps))
        count = optax.safe_increment(state.count)
        density = masking.density_of(masking.map_prunable(lambda t: t >= 0, presence))
        stepped = state._replace(
            count=count,
            presence=presence,
            presence_opt_state=presence_opt_state,
            pressure=pressure.update(state.pressure, density, count),
        )
        updates, new_state = finite_step(grads, stepped, state, state.pruning_masks())
        return updates, new_state._replace(ste_scale=jnp.asarray(ste_scale, jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)


def _hyperflows_state(opt_state: PyTree, caller: str) -> HyperflowsState:
    state = masking.find_pruner_state(opt_state)
    if not isinstance(state, HyperflowsState):
        raise ValueError(f"{caller} needs a Hyperflows state, got {type(state).__name__}.")
    return state


def flows(params: PyTree, grads: PyTree, opt_state: PyTree) -> PyTree:
    """The flows ``ste_scale * W * grad`` Hyperflows computes: float32, None off prunable leaves.

    ``grads`` is the task gradient with respect to the effective weights ``W * M``;
    ``ste_scale`` is read from the Hyperflows state in ``opt_state``. NNX ``Param`` states
    are read through their values; the flows come back as plain arrays.
    """
    state = _hyperflows_state(opt_state, "flows")
    params, grads = masking.unwrap_nnx(params), masking.unwrap_nnx(grads)
    masking.check_update_args(grads, params, state.presence)
    return weight_flows(state.ste_scale, state.presence, params, grads)
