"""Multi-device behaviour, run by test_multidevice.py in a child with two host devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.training import Config, TrainState, make_train_step, parallel, run
from tests.helpers import classification_batch, mlp_apply, mlp_params, xent


def test_two_devices_are_forced():
    assert jax.local_device_count() == 2


def test_pmap_matches_single_device_on_the_same_global_batch():
    assert jax.local_device_count() >= 2, "conftest forces two host devices"
    params = mlp_params(jax.random.key(3), sizes=(6, 16, 3))
    x, y = classification_batch(jax.random.key(4), n=64)
    tx = optax.chain(hf.hyperflows(hf.pressure.trajectory(0.8, 12, 2),
                                   presence_optimizer=optax.adam(5e-2)),
                     optax.sgd(0.2, momentum=0.9))

    def step(params, state, x, y, axis_name=None):
        grads = jax.grad(lambda w: xent(mlp_apply(w, x), y))(hf.apply_masks(params, state))
        if axis_name:
            grads = jax.lax.pmean(grads, axis_name)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    single = jax.jit(step)
    multi = jax.pmap(lambda p, s, x, y: step(p, s, x, y, "batch"), axis_name="batch",
                     devices=jax.local_devices()[:2])
    p1, s1 = params, tx.init(params)
    p2, s2 = jax.tree.map(lambda a: jnp.stack([a, a]), (params, s1))
    xs, ys = x.reshape(2, 32, 6), y.reshape(2, 32)
    for _ in range(12):
        p1, s1 = single(p1, s1, x, y)
        p2, s2 = multi(p2, s2, xs, ys)
    assert 0.3 < float(hf.sparsity(s1)) < 1.0
    unreplicate = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
    chex.assert_trees_all_close(unreplicate(p2), p1, atol=1e-5)
    chex.assert_trees_all_equal(unreplicate(hf.masks(s2)), hf.masks(s1))


def pruning_setup(devices):
    model = models.create("resnet20", 10, width=0.25, axis_name="batch")
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    variables = model.init(jax.random.key(2), x[:1])
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(5.0), presence_init=(-0.1, 0.3),
                                   presence_optimizer=optax.adam(0.05)),
                     optax.sgd(0.05, momentum=0.9))
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"],
                       variables["batch_stats"], tx.init(variables["params"]))
    return make_train_step(model, tx, masked=True, label_smoothing=0.1), state, np.asarray(x), \
        np.asarray(y)


def run_pmapped(step, state, x, y, num_devices, steps=4):
    fn = jax.pmap(step, axis_name="batch")
    replicated = parallel.replicate(state, num_devices)
    for _ in range(steps):
        replicated, metrics = fn(replicated, parallel.split_for_devices(x, num_devices),
                                 parallel.split_for_devices(y, num_devices))
    return parallel.unreplicate(replicated), parallel.unreplicate(metrics)


def test_pmap_on_two_devices_equals_one_device():
    step, state, x, y = pruning_setup(2)
    one, m1 = run_pmapped(step, state, x, y, 1)
    two, m2 = run_pmapped(step, state, x, y, 2)
    assert 0.0 < float(hf.sparsity(one.opt_state)) < 1.0
    chex.assert_trees_all_close(two.params, one.params, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(two.batch_stats, one.batch_stats, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_equal(hf.masks(two.opt_state), hf.masks(one.opt_state))
    chex.assert_trees_all_close(m2, m1, atol=1e-5)


def test_the_same_step_runs_under_shard_map():
    step, state, x, y = pruning_setup(2)
    reference, _ = run_pmapped(step, state, x, y, 2, steps=2)
    fn = parallel.shard_mapped(step, parallel.batch_mesh(jax.devices()[:2]), num_batch_args=2)
    for _ in range(2):
        state, _ = fn(state, x, y)
    chex.assert_trees_all_close(state.params, reference.params, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_equal(hf.masks(state.opt_state), hf.masks(reference.opt_state))


def test_tiny_runs_under_pmap_and_shard_map_agree(tmp_path):
    """The training loop over two devices, both ways: the same run, step for step."""
    reports = {}
    for backend in ("pmap", "shard_map"):
        with tfds.testing.mock_data(num_examples=24):
            reports[backend] = run(Config().replace(
                model="resnet20", width=0.25, dataset="cifar10", batch_size=8, dense_epochs=1,
                pruning_epochs=2, regrowth_epochs=0, presence_lr=0.3,
                pressure_updates_per_epoch=3, parallel=backend,
                workdir=str(tmp_path / backend)))
    pmap, shard_map = reports["pmap"], reports["shard_map"]
    assert pmap["devices"] == [str(d) for d in jax.local_devices()]
    assert len(pmap["history"]) == 3 and pmap["sparsity"] > 0.05  # it pruned
    for key in ("loss", "train_accuracy", "test_accuracy", "sparsity"):
        np.testing.assert_allclose([r[key] for r in shard_map["history"]],
                                   [r[key] for r in pmap["history"]], rtol=1e-4, atol=1e-5)
    assert shard_map["params_remaining"] == pmap["params_remaining"]


def test_batch_size_must_divide_over_devices(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--batch_size=15 is not divisible by the 2 devices"):
        run(Config().replace(model="resnet20", batch_size=15, workdir=str(tmp_path)))
