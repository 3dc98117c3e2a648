"""Latency as a channel budget: the table's arithmetic, its measurement on a traced model,
and channel Hyperflows steering and landing on it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.structured import LatencyTable, channel_groups, channel_hyperflows, latency
from hflows_jax.structured.channel_hyperflows import pushes
from hflows_jax.training import Config
from tests.helpers import macs_latency_table

SHAPE = (28, 28, 1)


def _lenet5():
    model = models.create("lenet5", 10)
    return model, model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"]


@pytest.fixture(scope="module")
def measured():
    model, params = _lenet5()
    table = latency.measure(model, params, SHAPE, batch=4, grid=(0.5, 1.0), repeats=3,
                            calibrate=(0.5, 1.0))
    return model, params, table


def test_seconds_interpolate_the_table_by_hand():
    """Two layers: one reads group a (counts 0, 2, 4), one reads a and writes b (0, 5,
    10). Seconds at and between grid points, and their derivative, by hand."""
    one = np.array([0.0, 1.0, 3.0])
    two = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 4.0], [0.0, 6.0, 10.0]])
    table = LatencyTable(1, {"a": (0, 2, 4), "b": (0, 5, 10)},
                         ((("a",), one), (("a", "b"), two)), rest_s=0.5, scale=2.0,
                         machine="hand")
    at = lambda a, b: float(table.seconds({"a": jnp.float32(a), "b": jnp.float32(b)}))
    assert at(4, 10) == pytest.approx(0.5 + 2 * (3 + 10))
    assert at(2, 5) == pytest.approx(0.5 + 2 * (1 + 2))
    # a = 3 is halfway from 2 to 4, b = 7.5 halfway from 5 to 10: bilinear
    assert at(3, 7.5) == pytest.approx(0.5 + 2 * (2 + (2 + 4 + 6 + 10) / 4))
    assert at(1, 10) == pytest.approx(0.5 + 2 * (0.5 + 2))  # toward the empty layer
    assert float(table.fraction({"a": 2.0, "b": 5.0})) == pytest.approx(6.5 / 26.5)
    grad = table.marginal({"a": 3.0, "b": 7.5})
    # d/da: layer one 1 per channel; layer two at b = 7.5: (8 - 3) / 2
    assert float(grad["a"]) == pytest.approx(2 * (1.0 + 2.5))
    # d/db at a = 3: (4 + 10) / 2 - (2 + 6) / 2 over 5 channels
    assert float(grad["b"]) == pytest.approx(2 * 3.0 / 5)


@pytest.mark.slow
def test_measure_times_every_layer_on_its_groups_grid(measured, tmp_path):
    model, params, table = measured
    groups = channel_groups(model, params, SHAPE)
    assert table.batch == 4 and set(table.points) == set(groups.sizes)
    for g, n in groups.sizes.items():
        assert table.points[g] == (0, round(n / 2), n)
    assert [tuple(dict.fromkeys(r + w)) for _, r, w in groups.layers] == \
        [g for g, _ in table.layers]
    for names, t in table.layers:
        assert t.shape == (3,) * len(names)
        inner = t[(slice(1, None),) * t.ndim]
        assert np.all(inner > 0) and np.all(t[(0,) + (slice(None),) * (t.ndim - 1)] == 0)
        for axis in range(t.ndim):
            assert np.all(np.diff(inner, axis=axis) >= 0)  # non-decreasing
    full = {g: jnp.float32(n) for g, n in groups.sizes.items()}
    assert float(table.fraction(full)) == pytest.approx(1.0)
    half = {g: jnp.float32(n // 2) for g, n in groups.sizes.items()}
    assert 0 < float(table.fraction(half)) < 1
    table.save(str(tmp_path / "t.json"))
    again = LatencyTable.load(str(tmp_path / "t.json"))
    assert float(again.seconds(half)) == pytest.approx(float(table.seconds(half)))


def test_channel_hyperflows_lands_on_a_latency_target():
    """Pressure shared by marginal latency, the controller on the predicted latency, and
    the landing on it: the fraction of the predicted latency removed is the target's.
    The table is built from multiply-adds, so that the test does not ride on timings."""
    model, params = _lenet5()
    groups = channel_groups(model, params, SHAPE)
    table = macs_latency_table(groups)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64,) + SHAPE).astype(np.float32)
    y = (x[:, :14].mean(axis=(1, 2, 3)) > x[:, 14:].mean(axis=(1, 2, 3))).astype(np.int32)
    steps, target = 150, 0.4
    tx = optax.chain(
        channel_hyperflows(groups, hf.pressure.log_density_pi(target, steps, update_every=10,
                                                              kp=0.25, ki=0.25, negative=True),
                           optax.adam(0.01), target="latency", pressure_by="latency",
                           latency=table),
        optax.sgd(0.01, momentum=0.9))

    @jax.jit
    def step(p, s, i):
        xb, yb = jax.lax.dynamic_slice_in_dim(x, (i % 2) * 32, 32), \
            jax.lax.dynamic_slice_in_dim(y, (i % 2) * 32, 32)
        grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": q}, xb), yb).mean())(hf.apply_masks(p, s))
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    push = pushes(groups, state[0].kept, jnp.float32(3.0), "latency", table)
    assert sum(float(push[g]) * n for g, n in groups.sizes.items()) == pytest.approx(3.0)
    for i in range(steps + 5):
        params, state = step(params, state, i)
    removed = 1 - float(table.fraction(groups.live_counts(hf.channel_masks(state))))
    assert abs(removed - target) < 0.05, removed


def test_land_measured_moves_the_cut_onto_the_measured_speedup():
    """The table mispredicts (a fixed part a third of the dense model's time that the
    exported model does not have); the reading is the exported models' multiply-add
    ratio, so that the test does not ride on timings. From all channels kept, the
    landing must end within 5 % of 2x measured, where the table's own cut for 2x misses."""
    model, params = _lenet5()
    groups = channel_groups(model, params, SHAPE)
    table = macs_latency_table(groups)
    table = dataclasses.replace(table, rest_s=0.5 * float(table.seconds(dict(groups.sizes))))
    tx = channel_hyperflows(groups, hf.pressure.constant(0.0), target="latency",
                            pressure_by="latency", latency=table)
    state = tx.init(params)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    example = np.zeros((2,) + SHAPE, np.float32)

    def macs_ratio(dense, pruned):
        return dense.macs / pruned.macs

    landed, readings = hf.structured.land_measured(
        state, groups, fn, params, example, 2.0, table, min_channels=1,
        speedup=macs_ratio)
    assert readings[0]["measured"] == pytest.approx(1.0)  # all kept: no speed-up
    assert abs(readings[1]["measured"] / 2.0 - 1) > 0.05  # the table's cut for 2x misses
    assert abs(readings[-1]["measured"] / 2.0 - 1) <= 0.05, readings
    masks = groups.expand(landed.kept, params)  # the state holds the cut measured last
    compact = hf.export(fn, params, masks, example)
    assert compact.dense_macs / compact.macs == pytest.approx(readings[-1]["measured"])
    for got, want in zip(jax.tree.leaves(landed.masks), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="target_speedup"):
        hf.structured.land_measured(state, groups, fn, params, example, 1.0, table)
    zeroed = hf.multiply_masks(params, masks)  # finalized: the dense export would drop them
    with pytest.raises(ValueError, match="unmasked params"):
        hf.structured.land_measured(state, groups, fn, zeroed, example, 2.0, table)


