"""Flax NNX: run a model on its masked weights ``W * M`` in place.

An NNX model carries its own state (BatchNorm statistics, Dropout's RNG counts), which
only NNX's lifted transforms may update. So instead of rebuilding the model from masked
params inside ``jax.value_and_grad`` (which cannot update that state), the masked
weights are swapped into the model, the model runs as it is (``nnx.value_and_grad``,
``nnx.jit``, train or eval mode), and the weights ``W`` are swapped back: the pruned
entries of ``W`` stay where they were, ready to regrow.

``flax.nnx`` is imported on first use, so ``import hflows_jax`` does not load it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from hflows_jax import masking


def _opt_state_and_wrt(optimizer: Any):
    from flax import nnx
    if hasattr(optimizer, "opt_state"):  # an nnx.Optimizer: its state and its wrt filter
        return optimizer.opt_state, getattr(optimizer, "wrt", nnx.Param)
    return optimizer, nnx.Param  # an optimizer state


@contextlib.contextmanager
def masked(model: Any, optimizer: Any, missing: str = "raise"):
    """Within the block, ``model`` runs on ``W * M``; on leaving it, ``W`` is back.

    ``optimizer`` is the ``nnx.Optimizer`` (or its ``opt_state``) whose pruner holds the
    masks. Everything else the model updates in the block (BatchNorm statistics, RNG
    counts) stays updated. Works eagerly and inside ``nnx.jit``. ``missing="ignore"``:
    without a pruner in the optimizer, the model runs as it is (``hf.apply_masks``).

    Apply the optimizer's update after the block: an update inside it would be made to
    ``W * M`` and then overwritten by ``W``, so an ``nnx.Optimizer`` whose step moved in
    the block raises.
    """
    from flax import nnx
    opt_state, wrt = _opt_state_and_wrt(optimizer)
    step = getattr(optimizer, "step", None)
    step_before = None if step is None else step.get_value()
    params = nnx.state(model, wrt)
    weights = masking.unwrap_nnx(params)  # the arrays, not the Variables the model shares
    nnx.update(model, masking.apply_masks(params, opt_state, missing))
    try:
        yield model
    finally:
        nnx.update(model, masking.rewrap_nnx(params, weights))
    if step is not None and step.get_value() is not step_before:
        raise RuntimeError("optimizer.update ran inside hf.nnx.masked: it updated W * M, "
                           "and leaving the block put W back, so the update is lost. Call "
                           "it after the block.")


def masked_value_and_grad(fn: Callable, *, has_aux: bool = False,
                          missing: str = "raise") -> Callable:
    """``nnx.value_and_grad(fn)`` taken on the masked model: the gradient w.r.t. ``W * M``.

    Returns ``grad_fn(model, optimizer, *args)``, which calls ``fn(model, *args)`` with
    ``model`` running on ``W * M`` and returns ``(value, grads)`` as ``nnx.value_and_grad``
    does; ``grads`` has the structure of the optimizer's params, for
    ``optimizer.update(model, grads)``. This is the gradient Hyperflows expects: the flow
    ``W * grad`` of a pruned weight is what lets it regrow. ``missing`` as in
    :func:`masked`.
    """

    def grad_fn(model, optimizer, *args, **kwargs):
        from flax import nnx
        _, wrt = _opt_state_and_wrt(optimizer)
        value_and_grad = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
        with masked(model, optimizer, missing):
            return value_and_grad(model, *args, **kwargs)

    return grad_fn
