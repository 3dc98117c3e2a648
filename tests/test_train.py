"""The training run end to end: outputs, phases, baselines, resume, skipped steps."""

import json
import time

import chex
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from hflows_jax.training import Config, run, train
from hflows_jax.training.checkpoint import Checkpoints
from tests.helpers import interrupt_after_epoch, subset_npz

TINY = dict(model="resnet20", width=0.25, batch_size=16, lr=0.05, log_every=2)


def config(**flags) -> Config:
    return Config().replace(**flags)


@pytest.fixture
def small_cifar(cifar_npz, tmp_path):
    """96 training and 40 test images of the real CIFAR-10 subset."""
    return subset_npz(cifar_npz, tmp_path / "small_cifar.npz", train=96, test=40)


def check_outputs(workdir, report, epochs):
    on_disk = json.loads((workdir / "report.json").read_text())
    for key in ("test_accuracy", "sparsity", "layer_sparsity", "params_total",
                "params_remaining", "flops_dense", "flops_sparse", "skipped_steps",
                "compile_s", "images_per_s", "config"):
        assert key in on_disk, key
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["flops_sparse"] <= report["flops_dense"]
    assert report["params_remaining"] <= report["params_total"]
    assert report["compile_s"] > 0 and report["images_per_s"] > 0
    lines = (workdir / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == epochs + 1 and lines[0].startswith("phase,epoch,loss")
    assert (workdir / "run.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_one_step_run_on_mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        report = run(config(dataset="cifar10", dense_epochs=0, pruning_epochs=1,
                            regrowth_epochs=0, workdir=str(tmp_path), **TINY))
    check_outputs(tmp_path, report, epochs=1)
    assert report["history"][0]["phase"] == "pruning"


@pytest.mark.slow
def test_two_epoch_run_on_npz_arrays(small_cifar, tmp_path):
    report = run(config(dataset=small_cifar, dense_epochs=1, pruning_epochs=1,
                        regrowth_epochs=0, workdir=str(tmp_path), **TINY))
    check_outputs(tmp_path, report, epochs=2)
    assert [r["phase"] for r in report["history"]] == ["dense", "pruning"]
    assert report["config"]["dataset"] == small_cifar
    # While pruning, evaluation runs on re-estimated BatchNorm statistics (--bn_batches);
    # the report keeps the running statistics' accuracy beside it.
    dense, pruning = report["history"]
    assert dense["test_accuracy_running_stats"] is None
    assert 0.0 <= report["test_accuracy_running_stats"] <= 1.0
    assert report["test_accuracy_running_stats"] == pruning["test_accuracy_running_stats"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "random", "rigl"])
