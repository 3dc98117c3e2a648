"""The four benchmarks, on tiny settings: output shapes, fits and byte counts."""

import gc
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (bench, compare, conv_speed, gradient_flow, graph_speed, oneshot,
                         overhead, pressure_law, scaffold, structured)
import hflows_jax as hf
from hflows_jax import models, recipe
from hflows_jax.training import presets
from tests.helpers import subset_npz


@pytest.fixture
def small_mnist(mnist_npz, tmp_path):
    return subset_npz(mnist_npz, tmp_path / "small_mnist.npz", train=1024, test=256)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """No compilation cache set yet, and a user cache directory of our own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield tmp_path / "user_cache" / "hflows_jax" / "jax"
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.slow
def test_compare_writes_rows_and_reuses_finished_runs(small_mnist, tmp_path, user_cache):
    argv = ["--setting=mnist", f"--dataset={small_mnist}", "--methods=hyperflows,magnitude",
            "--sparsities=0.9", "--seeds=1", f"--out={tmp_path}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        results = []  # through the entry point, which sets the process's JAX config
        scaffold.command_line(lambda: results.append(compare.main(argv)))
        result = results[0]
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # files closed
    # The runs use the user's cache directory; the benchmark does not repoint it at --out.
    assert jax.config.jax_compilation_cache_dir == str(user_cache)
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk["setting"] == "mnist"
    assert [r["method"] for r in on_disk["rows"]] == ["hyperflows", "magnitude"]
    for row in on_disk["rows"]:
        assert set(row) == {"method", "target_sparsity", "seed", "test_accuracy", "sparsity",
                            "wall_time_s"}
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["sparsity"] <= 1
    assert abs(on_disk["rows"][1]["sparsity"] - 0.9) < 0.005  # magnitude hits its target
    assert (tmp_path / "compare.md").read_text().startswith("# compare: mnist")
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # Both methods prune the same dense model, and their wall times include its training.
    dense = json.loads((tmp_path / "runs" / "dense_seed0" / "report.json").read_text())
    for method, row in zip(["hyperflows", "magnitude"], on_disk["rows"]):
        run = json.loads((tmp_path / "runs" / f"{method}_s0.9_seed0" / "report.json").read_text())
        assert run["config"]["init_checkpoint"] == str(tmp_path / "runs" / "dense_seed0" /
                                                       "checkpoints" / "dense")
        assert row["wall_time_s"] == pytest.approx(dense["wall_time_s"] + run["wall_time_s"])
    again = compare.main(argv)  # finished runs are read back, not retrained
    assert again["rows"] == result["rows"]


def test_compare_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--methods=hyperflows,obd"])
    assert "unknown methods ['obd']" in capsys.readouterr().err


def test_power_fit_recovers_a_known_law():
    g = np.geomspace(0.1, 10, 8)
    (slope, intercept), r2 = pressure_law.power_fit(g, 3.0 * g ** -0.7)
    assert slope == pytest.approx(-0.7) and np.exp(intercept) == pytest.approx(3.0)
    assert r2 == pytest.approx(1.0)
    curved = np.exp(1.0 - 0.5 * np.log(g) - 0.1 * np.log(g) ** 2)
    (q2, q1, q0), _ = pressure_law.power_fit(g, curved, degree=2)
    assert (q0, -q1, -q2) == pytest.approx((1.0, 0.5, 0.1))


@pytest.mark.slow
def test_pressure_law_tiny_sweep(mnist_npz, tmp_path):
    result = pressure_law.main([f"--dataset=npz:{mnist_npz}", "--train_examples=1024",
                                "--points=4", "--epochs=3", "--dense_epochs=1",
                                f"--out={tmp_path}"])
    on_disk = json.loads((tmp_path / "pressure_law.json").read_text())
    assert set(on_disk) >= {"alpha", "c", "r2", "points"}
    assert len(on_disk["points"]) == 4
    densities = [p["density"] for p in on_disk["points"]]
    assert all(a >= b for a, b in zip(densities, densities[1:]))  # more pressure, fewer weights
    g = np.array([p["gamma"] for p in on_disk["points"]])
    (slope, _), r2 = pressure_law.power_fit(g, np.array(densities))
    assert on_disk["alpha"] == pytest.approx(-slope) and on_disk["r2"] == pytest.approx(r2)
    assert len(result["pruning_law"]["points"]) == 3
    assert (tmp_path / "pressure_law.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_overhead_counts_state_bytes_exactly(tmp_path):
    row = overhead.measure("lenet300", steps=2, warmup=1)
    params, prunable = 266610, 784 * 300 + 300 * 100 + 100 * 10
    # presence T + Adam mu and nu (float32, prunable entries) + SGD momentum (all params),
    # plus the int32/float32 scalars of the states
    scalars = 4 * (1 + 1 + 1 + 1)  # hyperflows count, skipped, gamma; adam count
    assert row["state_bytes_per_param"] == pytest.approx(
        (12 * prunable + 4 * params + scalars) / params)
    assert row["dense_state_bytes_per_param"] == pytest.approx(4.0)
    assert row["dense_step_s"] > 0 and row["hyperflows_step_s"] > 0
    assert row["ratio"] == pytest.approx(row["hyperflows_step_s"] / row["dense_step_s"])


@pytest.mark.slow
def test_graph_speed_times_every_stage_and_counts_macs(tmp_path):
    result = graph_speed.main(["--quick", "--models=lenet300_mnist", f"--out={tmp_path}"])
    (row,) = result["rows"]
    assert row["equations"] > 0 and row["groups"] == 2 and row["channels"] == 400
    assert row["dense_macs"] == 784 * 300 + 300 * 100 + 100 * 10 > row["compact_macs"] > 0
    assert all(row["seconds"][s]["first"] > 0 for s in graph_speed.STAGES)
    assert (tmp_path / "graph_speed.png").read_bytes()[:4] == b"\x89PNG"


def test_cifar10_setting_is_the_grid_its_docstring_gives():
    args = compare.parse_args(["--setting=cifar10"])
    cfg = compare.setting_config(args)
    assert cfg.data.dataset.endswith("cifar10_jpeg.npz") and cfg.data.batch_size == 64
    s = cfg.schedule
    assert (s.dense_epochs, s.pruning_epochs, s.regrowth_epochs) == (2, 5, 1)
    assert recipe.presence_regime(s.pruning_epochs * (50000 // 64)) == (pytest.approx(3.5e-3), 39)
    runs = compare.plan(args)
    # By hand: a dense start of 2 epochs; Hyperflows and magnitude 6 each, random and RigL
    # 8 each, at 3 targets; the dense row 8: 2 + 3 * (6 + 6 + 8 + 8) + 8 = 94.
    assert len(runs) == 14 and sum(runs.values()) == 94


def test_compare_without_dense_epochs_starts_every_method_from_initialization():
    args = compare.parse_args(["--setting=cifar10_5k_short"])
    preset = presets.get("compare_cifar10_5k_short").schedule
    assert preset.dense_epochs == 0
    for method in ("hyperflows", "magnitude", "random"):
        cfg = compare.run_config(args, method, 0.9, seed=1)
        assert cfg.schedule.init_checkpoint is None and cfg.schedule.dense_epochs == 0
        assert (cfg.schedule.pruning_epochs, cfg.schedule.regrowth_epochs) == (
            preset.pruning_epochs, preset.regrowth_epochs)
        assert not compare.starts_dense(args, method)
    mnist = compare.parse_args(["--setting=mnist"])
    assert compare.starts_dense(mnist, "hyperflows") and not compare.starts_dense(mnist, "snip")
    regime = compare.parse_args(["--setting=cifar10_5k"])  # the reference's regime
    assert compare.starts_dense(regime, "hyperflows") and not compare.starts_dense(regime, "rigl")
    cfg = compare.run_config(regime, "hyperflows", 0.95, seed=0)
    assert cfg.method.presence_lr is None and cfg.method.pressure_updates_per_epoch is None
    assert cfg.schedule.pruning_epochs * 5056 // cfg.data.batch_size >= 1500  # pruning steps
    dense = compare.dense_row_config(regime, seed=0).schedule
    assert dense.dense_only and dense.dense_epochs == 10 + 20 + 5
    at_init = compare.run_config(mnist, "snip", 0.9, seed=0).schedule
    dense_first = presets.get("compare_mnist").schedule
    assert at_init.dense_epochs == 0
    assert at_init.pruning_epochs == dense_first.dense_epochs + dense_first.pruning_epochs


def test_quick_replaces_defaults_but_explicit_flags_win():
    quick = compare.parse_args(["--quick"])
    assert (quick.sparsities, quick.seeds) == ([0.9, 0.98], 1)
    explicit = compare.parse_args(["--quick", "--seeds=2", "--sparsities=0.5"])
    assert (explicit.sparsities, explicit.seeds) == ([0.5], 2)
    assert compare.setting_config(explicit).model.name == "lenet300"
    assert pressure_law.parse_args(["--quick", "--epochs=3"]).epochs == 3
    assert pressure_law.parse_args(["--quick"]).epochs == pressure_law.QUICK["epochs"]


def test_pressure_law_with_one_epoch_reports_no_settling(mnist_npz, tmp_path):
    result = pressure_law.main([f"--dataset=npz:{mnist_npz}", "--train_examples=512",
                                "--points=3", "--epochs=1", "--dense_epochs=0",
                                f"--out={tmp_path}"])
    assert [r["settled"] for r in result["runs"]] == [False] * 3
    assert all(r["last_change"] is None for r in result["runs"])
    assert result["pruning_law"]["exponent"] is None
    assert "n/a (one epoch)" in (tmp_path / "pressure_law.md").read_text()


@pytest.mark.slow
def test_pressure_law_on_a_batchnorm_net(cifar_npz, tmp_path):
    """The cifar10_5k setting: a BatchNorm conv net, its running statistics in evaluation."""
    result = pressure_law.main(["--setting=cifar10_5k", f"--dataset=npz:{cifar_npz}",
                                "--model=resnet20", "--width=0.25", "--train_examples=256",
                                "--points=3", "--epochs=2", "--dense_epochs=1",
                                "--presence_lr=0.05", "--gamma_min=0.5", "--gamma_max=50",
                                f"--out={tmp_path}"])
    assert result["config"]["batch_size"] == 64  # the setting's, not the MNIST default
    assert pressure_law.parse_args(["--setting=cifar10_5k"]).presence_lr == pytest.approx(
        0.0035)  # the regime's, for 20 epochs of 79 steps
    densities = [p["density"] for p in result["points"]]
    assert densities[0] > densities[-1]  # more pressure, fewer weights
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in result["runs"])
    assert np.isnan(pressure_law.power_fit(np.ones(3), np.arange(1.0, 4.0))[1])  # no x spread
    assert "resnet20 x0.25" in (tmp_path / "pressure_law.md").read_text()


@pytest.mark.slow
def test_structured_rows_in_the_issue_shape(cifar_npz, tmp_path):
    small = subset_npz(cifar_npz, tmp_path / "small_cifar.npz", train=256, test=64)
    result = structured.main(["--quick", f"--dataset={small}", f"--out={tmp_path}",
                              "--repeats=3"])
    on_disk = json.loads((tmp_path / "structured.json").read_text())
    assert on_disk["rows"] == result["rows"]
    rows = {r["method"]: r for r in on_disk["rows"]}
    assert list(rows) == ["hyperflows_channel", "dhp_reach", "ftwt", "hyperflows"]
    for row in on_disk["rows"]:
        assert set(row) == {"method", "flops_target", "seed", "test_accuracy",
                            "flops_fraction", "params_fraction", "speedup_b1", "speedup_b256",
                            "speedup_b256_x8"}
        assert row["flops_target"] == 0.5 and row["seed"] == 0
        assert 0 < row["flops_fraction"] <= 1 and 0 < row["params_fraction"]
    for method in ("hyperflows_channel", "dhp_reach", "hyperflows"):
        assert rows[method]["params_fraction"] <= 1
        assert rows[method]["speedup_b1"] > 0 and rows[method]["speedup_b256"] > 0
        assert rows[method]["speedup_b256_x8"] > 0
    # FTWT gates per input: no exported model; its heads come on top of the backbone.
    assert rows["ftwt"]["speedup_b1"] is None and rows["ftwt"]["params_fraction"] > 1
    # The channel methods' exported FLOPs are the ones their controller or stop measured,
    # FTWT's the mean executed over the test set.
    for method in ("hyperflows_channel", "dhp_reach", "ftwt"):
        report = json.loads((tmp_path / "runs" / f"{method}_s0.5_seed0" /
                             "report.json").read_text())
        assert report["target"] == "flops" and report["config"]["train_bn_scale"]
        assert rows[method]["flops_fraction"] == pytest.approx(1 - report["target_removed"],
                                                               abs=1e-6)
    assert (tmp_path / "structured.md").read_text().startswith("# structured: cifar10_5k")
    assert (tmp_path / "structured.png").read_bytes()[:4] == b"\x89PNG"


def test_conv_speed_times_every_traced_conv_cut_and_rounded(tmp_path):
    result = conv_speed.main(["--quick", "--model=lenet5", "--width=1", "--batch=2",
                              "--repeats=1", f"--out={tmp_path}"])
    # LeNet-5's two convs, traced: 5x5, 1 -> 6 on 28x28 (24x24 out), 6 -> 16 on 12x12.
    rows = result["rows"]
    assert [r["input"] for r in rows] == [[28, 28, 1], [12, 12, 6]]
    # At 0.3 of the MACs every channel count times sqrt(0.3), the image's whole; rounded
    # up to 8, at most the dense count.
    assert [r["variants"]["0.3"]["channels"] for r in rows] == [[1, 3], [3, 9]]
    assert [r["variants"]["0.3 x8"]["channels"] for r in rows] == [[1, 6], [6, 16]]
    assert rows[1]["variants"]["dense"]["macs"] == 8 * 8 * 25 * 6 * 16
    assert result["totals"]["dense"]["macs"] == 24 * 24 * 25 * 6 + 8 * 8 * 25 * 6 * 16
    assert all(v["ms"] > 0 for r in rows for v in r["variants"].values())
    assert (tmp_path / "conv_speed.md").read_text().startswith("# conv_speed: lenet5")


@pytest.mark.slow
def test_oneshot_prunes_every_pattern_from_one_trained_model(small_mnist, tmp_path):
    result = oneshot.main(["--quick", f"--dataset={small_mnist}", "--per_class=8",
                           "--measures=magnitude_squared,loss_increase", f"--out={tmp_path}"])
    rows = result["rows"]
    assert [(r["measure"], r["pattern"]) for r in rows] == [
        ("magnitude_squared", "90 %"), ("magnitude_squared", "2:4"),
        ("loss_increase", "90 %"), ("loss_increase", "2:4")]
    assert [round(r["sparsity"], 4) for r in rows] == [0.9, 0.5, 0.9, 0.5]
    assert result["dense_accuracy"] > 0.5  # trained: far above 10 classes' chance
    assert all(0 <= r[k] <= 1 for r in rows for k in ("pruned_accuracy",
                                                      "finetuned_accuracy"))
    assert (tmp_path / "oneshot.md").read_text().startswith("# oneshot: lenet300")


@pytest.mark.slow
def test_gradient_flow_runs_and_judges_the_claims(small_mnist, tmp_path):
    result = gradient_flow.main(["--quick", f"--dataset={small_mnist}", "--per_class=8",
                                 "--measures=grasp,gradient_norm_preservation",
                                 f"--out={tmp_path}"])
    assert [(r["time"], r["measure"]) for r in result["rows"]] == [
        (1, "grasp"), (1, "gradient_norm_preservation"),
        (2, "grasp"), (2, "gradient_norm_preservation")]
    assert [c["holds"] for c in result["claims"][:2]] == [None, None]  # not run
    grasp = [r for r in result["rows"] if r["measure"] == "grasp"]
    assert result["claims"][2]["holds"] == all(
        r["after"]["grad_norm2"] > r["before"]["grad_norm2"] and r["final_accuracy"] <
        o["final_accuracy"] for r, o in zip(grasp, result["rows"][1::2]))
    assert all(len(r["train_loss"]) == 1 for r in result["rows"])
    assert "3. raising the gradient norm" in (tmp_path / "gradient_flow.md").read_text()


def test_gradient_flow_claims_follow_the_numbers():
    def row(time, measure, loss_jump, grad_ratio, final, first):
        return {"time": time, "measure": measure, "before": {"loss": 1.0, "grad_norm2": 1.0},
                "after": {"loss": 1.0 + loss_jump, "grad_norm2": grad_ratio},
                "final_accuracy": final, "train_loss": [first]}
    rows = [row(t, m, *v) for t in (1, 5) for m, v in (
        ("magnitude_squared", (0.5, 1.0, 0.90, 0.30)),
        ("loss_preservation", (0.2, 1.0, 0.91, 0.40)),
        ("grasp", (2.0, 3.0, 0.80, 0.90)),
        ("gradient_norm_preservation", (0.3, 1.1, 0.92, 0.35)))]
    assert [c["holds"] for c in gradient_flow.claims(rows, (1, 5))] == [True, True, True]
    rows[1]["final_accuracy"] = 0.89  # early |θ·g| now ends below θ²
    rows[6]["after"]["grad_norm2"] = 0.5  # late GraSP lowers the gradient norm
    assert [c["holds"] for c in gradient_flow.claims(rows, (1, 5))] == [True, False, False]


def test_plain_loop_reestimates_batchnorm_on_the_pruned_network():
    """The re-estimated statistics are the mean over the batches of each batch's mean and
    (biased) variance of BatchNorm's input, written out with numpy."""
    import flax.linen as nn

    from experiments import plain_loop
    from hflows_jax.data import ArrayDataset
    from hflows_jax.models.norm import MOMENTUM

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(5)(x.reshape(len(x), -1))
            x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
            return nn.Dense(3)(x)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2 * plain_loop.BATCH + 7, 4, 4, 1), np.uint8)
    labels = rng.integers(0, 3, len(images)).astype(np.int32)
    data = plain_loop.Data(ArrayDataset("toy", images, labels, images[:8], labels[:8], 3),
                           np.full(1, 100.0), np.full(1, 50.0), augment=True)
    model = Net()
    params, stats = plain_loop.init(model, data, seed=0)
    params = jax.tree.map(lambda p: p * (np.abs(p) > 0.2), params)  # "pruned"
    got = plain_loop.reestimated(model, params, stats, data, batches=2, seed=3)
    kernel, bias = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    batches = plain_loop.train_batches(images, labels, plain_loop.BATCH, 3, 0, data.mean,
                                       data.std, augment=False)  # what it reads: unaugmented
    hidden = [x.reshape(len(x), -1) @ kernel + bias for _, (x, _) in zip(range(2), batches)]
    np.testing.assert_allclose(got["BatchNorm_0"]["mean"],
                               np.mean([h.mean(0) for h in hidden], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["BatchNorm_0"]["var"],
                               np.mean([h.var(0) for h in hidden], 0), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_latency_rows_per_runtime_and_batch_with_a_fresh_serving_process(tmp_path):
    from experiments import latency

    result = latency.main(["--models=lenet300", "--batches=1,4", "--runtimes=xla,xla_served",
                           "--repeats=3", "--seconds=0.05", f"--out={tmp_path}"])
    rows = result["rows"]
    assert {(r["runtime"], r["batch"]) for r in rows} == {
        (rt, b) for rt in ("xla", "xla_served") for b in (1, 4)}
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["mac_bound"] > 1 and r["routes"] and r["structure"].startswith("random")
    assert json.loads((tmp_path / "latency.json").read_text())["rows"] == rows
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_uniform_channels_land_on_the_multiply_add_target():
    import jax.numpy as jnp

    import hflows_jax as hf
    from experiments.latency import uniform_channels
    from hflows_jax import models

    model = models.create("lenet5", 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    groups = hf.structured.channel_groups(model, params, (28, 28, 1))
    kept, fraction = uniform_channels(groups, 0.6)
    assert fraction == pytest.approx(float(groups.flops_fraction(kept)))
    assert 0.4 <= fraction < 0.5  # the cut just short of the target: 6 channels are coarse
    sizes = groups.sizes
    fractions = {g: k.sum() / sizes[g] for g, k in kept.items()}
    assert max(fractions.values()) - min(fractions.values()) < 0.2  # one fraction, rounded


@pytest.mark.slow
def test_channel_landing_records_warnings_and_where_each_run_landed(small_mnist, tmp_path):
    from experiments import channel_landing

    result = channel_landing.main([f"--npz={small_mnist.removeprefix('npz:')}", "--lrs=0.1", "--targets=0.5",
                                   "--steps=6", f"--out={tmp_path}"])
    assert [(r["controller"], r["steps"]) for r in result["rows"]] == [("trajectory", 6),
                                                                       ("pi", 6)]
    trajectory, pi = result["rows"]
    assert any("cannot pull back" in w for w in trajectory["warnings"])
    assert not any("cannot pull back" in w for w in pi["warnings"])
    assert all(0 <= r["removed"] < 1 for r in result["rows"])


@pytest.mark.slow
def test_bench_times_the_dense_and_the_hyperflows_step(tmp_path):
    result = bench.main(["--tiny", "--peak_tflops=2", f"--out={tmp_path}"])
    (row,) = result["rows"]
    assert (row["model"], row["width"], row["batch"], row["dtype"]) == ("vgg19", 0.0625, 8,
                                                                       "float32")
    macs, _ = hf.flops.forward_macs(models.create("vgg19", 10, width=0.0625),
                                    models.create("vgg19", 10, width=0.0625).init(
                                        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"],
                                    (32, 32, 3))
    assert row["forward_macs"] == macs
    for key in ("dense", "hyperflows"):
        r = row[key]
        assert r["images_per_s"] == pytest.approx(8 / r["step_s"])
        assert r["tflops"] == pytest.approx(6 * macs * 8 / r["step_s"] / 1e12)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / 2)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == result["rows"]
    assert "hyperflows / dense" in (tmp_path / "bench.md").read_text()
