"""Importance measures: how much a weight, or a whole filter, matters to the loss.

One family, after Lubana and Dick (2021; official code EkdeepSLubana/flowandprune,
``imp_estimator.py``). Each measure is a signed term per weight, made of the weight
``θ``, the loss gradient ``g`` and the Hessian-gradient product ``Hg``, and where the
absolute value is taken::

    name                        term   |.|    filter score (over its weights)
    magnitude                   θ      each   Σ|θ|      L1 (Li et al. 2017)
    magnitude_squared           θ²     -      Σθ²       ranks as the paper's ‖θ_f‖₂
    loss_increase               -θ·g   -      -Σθ·g     first-order loss rise on removal
    loss_preservation           θ·g    each   Σ|θ·g|    the paper's loss_based; SNIP
    biased_loss_preservation    θ²·g   each   Σ|θ²·g|   the paper's own measure
    grasp                       θ·Hg   -      Σθ·Hg     GraSP: raises the gradient norm
    gradient_norm_preservation  θ·Hg   total  |Σθ·Hg|   the paper's grad_preserve

Higher is kept. ``loss_increase`` is θ·g with the sign that ranks: removing weights ``S``
changes the loss by ``-Σ_S θ·g`` to first order. ``θ·Hg`` is half the first-order change
of ``‖g‖²`` along ``θ``: removing ``S`` changes ``‖g‖²`` by ``-2 Σ_S θ·Hg``.

A filter is an output channel: the kernel entries that write it (every writer of a
coupled group, from the traced graph: ``ChannelGroups.writers``), as the paper scores a
conv's ``weight[c]``. The gradients come from the caller's ``loss_fn(params, batch)``: run
BatchNorm there in eval mode (its running statistics), as the paper does. In train mode a
BatchNorm after a conv makes the loss blind to the filter's scale, so ``Σ_f θ·g`` is 0 up
to rounding, and every filter-level measure built on it says nothing. Draw the batches
class-balanced (``class_balanced``), as the paper's Hessian-gradient batches are.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hflows_jax import masking

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]  # (params, batch) -> scalar


class Measure(NamedTuple):
    """A signed term per weight from ``(θ, g, Hg)``, and where ``|.|`` goes: on each
    weight's term (``"each"``), on a filter's sum (``"total"``), or nowhere (None)."""

    term: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    needs: str  # "", "gradient" or "hessian_gradient": what the term reads
    absolute: str | None


MEASURES: dict[str, Measure] = {
    "magnitude": Measure(lambda w, g, hg: w, "", "each"),
    "magnitude_squared": Measure(lambda w, g, hg: w * w, "", None),
    "loss_increase": Measure(lambda w, g, hg: -w * g, "gradient", None),
    "loss_preservation": Measure(lambda w, g, hg: w * g, "gradient", "each"),
    "biased_loss_preservation": Measure(lambda w, g, hg: w * w * g, "gradient", "each"),
    "grasp": Measure(lambda w, g, hg: w * hg, "hessian_gradient", None),
    "gradient_norm_preservation": Measure(lambda w, g, hg: w * hg, "hessian_gradient",
                                          "total"),
}


def measure(name: str) -> Measure:
    if name not in MEASURES:
        raise ValueError(f"Unknown importance measure {name!r}: use one of {list(MEASURES)}.")
    return MEASURES[name]


def check_loss(name: str, loss_fn: LossFn | None, batches: Sequence[Any] | None) -> None:
    """A measure that reads gradients needs a loss and batches: say so at once."""
    if loss_fn is None or not batches:
        raise ValueError(f"The {name!r} measure reads the loss gradient: pass loss_fn="
                         "(params, batch) -> scalar and a non-empty list of batches.")


def gradient(loss_fn: LossFn, params: PyTree, batches: Sequence[Any]) -> PyTree:
    """The loss gradient, averaged over ``batches``."""
    grad = jax.jit(jax.grad(loss_fn))
    total = None
    for batch in batches:
        g = grad(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda t: t / len(batches), total)


def hessian_gradient(loss_fn: LossFn, params: PyTree, batches: Sequence[Any],
                     g: PyTree | None = None) -> PyTree:
    """``H g``, both averaged over ``batches`` (the paper's ``cal_hg``): the gradient of
    ``g_mean · g(batch)``, one forward-over-reverse product per batch."""
    g = gradient(loss_fn, params, batches) if g is None else g

    @jax.jit
    def product(p, batch):
        return jax.jvp(lambda q: jax.grad(loss_fn)(q, batch), (p,), (g,))[1]

    total = None
    for batch in batches:
        hg = product(params, batch)
        total = hg if total is None else jax.tree.map(jnp.add, total, hg)
    return jax.tree.map(lambda t: t / len(batches), total)


def terms(name: str, params: PyTree, loss_fn: LossFn | None = None,
          batches: Sequence[Any] | None = None) -> PyTree:
    """The measure's signed term for every weight, shaped like ``params`` (float32)."""
    m = measure(name)
    params = masking.unwrap_nnx(params)
    g = hg = jax.tree.map(lambda _: None, params)
    if m.needs:
        check_loss(name, loss_fn, batches)
        g = gradient(loss_fn, params, batches)
        if m.needs == "hessian_gradient":
            hg = hessian_gradient(loss_fn, params, batches, g)
    return jax.tree.map(lambda w, gw, h: m.term(w.astype(jnp.float32), gw, h), params, g, hg,
                        is_leaf=lambda x: x is None)


def weight_scores(name: str, params: PyTree, loss_fn: LossFn | None = None,
                  batches: Sequence[Any] | None = None) -> PyTree:
    """The measure per weight, shaped like ``params``: higher is kept."""
    m = measure(name)
    t = terms(name, params, loss_fn, batches)
    return jax.tree.map(jnp.abs, t) if m.absolute else t


def filter_scores(name: str, params: PyTree, groups, loss_fn: LossFn | None = None,
                  batches: Sequence[Any] | None = None) -> dict[str, jax.Array]:
    """The measure per output channel of each group of ``groups``
    (``hf.structured.channel_groups``): its terms summed over the kernel entries that
    write the channel, ``|.|`` on each term or on the sum as the measure says."""
    m = measure(name)
    groups.check(masking.unwrap_nnx(params))
    t = terms(name, params, loss_fn, batches)
    sums = groups.reduce(jax.tree.map(jnp.abs, t) if m.absolute == "each" else t,
                         side="write")
    return {k: jnp.abs(v) for k, v in sums.items()} if m.absolute == "total" else sums


def class_balanced(images: np.ndarray, labels: np.ndarray, per_class: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` examples of every class, drawn at random, class by class (the paper's
    ``grasp_data``); a class with fewer examples is an error, not a silent imbalance."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        if where.size < per_class:
            raise ValueError(f"class {c} has {where.size} examples, fewer than "
                             f"per_class={per_class}.")
        picked.append(rng.choice(where, per_class, replace=False))
    order = np.concatenate(picked)
    return np.asarray(images)[order], labels[order]


def input_norms(fn: Callable[[PyTree, jax.Array], Any], params: PyTree,
                inputs: Sequence[Any]) -> PyTree:
    """Per kernel of a traced conv or dense layer, the L2 norm of each of its input
    features over every example and position of ``inputs`` (Wanda's ``‖X_j‖``), shaped to
    broadcast against the kernel (size 1 off its input axes); None on other leaves.

    ``fn(params, x)`` is the model in eval mode; ``inputs`` its input batches (or
    ``(x, y)`` batches: their first entry). A kernel read by several layers sums them."""
    from hflows_jax import graph as graph_lib  # the traced program: which input each reads

    params = masking.unwrap_nnx(params)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in inputs]
    if not batches:
        raise ValueError("input_norms needs at least one input batch.")
    graph = graph_lib.trace(fn, params, jnp.asarray(batches[0]), strict=False)
    readers = {c.eqn: c for c in graph.contractions if c.param is not None}

    @jax.jit
    def squares(params, x):
        env = dict(zip(graph.param_ids, jax.tree.leaves(params)))
        env.update(zip(graph.const_ids, graph.consts))
        env[graph.x_id] = x
        sums = {}
        for i, eqn in enumerate(graph.eqns):
            args = [env[a] if isinstance(a, int) else a.val for a in eqn.ins]
            outs = eqn.prim.bind(*args, **eqn.params)
            for o, v in zip(eqn.outs, outs if eqn.prim.multiple_results else [outs]):
                env[o] = v
            c = readers.get(i)
            if c is None:
                continue
            data = jnp.square(args[c.data].astype(jnp.float32))
            sq = jnp.sum(data, axis=tuple(d for d in range(data.ndim)
                                          if d not in c.data_axes))
            # sq's axes: the data axes in increasing order; the kernel reads them as
            # read_axes, pairwise; broadcast to the kernel in its own axis order
            by_read = sorted(zip(c.read_axes, c.data_axes))
            sq = jnp.transpose(sq, [sorted(c.data_axes).index(d) for _, d in by_read])
            leaf = graph.shapes[c.param]
            shape = [1] * len(leaf)
            for (r, _), n in zip(by_read, sq.shape):
                shape[c.param_axis(r)] = n
            sq = sq.reshape(shape)
            if c.layer is not None:  # layer i of a scanned stack: slot i of the first axis
                sq = jnp.zeros((leaf[0],) + sq.shape[1:], sq.dtype).at[c.layer].set(sq[0])
            sums[c.param] = sums.get(c.param, 0.0) + sq
        return sums

    total = None
    for x in batches:
        sums = squares(params, jnp.asarray(x))
        total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
    norms = [jnp.sqrt(total[v]) if v in total else None for v in graph.param_ids]
    return jax.tree.unflatten(jax.tree.structure(params), norms)


def scanned_leaves(fn: Callable[[PyTree, jax.Array], Any], params: PyTree,
                   example: Any) -> frozenset:
    """The paths of the params leaves that are scanned stacks (``nn.scan``): leaf ``[i]``
    is layer i's kernel, so that a per-layer comparison takes each slice alone."""
    from hflows_jax import graph as graph_lib

    example = example[0] if isinstance(example, (tuple, list)) else example
    graph = graph_lib.trace(fn, masking.unwrap_nnx(params), jnp.asarray(example), strict=False)
    paths = dict(zip(graph.param_ids, graph.param_paths))
    return frozenset(paths[c.param] for c in graph.contractions if c.layer is not None)


def wanda_scores(fn: Callable[[PyTree, jax.Array], Any], params: PyTree,
                 inputs: Sequence[Any]) -> PyTree:
    """Wanda (Sun et al., 2023): ``|W| * ‖X_j‖``, each weight's magnitude times the norm
    of the input feature it reads (``input_norms``), compared per output unit
    (``distribution="per_output"``) as the paper does. A kernel no traced layer reads
    (an embedding table) scores by magnitude alone."""
    params = masking.unwrap_nnx(params)
    norms = input_norms(fn, params, inputs)
    return jax.tree.map(lambda w, n: jnp.abs(w.astype(jnp.float32)) * (1.0 if n is None else n),
                        params, norms, is_leaf=lambda x: x is None)
