"""Pruning by scores: once, now, on any params (``prune``), or at chosen steps of
training (``prune_at``).

``hf.prune(params, "magnitude", 0.9)`` keeps the 10 % of weights with the highest
scores; with ``groups`` (``hf.structured.channel_groups``) it keeps whole channels, and
``hf.export`` then builds the smaller model. The masks are the ones every pruner's state
holds (``hf.masks``): booleans shaped like the prunable leaves, None elsewhere. To
fine-tune, chain ``fixed_masks(masks)`` before the optimizer: the masks then sit in its
state, where ``hf.apply_masks``, ``hf.masked_value_and_grad`` and ``hf.export`` find them.

``prune_at`` prunes by an importance measure during training: once (at initialization,
or after k epochs) or in rounds, as Lubana and Dick's code runs it
(EkdeepSLubana/flowandprune, ``main.py``: train, score, prune, and again). At each
pruning step the measure scores the network as it runs, on ``W * M``; what is pruned
stays pruned. Round k of n prunes to the density whose inverse grows linearly,
``1 / d_k = 1 + (k / n) (1 / (1 - s) - 1)`` (the paper's ``p_ratios``). Its gradients
come from ``loss_fn(params, batch)`` over ``batches`` captured at construction. To score
on the loop's current BatchNorm statistics, as the paper does (eval mode), name them in
``loss_args``: ``prune_at(..., loss_args=("batch_stats",))`` hands
``tx.update(..., batch_stats=...)``'s value to ``loss_fn(params, batch, batch_stats=...)``
at every pruning step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hflows_jax import importance, masking
from hflows_jax.baselines import distributions
from hflows_jax.baselines.distributions import PER_LAYER
from hflows_jax.baselines.oneshot import OneShotState
from hflows_jax.n_m import check_n_m_sparsity, parse_n_m
from hflows_jax.structured.channels import ChannelGroups, keep_at_least

PyTree = Any


def check_channel_scores(scores: dict, groups: ChannelGroups) -> None:
    if set(scores) != set(groups.sizes) or any(
            jnp.shape(scores[g]) != (n,) for g, n in groups.sizes.items()):
        raise ValueError("channel scores must hold one vector per group of these channel "
                         "groups, a score per channel (importance.filter_scores).")


def kept_channels(scores: dict, sparsity, distribution: str, groups: ChannelGroups,
                  min_channels: int = 1, min_fraction: float = 0.0) -> dict:
    """The channels to keep, per group: the highest ``scores`` over all groups
    (``"global"``, as the seed paper ranks filters) or in each (``"uniform"``). Every group
    keeps at least ``min_channels``, and with ``min_fraction`` at least
    ``floor(min_fraction * n) + 1`` of its ``n`` channels still scored (finite): the seed
    code's ``constrain_ratios`` with 0.05. ``sparsity`` may be traced."""
    def floor(s):
        """At most the channels still scored: a pruned one (-inf) never comes back."""
        alive = jnp.sum(jnp.isfinite(s))
        least = jnp.maximum(min_channels, jnp.floor(min_fraction * alive).astype(jnp.int32)
                            + (jnp.asarray(min_fraction) > 0))
        return jnp.minimum(least, alive)

    if distribution == "global":
        flat = jnp.concatenate([scores[g] for g in groups.sizes])
        keep = jnp.maximum(1, jnp.round((1 - sparsity) * flat.size)).astype(jnp.int32)
        cutoff = jnp.sort(flat)[flat.size - keep]
        return {g: keep_at_least(s, cutoff, floor(s)) for g, s in scores.items()}
    if distribution == "uniform":
        return {g: distributions.keep_top(s, jnp.maximum(
            floor(s), jnp.round((1 - sparsity) * s.size)).astype(jnp.int32))
                for g, s in scores.items()}
    raise ValueError(f"channels take distribution 'global' or 'uniform', got "
                     f"{distribution!r}.")


