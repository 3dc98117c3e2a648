"""experiments.export: a finished run as serialized models (model.jax, dense.jax) and their
latency, on a tiny LeNet-300-100 run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hflows_jax as hf
from experiments import export as export_experiment
from hflows_jax.training import Config, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_npz(path) -> str:
    """Ten classes of 28x28 uint8 images, each a noisy bright square at its own place."""
    rng = np.random.default_rng(0)

    def images(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 150, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 5)
            x[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * c:7 + 5 * c] += 60
        return x, y.astype(np.uint8)

    (x_train, y_train), (x_test, y_test) = images(320), images(100)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def tiny_config(tmp, name: str, **flags) -> Config:
    return Config().replace(
        dataset=tiny_npz(tmp / "tiny.npz"), model="lenet300", width=0.25, batch_size=32,
        augment=False, dense_epochs=1, pruning_epochs=2, regrowth_epochs=0,
        target_sparsity=0.9, presence_lr=0.2, lr=0.05, weight_decay=0.0, label_smoothing=0.0,
        workdir=str(tmp / name), log_every=5, **flags)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_run")
    cfg = tiny_config(tmp, "run")
    report = run(cfg)
    out = tmp / "out"
    result = export_experiment.main([f"--workdir={cfg.run.workdir}", f"--out={out}",
                                     "--quick", "--bcsr=on", "--tune=off"])
    return cfg, report, out, result


@pytest.mark.slow
def test_export_json_holds_counts_accuracy_and_latency(exported):
    cfg, report, out, result = exported
    assert report["sparsity"] > 0.3, "the tiny run should prune"
    on_disk = json.loads((out / "export.json").read_text())
    for key in ("params_dense", "params_compact", "macs_dense", "macs_compact",
                "test_accuracy_dense", "test_accuracy_compact", "latency",
                "mac_bound_speedup", "bcsr", "bcsr_layers", "macs_compact_bcsr"):
        assert key in on_disk, key
    assert on_disk["params_dense"] == report["params_total"]
    assert on_disk["macs_dense"] == report["flops_dense"]
    assert 0 < on_disk["macs_compact"] < on_disk["macs_dense"]
    assert 0 < on_disk["params_compact"] < on_disk["params_dense"]
    assert on_disk["mac_bound_speedup"] == pytest.approx(
        on_disk["macs_dense"] / on_disk["macs_compact"])
    assert on_disk["platforms"] == ["cpu"]
    assert on_disk["bcsr_layers"] == ["Dense_0", "Dense_1", "Dense_2"]  # --bcsr=on
    assert on_disk["macs_compact_bcsr"] < on_disk["macs_compact"]
    assert [r["batch"] for r in on_disk["latency"]] == [1, 32, 256]
    for r in on_disk["latency"]:
        assert r["dense_ms"] > 0 and r["compact_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compact_ms"])
    assert on_disk["repeats"] == 5  # --quick
    assert (out / "export.md").read_text().startswith("# export:")
    assert (out / "export.png").stat().st_size > 0


def test_compact_accuracy_equals_dense_and_the_run(exported):
    _, report, _, result = exported
    assert result["test_accuracy_compact"] == result["test_accuracy_dense"]
    assert result["test_accuracy_dense"] == pytest.approx(report["test_accuracy"], abs=0.011)
    assert result["test_accuracy_dense"] > 0.2, "the tiny run should learn its squares"


def test_serialized_models_match_the_in_process_ones(exported):
    cfg, _, out, _ = exported
    opened, epoch, state = export_experiment.restore_last(cfg)
    dense, compacted = export_experiment.predict_functions(opened, state, epoch)
    compact, _ = compacted(bcsr=True)
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    for name, fn in (("model.jax", compact), ("dense.jax", dense)):
        loaded = jax.export.deserialize(bytearray((out / name).read_bytes()))
        assert loaded.in_avals[0].dtype == jnp.uint8
        assert str(loaded.in_avals[0].shape[0]) == "b"  # a symbolic batch size
        got = np.asarray(loaded.call(images))
        assert got.dtype == np.float32 and got.shape == (7, 10)
        np.testing.assert_allclose(got, np.asarray(jax.jit(fn)(images)), rtol=1e-5, atol=1e-5)
    # ... and compact == masked dense, with the run's normalization inside.
    weights = hf.finalize(state.params, state.opt_state)
    normalized = (images.astype(np.float32) / 255.0 - opened.inputs.mean) / opened.inputs.std
    reference = opened.model.apply({"params": weights, "batch_stats": state.batch_stats}, normalized)
    served = jax.export.deserialize(bytearray((out / "model.jax").read_bytes())).call(images)
    np.testing.assert_allclose(np.asarray(served), np.asarray(reference), rtol=1e-4, atol=1e-4)
    # Another batch size through the same file.
    assert jax.export.deserialize(bytearray((out / "model.jax").read_bytes())).call(
        images[:3]).shape == (3, 10)


@pytest.mark.slow
def test_model_jax_loads_in_a_process_with_jax_alone(exported):
    """The served file needs no hflows_jax: a fresh process with the imports export.json
    names (jax, and jax.experimental.sparse for BCSR layers) runs it."""
    _, _, out, result = exported
    assert result["bcsr_layers"] and result["load"] == "import jax, jax.experimental.sparse"
    images = np.random.default_rng(2).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    np.save(out / "images.npy", images)
    np.save(out / "want.npy", np.asarray(jax.export.deserialize(
        bytearray((out / "model.jax").read_bytes())).call(images)))
    script = (f"{result['load']}\nimport sys, numpy as np\n"
              "assert 'hflows_jax' not in sys.modules\n"
              f"exp = jax.export.deserialize(bytearray(open({str(out / 'model.jax')!r}, "
              "'rb').read()))\n"
              f"got = exp.call(np.load({str(out / 'images.npy')!r}))\n"
              f"np.testing.assert_allclose(got, np.load({str(out / 'want.npy')!r}), "
              "rtol=1e-5, atol=1e-5)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_dense_only_run_is_a_one_line_error(tmp_path):
    cfg = tiny_config(tmp_path, "dense_only", dense_only=True)
    run(cfg)
    with pytest.raises(ValueError, match="dense-only run"):
        export_experiment.main([f"--workdir={cfg.run.workdir}", f"--out={tmp_path / 'out'}"])
    done = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--workdir={cfg.run.workdir}",
         f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error:"), done.stderr
    assert "dense-only run" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out" / "model.jax").exists()