def test_baseline_methods_run_end_to_end_on_target(method, small_cifar, tmp_path):
    report = run(config(model="lenet5", dataset=small_cifar, method=method, batch_size=16,
                        target_sparsity=0.9, dense_epochs=1, pruning_epochs=2,
                        regrowth_epochs=1, workdir=str(tmp_path)))
    assert report["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert report["config"]["method"] == method
    assert [r["phase"] for r in report["history"]] == ["dense", "pruning", "pruning",
                                                       "regrowth"]


@pytest.mark.slow
def test_dense_only_baseline_run(small_cifar, tmp_path):
    report = run(config(dataset=small_cifar, dense_only=True, dense_epochs=1,
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


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(small_cifar, tmp_path, monkeypatch):
    cfg = dict(dataset=small_cifar, dense_epochs=1, pruning_epochs=2, regrowth_epochs=1,
               target_sparsity=0.5, presence_lr=0.1, **TINY)
    whole = run(config(workdir=str(tmp_path / "whole"), **cfg))

    resume = interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match=r"^Interrupted after epoch 2 of 4 \(checkpoint "
                       r"in .*/resumed/checkpoints/pruning\)\. Rerun the same command"):
        run(config(workdir=str(tmp_path / "resumed"), **cfg))
    resume()
    started = time.time()
    resumed = run(config(workdir=str(tmp_path / "resumed"), **cfg))
    second_process_s = time.time() - started

    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "resumed")
    chex.assert_trees_all_close(b, a, atol=1e-6, rtol=1e-6)
    assert resumed["sparsity"] == whole["sparsity"] > 0.0
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    # A row logs the lr of the step after its epoch: the pruning lr, then the first regrowth
    # step's (x0.75), then 0: by the regrowth's end the mask is frozen.
    assert [r["presence_lr"] for r in whole["history"][1:]] == pytest.approx([0.1, 0.075, 0.0])
    # The wall time adds the first process's seconds (to its checkpoint of epoch 2).
    first_process_s = resumed["history"][1]["time_s"]
    assert (first_process_s + 0.8 * second_process_s < resumed["wall_time_s"]
            <= first_process_s + second_process_s)

    with pytest.raises(ValueError, match="another config.*target_sparsity"):
        run(config(workdir=str(tmp_path / "resumed"), **{**cfg, "target_sparsity": 0.9}))


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_leaves_its_outputs(small_cifar, tmp_path,
                                                                 capsys):
    cfg = config(model="lenet5", dataset=small_cifar, batch_size=16, dense_epochs=0,
                 pruning_epochs=1, regrowth_epochs=0, workdir=str(tmp_path))
    report = run(cfg)
    outputs = {name: ((tmp_path / name).stat().st_mtime_ns, (tmp_path / name).read_bytes())
               for name in ("report.json", "metrics.csv", "run.png")}
    capsys.readouterr()
    again = run(cfg)
    assert capsys.readouterr().out == (f"The run in {tmp_path} is finished (epoch 1); its "
                                       "outputs stay as they are. Use a new --workdir to run "
                                       "it again.\n")
    assert again["wall_time_s"] == report["wall_time_s"]
    assert again["history"] == json.loads(json.dumps(report["history"]))
    for name, (mtime, data) in outputs.items():
        assert (tmp_path / name).stat().st_mtime_ns == mtime, name
        assert (tmp_path / name).read_bytes() == data, name


@pytest.mark.slow
def test_steps_with_non_finite_gradients_are_reported(small_cifar, tmp_path, capsys):
    """A learning rate of 1e30 turns the weights non-finite in the dense epoch; every
    Hyperflows step after it sees non-finite gradients and is skipped, and says so."""
    report = run(config(model="lenet5", dataset=small_cifar, batch_size=16, lr=1e30,
                        dense_epochs=1, pruning_epochs=2, regrowth_epochs=0,
                        workdir=str(tmp_path)))
    steps_per_epoch = 96 // 16
    pruning_rows = [r for r in report["history"] if r["phase"] == "pruning"]
    assert [r["skipped_steps"] for r in pruning_rows] == [steps_per_epoch] * 2
    assert report["skipped_steps"] == 2 * steps_per_epoch
    assert f"skipped {steps_per_epoch}" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["skipped_steps"] == report["skipped_steps"]


@pytest.mark.slow
def test_a_run_that_cannot_prune_says_so_at_start_and_in_its_report(small_cifar, tmp_path,
                                                                      capsys):
    report = run(config(model="lenet5", dataset=small_cifar, batch_size=16, dense_epochs=0,
                        pruning_epochs=1, regrowth_epochs=0, target_sparsity=0.9,
                        presence_lr=1e-3, workdir=str(tmp_path)))
    out = capsys.readouterr().out
    assert out.index("WARNING: the pruning phase cannot reach") < out.index("epoch   1")
    assert report["sparsity"] == 0.0  # 6 steps of lr 1e-3 move no score past 0
    assert report["target_missed_by"] == pytest.approx(-0.9)
    assert len(report["warnings"]) == 2
    assert report["warnings"][1] == "the run pruned nothing: 0.00% sparsity for a 90.00% target."
    assert "WARNING: the run pruned nothing" in out
    # No presence lr fits 6 steps, so the start warning does not send the user to the default.
    assert "--presence_lr" not in report["warnings"][0]


def test_a_run_saved_before_a_flag_existed_stands_for_its_default(tmp_path):
    cfg = config(workdir=str(tmp_path))
    saved = train.record(cfg, 1, [])
    del saved["config"]["bn_batches"]  # as if written before --bn_batches came
    train.check_same_run(cfg, saved)  # the default: the same run
    with pytest.raises(ValueError, match="another config.*bn_batches: 32 -> 0"):
        train.check_same_run(cfg.replace(bn_batches=0), saved)