def prune(params: PyTree, scores: PyTree | str, sparsity: float | None = None, *,
          distribution: str = "global", groups: ChannelGroups | None = None,
          loss_fn: importance.LossFn | None = None, batches: Sequence[Any] | None = None,
          min_channels: int = 1, min_fraction: float = 0.0,
          is_prunable: masking.IsPrunable | None = None,
          fn: Callable[[PyTree, Any], Any] | None = None) -> PyTree:
    """Masks that keep the highest ``scores`` of ``params``.

    Args:
      params: the model's params (linen dict or ``nnx.State``), trained or fresh.
      scores: a tree shaped like ``params`` (weights), a dict of one vector per group
        (channels, ``importance.filter_scores``), or a measure's name
        (``importance.MEASURES``), computed here from ``loss_fn`` and ``batches``; or
        ``"wanda"``: ``|W|`` times its input feature's norm over ``batches`` of inputs
        through ``fn`` (``importance.wanda_scores``; weights only), with
        ``distribution="per_output"`` as Wanda compares.
      sparsity: the fraction removed: of the prunable weights, or with ``groups`` of the
        channels. With an N:M ``distribution``, None (it is ``1 - N/M``).
      distribution: ``"global"`` (one ranking), ``"uniform"`` (every layer alike),
        ``"erk"`` (weights only), ``"per_output"`` (every output unit of every layer
        alike, weights only), or ``"N:M"`` such as ``"2:4"`` (weights only: N kept in
        every M consecutive input entries; layers whose input axis M does not divide stay
        dense, with a warning).
      groups: prune whole channels of these groups (``hf.structured.channel_groups``);
        masks zero the rows that read a pruned channel, as ``hf.export`` expects.
      loss_fn: ``loss_fn(params, batch) -> scalar``, for a named measure that reads
        gradients (BatchNorm in eval mode: ``hf.importance``).
      batches: the batches ``loss_fn`` is taken over.
      min_channels: with ``groups``, every group keeps at least ``min_channels``.
      min_fraction: with ``groups``, every group also keeps
        ``floor(min_fraction * n) + 1`` of its ``n`` channels (the
        seed code's floor is ``min_fraction=0.05``): a global ranking of unnormalized
        scores would otherwise empty whole layers.
      is_prunable: ``(path, leaf) -> bool`` for weights; default every leaf of rank >= 2.
      fn: ``fn(params, x)``, the model in eval mode, for ``"wanda"``; with ``batches``,
        also to find the leaves that stack scanned layers (``nn.scan``): a per-layer
        distribution (``"uniform"``, ``"erk"``, ``"per_output"``) takes each layer alone.
    """
    params = masking.unwrap_nnx(params)
    n_m = parse_n_m(distribution)
    if n_m is not None:
        if groups is not None:
            raise ValueError("N:M sparsity is per weight: drop groups.")
        check_n_m_sparsity(distribution, sparsity)  # None: the pattern's own
    else:
        if sparsity is None:
            raise ValueError("pass the sparsity (the fraction removed).")
        distributions.check_sparsity(sparsity)
    if groups is not None:
        groups.check(params)
    stacked = frozenset()
    if scores == "wanda":
        if groups is not None or fn is None or not batches:
            raise ValueError("'wanda' scores weights from their inputs: pass fn(params, x) "
                             "and batches of inputs, and no groups.")
        scores = importance.wanda_scores(fn, params, batches)
    elif isinstance(scores, str):
        scores = (importance.weight_scores(scores, params, loss_fn, batches) if groups is None
                  else importance.filter_scores(scores, params, groups, loss_fn, batches))
    if fn is not None and batches and groups is None and distribution in PER_LAYER:
        stacked = importance.scanned_leaves(fn, params, batches[0])
    if groups is not None:
        check_channel_scores(scores, groups)
        return groups.expand(kept_channels(scores, sparsity, distribution, groups,
                                           min_channels, min_fraction), params)
    try:
        selected = masking.prunable_like(params, is_prunable, lambda i, p: p)
        scores = masking.map_prunable(lambda _, s: jnp.asarray(s, jnp.float32), selected,
                                      scores)
    except ValueError as e:
        raise ValueError(f"scores must be shaped like params: {e}") from None
    distributions.check_distribution(distribution)
    return distributions.masks_from_scores(scores, sparsity, distribution, stacked)


def fixed_masks(masks: PyTree) -> optax.GradientTransformationExtraArgs:
    """The pruner of masks chosen once (``prune``'s): they sit in its state, as every
    pruner's masks do, and never change; the pruned weights' updates are zeroed."""

    def init(params):
        masking.check_same_structure("masks", masks, masking.unwrap_nnx(params))
        return OneShotState(jax.tree.map(lambda m: jnp.asarray(m, bool), masks))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        masking.check_update_args(updates, params, state.masks)
        return masking.multiply_masks(updates, state.masks), state

    return optax.GradientTransformationExtraArgs(init, update)


class RoundsState(NamedTuple):
    count: jax.Array
    masks: Any
    kept: dict  # channel level: group -> bool per channel; {} at weight level

    def pruning_masks(self):
        return self.masks


def round_densities(sparsity: float | jax.Array, rounds: int) -> jax.Array:
    """The density after each of ``rounds`` rounds: ``1 / density`` grows linearly from 1
    to ``1 / (1 - sparsity)``. ``sparsity`` may be traced (``optax.inject_hyperparams``)."""
    k = jnp.arange(1, rounds + 1, dtype=jnp.float32)
    return 1.0 / (1.0 + k / rounds * (1.0 / (1.0 - sparsity) - 1.0))


