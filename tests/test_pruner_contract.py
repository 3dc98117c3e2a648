"""The pruner contract, checked on every method: state, helpers, jit, chain, MultiSteps,
inject_hyperparams, abstract init, dtypes and tree types.

The contract: ``init(params)`` returns a :class:`hf.PrunerState`; ``update`` passes
``grads * M`` down the chain, with M the masks of the state it was given.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from tests.helpers import classification_batch, xent

METHODS = ["hyperflows", "magnitude", "snip", "grasp", "random", "rigl", "prune_at"]
X, Y = classification_batch(jax.random.key(0), n=32)
X2, Y2 = classification_batch(jax.random.key(1), n=32)


class MLP(NamedTuple):
    kernel0: jax.Array
    bias0: jax.Array
    kernel1: jax.Array
    bias1: jax.Array


def make_params(kind="dict", dtype=jnp.float32, seed=2):
    """A 6-8-3 MLP as a dict or a NamedTuple, in ``dtype``."""
    k0, k1 = jax.random.split(jax.random.key(seed))
    leaves = [jax.random.normal(k0, (6, 8)) / jnp.sqrt(6.0), jnp.full((8,), 0.1),
              jax.random.normal(k1, (8, 3)) / jnp.sqrt(8.0), jnp.full((3,), 0.1)]
    leaves = [x.astype(dtype) for x in leaves]
    if kind == "namedtuple":
        return MLP(*leaves)
    return {"layer0": {"kernel": leaves[0], "bias": leaves[1]},
            "layer1": {"kernel": leaves[2], "bias": leaves[3]}}


def loss(params, batch=(X, Y)):
    """Cross-entropy of one MLP, or the sum over a list of them."""
    if isinstance(params, list):
        return sum(loss(p, batch) for p in params)
    if isinstance(params, dict):
        params = [params[f"layer{i}"][k] for i in (0, 1) for k in ("kernel", "bias")]
    k0, b0, k1, b1 = params
    hidden = jnp.tanh(batch[0] @ k0 + b0)
    return xent((hidden @ k1 + b1).astype(jnp.float32), batch[1])


def spec(method):
    """(factory, kwargs, static_args for inject_hyperparams); every method prunes some."""
    if method == "hyperflows":
        return hf.hyperflows, dict(pressure=hf.pressure.constant(2.0),
                                   presence_optimizer=optax.sgd(0.3),
                                   presence_init=(-0.3, 0.5)), ()
    if method == "magnitude":
        return hf.baselines.magnitude, dict(sparsity=0.5, end_step=2, update_every=1), ()
    if method in ("snip", "grasp"):
        factory = getattr(hf.baselines, method)
        return factory, dict(sparsity=0.5, loss_fn=loss, batches=[(X, Y)]), ("loss_fn",)
    if method == "prune_at":
        return hf.prune_at, dict(measure="loss_preservation", sparsity=0.5, steps=(0, 2),
                                 loss_fn=loss, batches=[(X, Y)]), ("loss_fn", "measure")
    if method == "random":
        return hf.baselines.random, dict(sparsity=0.5, distribution="uniform", seed=1), ()
    return hf.baselines.rigl, dict(sparsity=0.5, end_step=10, update_every=1, alpha=0.5,
                                   seed=2), ()


def build(method):
    factory, kwargs, _ = spec(method)
    return factory(**kwargs)


@jax.jit
def _masked_grads(params, masks, batch):
    return jax.grad(loss)(hf.multiply_masks(params, masks), batch)


def grads_at(params, state, batch=(X, Y)):
    """The task gradient with respect to the effective weights ``W * M``."""
    return _masked_grads(params, hf.masks(state), batch)


def gated(grads, state):
    """The contract's update, ``grads * M``, written out with jnp.where."""
    return jax.tree.map(lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g)),
                        hf.masks(state), grads, is_leaf=lambda x: x is None)


def mixed_params():
    """A list of a bfloat16 dict MLP and a float32 NamedTuple MLP: every tree type and dtype."""
    return [make_params("dict", jnp.bfloat16), make_params("namedtuple", seed=3)]


def is_none(x):
    return x is None


@pytest.fixture(scope="module", params=METHODS)
def chain_run(request):
    """Two jitted steps of ``chain(pruner, sgd(0.5))`` on mixed_params(): the params and
    state at the end, and (params, state, grads, updates) of each step."""
    tx = optax.chain(build(request.param), optax.sgd(0.5))
    params = mixed_params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    steps = []
    for _ in range(2):
        grads = grads_at(params, state)
        updates, new_state = step(grads, state, params)
        steps.append((params, state, grads, updates))
        params, state = optax.apply_updates(params, updates), new_state
    return params, state, steps


@pytest.mark.slow
def test_jitted_update_passes_grads_times_masks_down_the_chain(chain_run):
    for _, state, grads, updates in chain_run[2]:
        want = jax.tree.map(lambda g: -0.5 * g, gated(grads, state))
        chex.assert_trees_all_close(updates, want, rtol=1e-2)
        masks = jax.tree.leaves(hf.masks(state), is_leaf=is_none)
        pruned = [u[~m] for u, m in zip(jax.tree.leaves(updates), masks) if m is not None]
        assert len(pruned) == 4 and all(jnp.all(u == 0) for u in pruned)


