"""experiments/user_loops: Hyperflows in the Flax MNIST example and NNX tutorial shapes
takes at most 15 changed lines, and the NNX version trains (a few steps on a subset)."""

import warnings

import pytest

from experiments.user_loops import nnx_mnist_hf, run
from tests.helpers import subset_npz


@pytest.mark.parametrize("plain, pruned", [("linen_mnist.py", "linen_mnist_hf.py"),
                                           ("nnx_mnist.py", "nnx_mnist_hf.py")])
def test_at_most_15_changed_lines(plain, pruned):
    assert 0 < run.changed_lines(plain, pruned) <= 15


@pytest.mark.slow
def test_nnx_tutorial_with_hyperflows_trains_and_warns_for_a_short_schedule(mnist_npz,
                                                                            tmp_path):
    npz = subset_npz(mnist_npz, tmp_path / "mnist.npz", train=256, test=64).split(":", 1)[1]
    config = nnx_mnist_hf.default_config()
    config.train_steps, config.eval_every, config.batch_size = 4, 2, 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nnx_mnist_hf.train_and_evaluate(config, npz)
    assert any("cannot reach 90.00%" in str(w.message) for w in caught)
    assert 0.0 <= result["sparsity"] < 1.0 and 0.0 <= result["test_accuracy"] <= 1.0