def prune_at(measure: str, sparsity: float, steps: Sequence[int], *,
             loss_fn: importance.LossFn | None = None, batches: Sequence[Any] | None = None,
             distribution: str = "global", groups: ChannelGroups | None = None,
             min_channels: int = 1, min_fraction: float = 0.0,
             is_prunable: masking.IsPrunable | None = None,
             loss_args: Sequence[str] = (),
             ) -> optax.GradientTransformationExtraArgs:
    """Prune by ``measure`` at each of ``steps``, the last reaching ``sparsity``.

    Args:
      measure: a name of ``hf.importance.MEASURES``.
      sparsity: the final fraction of prunable weights (or, with ``groups``, of channels)
        removed.
      steps: the update counts (from 1) that prune: each round's masks hold from the next
        forward pass on; 0 prunes in ``init``, on the params it is given (at
        initialization).
      loss_fn: for the measures that read gradients, as ``prune``'s.
      batches: the batches ``loss_fn`` is taken over.
      distribution: ``"global"``, ``"uniform"``, or with one round an N:M pattern such
        as ``"2:4"`` (``sparsity`` then ``1 - N/M``). ERK needs a density known before
        tracing, and a round's is looked up in the traced step.
      groups: prune whole channels of these groups (``hf.structured.channel_groups``).
      min_channels: with ``groups``, the floor of every group, as ``prune``'s.
      min_fraction: likewise, of the channels left at each round.
      is_prunable: ``(path, leaf) -> bool`` for weights; default every leaf of rank >= 2.
      loss_args: names of ``tx.update``'s extra keyword args handed on to ``loss_fn`` at a
        pruning step (the loop's current BatchNorm statistics, say). A pruning step
        without them is an error, not a score on something else.
    """
    distributions.check_sparsity(sparsity)
    if importance.measure(measure).needs:
        importance.check_loss(measure, loss_fn, batches)
    steps = np.asarray(sorted(steps), np.int32)
    if steps.size == 0 or steps[0] < 0 or len(set(steps.tolist())) != steps.size:
        raise ValueError(f"steps must be distinct non-negative update counts, got "
                         f"{list(steps)}.")
    n_m = parse_n_m(distribution)
    if n_m is not None:
        if groups is not None or steps.size != 1:
            raise ValueError(f"{distribution} sparsity is per weight and prunes once: drop "
                             "groups and pass a single step.")
        check_n_m_sparsity(distribution, sparsity)
    else:
        distributions.check_distribution(distribution, ("global", "uniform"))
    if loss_args and steps[0] == 0:
        raise ValueError("loss_args come with tx.update, which step 0 (pruning in init) "
                         "does not see: prune from step 1.")
    densities = round_densities(sparsity, steps.size)

    def one_round(params, masks, kept, density, extra_args):
        """The masks of one round, scoring the network as it runs (``W * M``)."""
        current = masking.multiply_masks(params, masks)
        loss = loss_fn
        if loss_args:
            missing = sorted(set(loss_args) - set(extra_args))
            if missing:
                raise ValueError(f"prune_at scores with loss_args {missing}: pass them to "
                                 f"tx.update(..., {missing[0]}=...).")
            loss = functools.partial(loss_fn, **{k: extra_args[k] for k in loss_args})
        if groups is not None:
            scores = importance.filter_scores(measure, current, groups, loss, batches)
            scores = {g: jnp.where(kept[g], s, -jnp.inf) for g, s in scores.items()}
            kept = kept_channels(scores, 1 - density, distribution, groups, min_channels,
                                 min_fraction)
            return groups.expand(kept, params), kept
        scores = importance.weight_scores(measure, current, loss, batches)
        scores = masking.map_prunable(lambda mk, s: jnp.where(mk, s, -jnp.inf), masks,
                                      scores)
        return distributions.masks_from_scores(scores, 1 - density, distribution), kept

    def init(params):
        params = masking.unwrap_nnx(params)
        if groups is not None:
            groups.check(params)
            kept = {g: jnp.ones(n, bool) for g, n in groups.sizes.items()}
            masks = groups.expand(kept, params)
        else:
            kept = {}
            masks = masking.prunable_like(params, is_prunable,
                                          lambda i, p: jnp.ones(p.shape, bool))
        if steps[0] == 0:
            masks, kept = one_round(params, masks, kept, densities[0], {})
        return RoundsState(jnp.zeros((), jnp.int32), masks, kept)

    def update(updates, state, params=None, **extra_args):
        masking.check_update_args(updates, params, state.masks)
        count = optax.safe_increment(state.count)
        which = jnp.searchsorted(jnp.asarray(steps), count)
        due = (which < steps.size) & (jnp.asarray(steps)[jnp.minimum(which, steps.size - 1)]
                                      == count)
        density = densities[jnp.minimum(which, steps.size - 1)]
        masks, kept = jax.lax.cond(
            due, lambda: one_round(masking.unwrap_nnx(params), state.masks, state.kept,
                                   density, extra_args),
            lambda: (state.masks, state.kept))
        # The pruner contract: this step's update is gated by the masks its gradient saw.
        return masking.multiply_masks(updates, state.masks), RoundsState(count, masks, kept)

    return optax.GradientTransformationExtraArgs(init, update)