def test_tree_types_and_dtypes_are_kept(chain_run):
    params, state, steps = chain_run
    dtypes = [p.dtype for p in jax.tree.leaves(mixed_params())]
    assert dtypes.count(jnp.bfloat16) == dtypes.count(jnp.float32) == 4
    assert [p.dtype for p in jax.tree.leaves(params)] == dtypes
    for _, _, _, updates in steps:
        assert [u.dtype for u in jax.tree.leaves(updates)] == dtypes
    masks = hf.masks(state)
    assert [type(m) for m in [masks, *masks]] == [list, dict, MLP]
    assert jax.tree.structure(masks, is_leaf=is_none) == jax.tree.structure(params)
    kernels = [(m, p) for m, p in zip(jax.tree.leaves(masks, is_leaf=is_none),
                                      jax.tree.leaves(params)) if m is not None]
    assert [(m.dtype, m.shape) for m, _ in kernels] == [(bool, p.shape) for _, p in kernels]
    assert [p.ndim for _, p in kernels] == [2, 2, 2, 2]  # the kernels, biases never


def test_state_is_a_pruner_state_and_the_helpers_work_on_it(chain_run):
    params, state, _ = chain_run
    assert isinstance(state[0], hf.PrunerState) and hf.find_pruner_state(state) is state[0]
    masks = jax.tree.leaves(hf.masks(state), is_leaf=is_none)
    kernels = [np.asarray(m) for m in masks if m is not None]
    want = 1 - sum(m.sum() for m in kernels) / sum(m.size for m in kernels)
    assert 0 < want < 1 and float(hf.sparsity(state)) == pytest.approx(want, abs=1e-6)
    layers = hf.layer_sparsity(state)
    assert list(layers) == ["0/layer0/kernel", "0/layer1/kernel", "1/kernel0", "1/kernel1"]
    np.testing.assert_allclose([float(v) for v in layers.values()],
                               [1 - m.mean() for m in kernels], atol=1e-6)
    for m, p, e in zip(masks, jax.tree.leaves(params),
                       jax.tree.leaves(hf.apply_masks(params, state))):
        assert e.dtype == p.dtype
        np.testing.assert_array_equal(e, p if m is None else jnp.where(m, p, 0))
    nan_params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    for m, f in zip(masks, jax.tree.leaves(hf.finalize(nan_params, state))):
        f = np.asarray(f, np.float32)
        if m is None:
            assert np.all(np.isnan(f))  # not prunable: left alone
        else:
            assert np.all(f[~m] == 0) and np.all(np.isnan(f[m]))


@pytest.mark.parametrize("method", METHODS)
def test_multisteps_updates_the_pruner_once_with_the_mean_gradient(method):
    params = make_params()
    pruner = build(method)
    tx = optax.MultiSteps(pruner, every_k_schedule=2)
    state = tx.init(params)
    initial = state.inner_opt_state
    g1, g2 = grads_at(params, state), grads_at(params, state, (X2, Y2))
    step = jax.jit(tx.update)
    updates, state = step(g1, state, params)
    assert all(jnp.all(u == 0) for u in jax.tree.leaves(updates))
    chex.assert_trees_all_equal(state.inner_opt_state, initial)
    updates, state = step(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    want_updates, want_state = pruner.update(mean, initial, params)
    chex.assert_trees_all_close(updates, want_updates, atol=1e-6)
    chex.assert_trees_all_equal(hf.masks(state), hf.masks(want_state))
    chex.assert_trees_all_close(hf.find_pruner_state(state), want_state, atol=1e-6)


NUMERIC_HYPERPARAMS = {
    "hyperflows": {"ste_scale", "seed"},
    "magnitude": {"sparsity", "end_step", "begin_step", "update_every"},
    "snip": {"sparsity"},
    "grasp": {"sparsity"},
    "random": {"sparsity", "seed"},
    "rigl": {"sparsity", "end_step", "update_every", "alpha", "seed"},
    "prune_at": {"sparsity", "min_channels", "min_fraction"},
}


@pytest.mark.parametrize("method", METHODS)
def test_inject_hyperparams_gives_the_plain_updates(method):
    factory, kwargs, static_args = spec(method)
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    params = make_params()
    plain_state, state = plain.init(params), injected.init(params)
    assert set(state.hyperparams) == NUMERIC_HYPERPARAMS[method]
    plain_step, step = jax.jit(plain.update), jax.jit(injected.update)
    for _ in range(3):
        grads = grads_at(params, plain_state)
        want, plain_state = plain_step(grads, plain_state, params)
        updates, state = step(grads, state, params)
        chex.assert_trees_all_equal(updates, want)
        chex.assert_trees_all_equal(hf.find_pruner_state(state), plain_state)
        params = jax.tree.map(lambda p, u: p - 0.5 * u, params, updates)


@pytest.mark.parametrize("method", METHODS)
def test_init_on_shape_dtype_structs_matches_concrete_init(method):
    params = mixed_params()
    tx = optax.chain(build(method), optax.sgd(0.1, momentum=0.9))
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    concrete = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
    assert ([(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
            == [(c.shape, c.dtype) for c in jax.tree.leaves(concrete)])
