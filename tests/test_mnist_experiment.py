"""The first real experiment: LeNet-300-100 on MNIST, end to end."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from experiments import mnist
from tests.helpers import subset_npz

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_exits_130(mnist_npz, tmp_path):
    """A real SIGINT after the first epoch: one line on stderr, no traceback. The child
    sets Python's SIGINT handler itself, in case the test runs where SIGINT is ignored
    (a background job), which a child inherits."""
    dataset = subset_npz(mnist_npz, tmp_path / "small.npz", train=256, test=64)
    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('experiments.mnist', run_name='__main__')")
    flags = [f"--dataset={dataset}", f"--workdir={tmp_path / 'run'}", "--dense_epochs=1",
             "--pruning_epochs=100", "--regrowth_epochs=0", "--batch_size=32"]
    child = subprocess.Popen([sys.executable, "-c", code, *flags], cwd=ROOT,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if "epoch   1" in line:
            child.send_signal(signal.SIGINT)
            break
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]  # after any library warnings
    assert last.startswith("Interrupted after epoch "), stderr
    assert last.endswith(" Rerun the same command to resume from there."), stderr
    assert "Traceback" not in stderr, stderr
