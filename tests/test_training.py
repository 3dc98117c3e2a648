"""The training stack: steps over devices, runs end to end, resume, reports, errors."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import hflows_jax as hf
from hflows_jax import models
from hflows_jax.training import Config, run
from hflows_jax.training.checkpoint import Checkpoints
from hflows_jax.training.report import forward_macs
from tests.helpers import subset_npz

TINY = dict(model="resnet20", width=0.25, batch_size=16, lr=0.05, log_every=2)


@pytest.fixture
def small_cifar(cifar_npz, tmp_path):
    """96 training and 40 test images of the real CIFAR-10 subset."""
    return subset_npz(cifar_npz, tmp_path / "small_cifar.npz", train=96, test=40)


def check_outputs(workdir, report, epochs):
    on_disk = json.loads((workdir / "report.json").read_text())
    for key in ("test_accuracy", "sparsity", "layer_sparsity", "params_total",
                "params_remaining", "flops_dense", "flops_sparse", "config"):
        assert key in on_disk, key
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["flops_sparse"] <= report["flops_dense"]
    assert report["params_remaining"] <= report["params_total"]
    lines = (workdir / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == epochs + 1 and lines[0].startswith("phase,epoch,loss")
    assert (workdir / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_one_step_run_on_mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        report = run(Config(dataset="cifar10", dense_epochs=0, pruning_epochs=1,
                            regrowth_epochs=0, workdir=str(tmp_path), **TINY))
    check_outputs(tmp_path, report, epochs=1)
    assert report["history"][0]["phase"] == "pruning"


def test_two_epoch_run_on_npz_arrays(small_cifar, tmp_path):
    report = run(Config(dataset=small_cifar, dense_epochs=1, pruning_epochs=1,
                        regrowth_epochs=0, workdir=str(tmp_path), **TINY))
    check_outputs(tmp_path, report, epochs=2)
    assert [r["phase"] for r in report["history"]] == ["dense", "pruning"]
    assert report["config"]["dataset"] == small_cifar


@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "random", "rigl"])
def test_baseline_methods_run_end_to_end_on_target(method, small_cifar, tmp_path):
    report = run(Config(model="lenet5", dataset=small_cifar, method=method, batch_size=16,
                        target_sparsity=0.9, dense_epochs=1, pruning_epochs=2,
                        regrowth_epochs=1, workdir=str(tmp_path)))
    assert report["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert report["config"]["method"] == method
    assert [r["phase"] for r in report["history"]] == ["dense", "pruning", "pruning",
                                                       "regrowth"]


def test_dense_only_baseline_run(small_cifar, tmp_path):
    report = run(Config(dataset=small_cifar, dense_only=True, dense_epochs=1,
                        workdir=str(tmp_path), **TINY))
    assert report["sparsity"] == 0.0 and report["layer_sparsity"] == {}
    assert report["flops_sparse"] == report["flops_dense"]
    assert report["params_remaining"] == report["params_total"]
    assert [r["phase"] for r in report["history"]] == ["dense"]


def final_state(workdir):
    """The last checkpointed state, read raw (as saved, without a target structure)."""
    ckpt = Checkpoints(str(workdir / "checkpoints" / "pruning"))
    path = f"{ckpt.directory}/{ckpt.latest()}/state"
    ckpt.close()
    return ocp.StandardCheckpointer().restore(path)


def test_interrupted_run_resumes_to_the_same_result(small_cifar, tmp_path, monkeypatch):
    cfg = dict(dataset=small_cifar, dense_epochs=1, pruning_epochs=2, regrowth_epochs=1,
               target_sparsity=0.5, presence_lr=0.1, **TINY)
    whole = run(Config(workdir=str(tmp_path / "whole"), **cfg))

    original_save = Checkpoints.save

    def crash_after_epoch_2(self, epoch, state, record):
        original_save(self, epoch, state, record)
        if epoch == 2:
            self._manager.wait_until_finished()
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(Checkpoints, "save", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(Config(workdir=str(tmp_path / "resumed"), **cfg))
    monkeypatch.setattr(Checkpoints, "save", original_save)
    resumed = run(Config(workdir=str(tmp_path / "resumed"), **cfg))

    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "resumed")
    chex.assert_trees_all_close(b, a, atol=1e-6, rtol=1e-6)
    assert resumed["sparsity"] == whole["sparsity"] > 0.0
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["test_accuracy"] == whole["test_accuracy"]

    with pytest.raises(ValueError, match="another config.*target_sparsity"):
        run(Config(workdir=str(tmp_path / "resumed"), **{**cfg, "target_sparsity": 0.9}))


def test_forward_macs_against_hand_count():
    model = models.create("lenet5", 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    # conv 5x5x1x6 at 24x24, conv 5x5x6x16 at 8x8, dense 256x120, 120x84, 84x10
    dense = 150 * 576 + 2400 * 64 + 256 * 120 + 120 * 84 + 84 * 10
    tx = hf.hyperflows(hf.pressure.constant(1.0))
    state = tx.init(variables["params"])
    presence = jax.tree.map(lambda t: t, state.presence)
    presence["Conv_1"]["kernel"] = presence["Conv_1"]["kernel"].at[:, :, :3, :].set(-1.0)
    presence["Dense_0"]["kernel"] = -jnp.ones_like(presence["Dense_0"]["kernel"])
    masks = hf.masks(state._replace(presence=presence))
    got_dense, got_sparse = forward_macs(model, variables, (28, 28, 1), masks)
    assert got_dense == dense
    assert got_sparse == dense - (5 * 5 * 3 * 16) * 64 - 256 * 120


@pytest.mark.parametrize("flags, message", [
    (["--model=alexnet"], "invalid choice: 'alexnet'"),
    (["--dataset=svhn"], "Unknown dataset 'svhn'"),
    (["--dtype=float16"], "invalid choice: 'float16'"),
    (["--target_sparsity=0"], "--target_sparsity must lie in (0, 1)"),
])
def test_cli_errors_are_clear(flags, message, small_cifar, tmp_path):
    args = [sys.executable, "-m", "experiments.cifar", "--model=resnet20",
            f"--dataset={small_cifar}", f"--workdir={tmp_path}"] + flags
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
