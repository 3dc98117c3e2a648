"""One-shot pruning of any params, trained or not: scores in, masks out.

``hf.prune(params, "magnitude", 0.9)`` keeps the 10 % of weights with the highest
scores; with ``groups`` (``hf.structured.channel_groups``) it keeps whole channels, and
``hf.export`` then builds the smaller model. The masks are the ones every pruner's state
holds (``hf.masks``): booleans shaped like the prunable leaves, None elsewhere. To
fine-tune, chain ``fixed_masks(masks)`` before the optimizer: the masks then sit in its
state, where ``hf.apply_masks``, ``hf.masked_value_and_grad`` and ``hf.export`` find them.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from hflows_jax import importance, masking
from hflows_jax.baselines import distributions
from hflows_jax.baselines.oneshot import OneShotState
from hflows_jax.structured.channels import ChannelGroups, keep_at_least

PyTree = Any
N_M = re.compile(r"^(\d+):(\d+)$")


def parse_n_m(distribution: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: N kept in every M consecutive input entries; else None."""
    found = N_M.match(distribution)
    if found is None:
        return None
    n, m = int(found[1]), int(found[2])
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {distribution!r}.")
    return n, m


def n_m_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the input axis (the
    second to last: a dense kernel's rows, a conv kernel's input channels), the layout
    sparse tensor cores run."""
    x = jnp.moveaxis(scores, -2, -1)
    groups = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))
    ranks = jnp.argsort(jnp.argsort(-groups, axis=-1), axis=-1)
    kept = (ranks < n).reshape(x.shape)
    return jnp.moveaxis(kept, -1, -2)


def is_n_m(mask: jax.Array, n: int, m: int) -> bool:
    """Whether every ``m`` consecutive input entries of ``mask`` keep at most ``n``."""
    x = jnp.moveaxis(jnp.asarray(mask, jnp.int32), -2, -1)
    if x.shape[-1] % m:
        return False
    return bool(jnp.all(x.reshape(x.shape[:-1] + (-1, m)).sum(-1) <= n))


def _n_m_masks(scores: PyTree, n: int, m: int) -> PyTree:
    left_dense = []

    def leaf(path, s):
        if s.ndim < 2 or s.shape[-2] % m:
            left_dense.append(f"{masking.path_name(path)} {tuple(s.shape)}")
            return jnp.ones(s.shape, bool)
        return n_m_mask(s, n, m)

    masks = jax.tree.map_with_path(lambda p, s: None if s is None else leaf(p, s), scores,
                                   is_leaf=lambda x: x is None)
    if left_dense:
        warnings.warn(f"{n}:{m} sparsity: these layers' input axis is not a multiple of {m}; "
                      f"they stay dense: {', '.join(left_dense)}.", stacklevel=3)
    return masks


def _channel_masks(params, scores, sparsity, distribution, groups: ChannelGroups,
                   min_channels: int) -> PyTree:
    if set(scores) != set(groups.sizes) or any(
            jnp.shape(scores[g]) != (n,) for g, n in groups.sizes.items()):
        raise ValueError("channel scores must hold one vector per group of these channel "
                         "groups, a score per channel (importance.filter_scores).")
    if distribution == "global":
        flat = jnp.concatenate([scores[g] for g in groups.sizes])
        keep = max(1, round((1 - sparsity) * flat.size))
        cutoff = jnp.sort(flat)[-keep]
        kept = {g: keep_at_least(s, cutoff, min_channels) for g, s in scores.items()}
    elif distribution == "uniform":
        kept = {g: distributions.keep_top(s, max(min_channels, 1, round((1 - sparsity) *
                                                                    s.size)))
                for g, s in scores.items()}
    else:
        raise ValueError(f"channels take distribution 'global' or 'uniform', got "
                         f"{distribution!r}.")
    return groups.expand(kept, params)


def prune(params: PyTree, scores: PyTree | str, sparsity: float | None = None, *,
          distribution: str = "global", groups: ChannelGroups | None = None,
          loss_fn: importance.LossFn | None = None, batches: Sequence[Any] | None = None,
          min_channels: int = 1, is_prunable: masking.IsPrunable | None = None) -> PyTree:
    """Masks that keep the highest ``scores`` of ``params``.

    Args:
      params: the model's params (linen dict or ``nnx.State``), trained or fresh.
      scores: a tree shaped like ``params`` (weights), a dict of one vector per group
        (channels, ``importance.filter_scores``), or a measure's name
        (``importance.MEASURES``), computed here from ``loss_fn`` and ``batches``.
      sparsity: the fraction removed: of the prunable weights, or with ``groups`` of the
        channels. With an N:M ``distribution``, None (it is ``1 - N/M``).
      distribution: ``"global"`` (one ranking), ``"uniform"`` (every layer alike),
        ``"erk"`` (weights only), or ``"N:M"`` such as ``"2:4"`` (weights only: N kept in
        every M consecutive input entries; layers whose input axis M does not divide stay
        dense, with a warning).
      groups: prune whole channels of these groups (``hf.structured.channel_groups``);
        masks zero the rows that read a pruned channel, as ``hf.export`` expects.
      loss_fn, batches: ``loss_fn(params, batch) -> scalar`` over ``batches``, for a
        named measure that reads gradients (BatchNorm in eval mode: ``hf.importance``).
      min_channels: with ``groups``, every group keeps at least this many channels.
      is_prunable: ``(path, leaf) -> bool`` for weights; default every leaf of rank >= 2.
    """
    params = masking.unwrap_nnx(params)
    n_m = parse_n_m(distribution)
    if n_m is not None:
        if groups is not None:
            raise ValueError("N:M sparsity is per weight: drop groups.")
        if sparsity is not None and abs(sparsity - (1 - n_m[0] / n_m[1])) > 1e-9:
            raise ValueError(f"{distribution} sparsity removes {1 - n_m[0] / n_m[1]:g} of "
                             f"the weights; got sparsity={sparsity}: pass None.")
    else:
        if sparsity is None:
            raise ValueError("pass the sparsity (the fraction removed).")
        distributions.check_sparsity(sparsity)
    if isinstance(scores, str):
        scores = (importance.weight_scores(scores, params, loss_fn, batches) if groups is None
                  else importance.filter_scores(scores, params, groups, loss_fn, batches))
    if groups is not None:
        return _channel_masks(params, scores, sparsity, distribution, groups, min_channels)
    try:
        selected = masking.prunable_like(params, is_prunable, lambda i, p: p)
        scores = masking.map_prunable(lambda _, s: jnp.asarray(s, jnp.float32), selected,
                                      scores)
    except ValueError as e:
        raise ValueError(f"scores must be shaped like params: {e}") from None
    if n_m is not None:
        return _n_m_masks(scores, *n_m)
    distributions.check_distribution(distribution)
    return distributions.masks_from_scores(scores, sparsity, distribution)


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
