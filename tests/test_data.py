"""Data sources (tfds via mock_data, npz) and the batch pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hflows_jax import data


def test_random_crop_flip_matches_a_per_image_oracle():
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    out = data.random_crop_flip(images, np.random.default_rng(7), pad=2)
    rng = np.random.default_rng(7)  # same draws, in the same order, applied one at a time
    dy, dx, flips = rng.integers(0, 5, 16), rng.integers(0, 5, 16), rng.random(16) < 0.5
    for i in range(16):
        padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
        crop = padded[dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)
    assert 0 < flips.sum() < 16


def test_epoch_order_is_deterministic_and_process_shards_partition_each_batch():
    a = data.epoch_order(100, 16, seed=3, epoch=2)
    np.testing.assert_array_equal(a, data.epoch_order(100, 16, seed=3, epoch=2))
    assert not np.array_equal(a, data.epoch_order(100, 16, seed=3, epoch=3))
    assert a.shape == (6, 16) and len(np.unique(a)) == 96
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    labels = np.arange(100, dtype=np.int32)
    mean, std = np.zeros(1, np.float32), np.ones(1, np.float32)
    shards = [list(data.train_batches(images, labels, 16, 3, 2, mean, std, augment=False,
                                      process_index=p, process_count=4)) for p in range(4)]
    for step in range(6):
        got = np.concatenate([shards[p][step][1] for p in range(4)])
        np.testing.assert_array_equal(got, a[step])
    with pytest.raises(ValueError, match="not divisible"):
        next(data.train_batches(images, labels, 10, 0, 0, mean, std, process_count=4))


def test_augmented_process_shards_make_the_one_process_batch():
    images = np.random.default_rng(2).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(40, dtype=np.int32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    whole = list(data.train_batches(images, labels, 8, 5, 1, mean, std, augment=True))
    shards = [list(data.train_batches(images, labels, 8, 5, 1, mean, std, augment=True,
                                      process_index=p, process_count=2)) for p in range(2)]
    for step, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([s[step][0] for s in shards]), x)
        np.testing.assert_array_equal(np.concatenate([s[step][1] for s in shards]), y)
    plain = next(data.train_batches(images, labels, 8, 5, 1, mean, std, augment=False))
    assert not np.array_equal(whole[0][0], plain[0])  # augmentation did happen


def test_channel_stats_and_normalize():
    images = np.random.default_rng(1).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    x = data.normalize(images, mean, std)
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1, atol=1e-4)
    # By hand: half 0, half 255 -> mean 0.5, std 0.5; 51 everywhere -> 0.2 and 0.
    halves = np.stack([np.repeat([0, 255], 8).reshape(4, 2, 2), np.full((4, 2, 2), 51)], -1)
    mean, std = data.channel_stats(halves.astype(np.uint8))
    np.testing.assert_allclose(mean, [0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(std, [0.5, 0.0], atol=1e-7)


def test_load_npz_real_files(mnist_npz, cifar_npz):
    mnist = data.load_npz(str(mnist_npz))
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.num_classes == 10
    cifar = data.load_npz(str(cifar_npz))
    assert cifar.x_train.shape == (5085, 32, 32, 3) and cifar.x_test.shape == (1017, 32, 32, 3)
    assert cifar.y_train.dtype == np.int32 and set(np.unique(cifar.y_train)) == set(range(10))


def test_load_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_dataset(f"npz:{tmp_path}/missing.npz")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks the arrays"):
        data.load_dataset(f"npz:{tmp_path}/partial.npz")
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        data.load_dataset("svhn")


def test_files_that_are_not_npz_archives_are_named(tmp_path):
    arrays = {k: np.zeros((2, 4, 4), np.uint8) for k in ("x_train", "x_test")}
    np.savez(tmp_path / "whole.npz", y_train=np.zeros(2), y_test=np.zeros(2), **arrays)
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[:len(whole) // 2])
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    for name, message in [("truncated", "is damaged or truncated"),
                          ("single", "holds a single .npy array, not an .npz"),
                          ("random", "is not an .npz file")]:
        path = tmp_path / f"{name}.npz"
        with pytest.raises(ValueError) as error:
            data.load_dataset(f"npz:{path}")
        assert str(error.value).startswith(f"--dataset=npz:{path} {message}")
        assert "numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)" in str(
            error.value)
    assert data.load_dataset(f"npz:{tmp_path / 'whole.npz'}").x_train.shape == (2, 4, 4, 1)
    # Arrays of the wrong kind: the file and the array are named.
    np.savez(tmp_path / "floats.npz", x_train=np.zeros((2, 4, 4), np.float32),
             y_train=np.zeros(2), x_test=arrays["x_test"], y_test=np.zeros(2))
    np.savez(tmp_path / "labels.npz", y_train=np.zeros(3), y_test=np.zeros(2), **arrays)
    for name, message in [("floats", "x_train: expected uint8 images"),
                          ("labels", ": x_train holds 2 images and y_train 3 labels")]:
        with pytest.raises(ValueError, match=message) as error:
            data.load_dataset(f"npz:{tmp_path / name}.npz")
        assert str(error.value).startswith(f"--dataset=npz:{tmp_path / name}.npz")


@pytest.mark.parametrize("name, shape, classes", [("cifar10", (32, 32, 3), 10),
                                                   ("cifar100", (32, 32, 3), 100),
                                                   ("mnist", (28, 28, 1), 10)])
def test_tfds_through_data_source_on_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset(name)
    assert ds.x_train.shape == (24,) + shape and ds.x_train.dtype == np.uint8
    assert ds.num_classes == classes and ds.y_test.shape == (24,)


def test_tfds_errors_other_than_not_prepared_pass_through(monkeypatch):
    """Only "not prepared" is reworded; a real failure inside tfds keeps its own error."""
    def broken(*args, **kwargs):
        raise PermissionError("data_dir is not readable")

    monkeypatch.setattr(tfds, "data_source", broken)
    with pytest.raises(PermissionError, match="not readable"):
        data.load_dataset("mnist")


def test_results_name_their_commit_command_and_data_hash(tmp_path):
    """``outputs.environment``: the commit git reports, and the SHA-256 of every .npz the
    process read, by an independent hash of the file."""
    import hashlib
    import subprocess

    from hflows_jax.training import outputs

    rng = np.random.default_rng(0)
    path = str(tmp_path / "tiny.npz")
    np.savez(path, x_train=rng.integers(0, 255, (4, 8, 8, 1), np.uint8),
             y_train=np.arange(4), x_test=rng.integers(0, 255, (2, 8, 8, 1), np.uint8),
             y_test=np.arange(2))
    data.load_dataset(f"npz:{path}")
    env = outputs.environment()
    with open(path, "rb") as f:
        assert env["data"][path] == hashlib.sha256(f.read()).hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=outputs.REPO, capture_output=True,
                          text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert env["commit"] == head.stdout.strip()
        assert isinstance(env["code_changed"], bool)
    assert env["command"].startswith("python")
