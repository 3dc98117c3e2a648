"""Straight-through magnitude pruning: a method added as one file, checked by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import methods
from hflows_jax.methods.ste_magnitude import ste_magnitude
from hflows_jax.training import Config, run
from tests.helpers import classification_batch, mlp_apply, mlp_params, subset_npz

LR = 0.1


def _loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def test_every_weight_learns_and_the_masks_follow_the_largest_magnitudes():
    params = mlp_params(jax.random.key(0))
    batch = classification_batch(jax.random.key(1))
    tx = optax.chain(optax.sgd(LR), ste_magnitude(0.5, end_step=2, distribution="uniform"))
    state = tx.init(params)
    for step in (1, 2):
        weights = hf.apply_masks(params, state)
        grads = jax.grad(_loss)(weights, batch)  # at W * M, as the train step takes it
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        # Oracle: plain SGD on every entry, pruned ones too (the straight-through step) ...
        want = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, want)
        # ... and per layer the masks keep the largest |W| at the cubic schedule's sparsity.
        sparsity = 0.5 * (1 - (1 - step / 2) ** 3)
        for name in ("layer0", "layer1"):
            w = np.abs(np.asarray(new[name]["kernel"])).ravel()
            keep = round((1 - sparsity) * w.size)
            kept = np.asarray(hf.masks(state)[name]["kernel"]).ravel()
            assert kept.sum() == keep
            assert set(np.flatnonzero(kept)) == set(np.argsort(-w, kind="stable")[:keep])
        params = new
    assert float(hf.sparsity(state)) == pytest.approx(0.5, abs=0.02)


def test_a_pruned_weight_comes_back_when_it_overtakes_a_kept_one():
    params = {"w": {"kernel": jnp.array([[1.0, 0.5], [0.4, 0.1]])}}
    tx = ste_magnitude(0.5, end_step=1, distribution="global")
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert np.asarray(hf.masks(state)["w"]["kernel"]).tolist() == [[True, True],
                                                                   [False, False]]
    # The pruned 0.1 gets an update of 0.9 (the gradient reached it through W * M).
    updates = {"w": {"kernel": jnp.array([[0.0, 0.0], [0.0, 0.9]])}}
    passed, state = tx.update(updates, state, params)
    assert float(passed["w"]["kernel"][1, 1]) == pytest.approx(0.9)  # not masked
    assert np.asarray(hf.masks(state)["w"]["kernel"]).tolist() == [[True, False],
                                                                   [False, True]]


def test_the_training_loop_runs_it_from_the_registry(mnist_npz, tmp_path):
    assert methods.get("ste_magnitude").distribution(None) == "global"
    dataset = subset_npz(mnist_npz, tmp_path / "small.npz", train=64, test=32)
    report = run(Config().replace(model="lenet300", width=0.05, dataset=dataset,
                                  method="ste_magnitude", target_sparsity=0.8,
                                  batch_size=32, dense_epochs=0, pruning_epochs=2,
                                  regrowth_epochs=1, augment=False,
                                  workdir=str(tmp_path / "run")))
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert report["target_missed_by"] is None and report["warnings"] == []
