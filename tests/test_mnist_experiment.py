"""The first real experiment: LeNet-300-100 on MNIST, end to end."""

import json

import pytest
import tensorflow_datasets as tfds

from experiments import mnist


def test_default_run_lands_on_target_with_accuracy(mnist_npz, tmp_path):
    """The trajectory controller lands within 0.3 points of 98 % on real MNIST."""
    report = mnist.main([f"--dataset=npz:{mnist_npz}", f"--workdir={tmp_path}"])
    assert abs(report["sparsity"] - 0.98) <= 0.003, report["sparsity"]
    assert report["test_accuracy"] >= 0.975, report["test_accuracy"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["params_total"] == 266610
    assert on_disk["params_remaining"] == pytest.approx(
        266610 - 0.98 * 266200, abs=0.003 * 266200)
    assert set(on_disk["layer_sparsity"]) == {"Dense_0/kernel", "Dense_1/kernel",
                                               "Dense_2/kernel"}
    phases = [row["phase"] for row in on_disk["history"]]
    assert phases.count("pruning") == 40 and phases.count("regrowth") == 10


def test_tiny_run_on_mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        report = mnist.main(["--dense_epochs=1", "--pruning_epochs=2", "--regrowth_epochs=1",
                             "--batch_size=16", f"--workdir={tmp_path}"])
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert 0.0 <= report["sparsity"] <= 1.0
    assert report["params_remaining"] <= report["params_total"]
    assert (tmp_path / "report.json").exists()


@pytest.mark.parametrize("flags, error, message", [
    (["--target_sparsity=1.5"], ValueError, r"target_sparsity must lie in \(0, 1\)"),
    (["--dataset=imagenet21k"], ValueError, "Unknown dataset 'imagenet21k'"),
    (["--dataset=npz:/no/such/file.npz"], FileNotFoundError, "no such file"),
])
def test_bad_flags_raise_clear_errors(flags, error, message, tmp_path):
    with pytest.raises(error, match=message):
        mnist.main(flags + [f"--workdir={tmp_path}"])