@pytest.mark.slow
def test_a_latency_budget_needs_its_table_from_the_same_model(measured):
    model, params, table = measured
    groups = channel_groups(model, params, SHAPE)
    pressure = hf.pressure.trajectory(0.5, 100, update_every=10)
    with pytest.raises(ValueError, match="need latency="):
        channel_hyperflows(groups, pressure, target="latency")
    other = models.create("lenet5", 10, width=0.5)
    other_params = other.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"]
    with pytest.raises(ValueError, match="another model"):
        channel_hyperflows(channel_groups(other, other_params, SHAPE), pressure,
                           target="latency", latency=table)


def test_target_speedup_sets_the_latency_removed_and_flags_are_checked(tmp_path):
    base = Config().replace(method="hyperflows_channel")
    cfg = base.replace(target="latency", target_speedup=2.5).validate()
    assert cfg.method.target_sparsity == pytest.approx(0.6)
    for flags, message in [
            (dict(target="latency"), "takes --target_speedup"),
            (dict(target_speedup=2.0), "takes --target_speedup"),
            (dict(target="latency", target_speedup=0.9), "above 1"),
            (dict(target="speed"), "flops or latency"),
            (dict(latency_batch=8), "--target=latency only"),
            (dict(target="latency", target_speedup=2.0,
                  latency_table=str(tmp_path / "none.json")), "no such file")]:
        with pytest.raises(ValueError, match=message):
            base.replace(**flags).validate()
    with pytest.raises(ValueError, match="applies to --method"):
        Config().replace(target="latency", target_speedup=2.0).validate()


@pytest.mark.slow
def test_a_latency_run_lands_on_its_measured_speedup_and_reports_it(mnist_npz, tmp_path):
    """The training loop's landing (train.land_on_measured): after the land step the cut
    is timed and moved, the readings kept in landing.json, and the run ends on the cut
    chosen: the latency its table predicts for the final masks is that cut's."""
    from tests.helpers import subset_npz
    from hflows_jax.training import run

    data = subset_npz(mnist_npz, tmp_path / "small_mnist.npz", train=128, test=32)
    workdir = tmp_path / "run"
    report = run(Config().replace(
        dataset=data, model="lenet5", method="hyperflows_channel", target="latency",
        target_speedup=1.5, dense_epochs=0, pruning_epochs=1, regrowth_epochs=2,
        batch_size=16, log_every=2, workdir=str(workdir)))
    landing = json.loads((workdir / "landing.json").read_text())
    assert landing["measured"] and landing["readings"]
    assert report["measured_landing"] == landing
    best = min(landing["readings"], key=lambda r: abs(r["measured"] / 1.5 - 1))
    assert report["target_removed"] == pytest.approx(1 - best["kept_fraction"], abs=1e-6)
