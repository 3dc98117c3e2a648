"""Where images come from: tensorflow_datasets (the real path) or local ``.npz`` arrays.

Both end as an in-memory ``ArrayDataset`` of uint8 NHWC images. CIFAR and MNIST fit in
host memory many times over, and random access to plain arrays keeps shuffling,
sharding and resuming exact and cheap. tfds is read with ``tfds.data_source`` (random
access over array_record files), so no TensorFlow is needed at read time.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

TFDS_DATASETS = {"mnist": 10, "cifar10": 10, "cifar100": 100}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    name: str
    x_train: np.ndarray  # uint8, (N, H, W, C)
    y_train: np.ndarray  # int32, (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.x_train.shape[1:]


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale without a channel axis (MNIST)
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images shaped (N, H, W[, C]), got {x.dtype} {x.shape}")
    return x


def load_npz(path: str, name: str | None = None) -> ArrayDataset:
    """Arrays ``x_train, y_train, x_test, y_test`` (uint8 images) from one ``.npz`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset=npz:{path}: no such file.")
    with np.load(path) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)} "
                             "(needs x_train, y_train, x_test, y_test).")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    y_train = arrays["y_train"].astype(np.int32).reshape(-1)
    y_test = arrays["y_test"].astype(np.int32).reshape(-1)
    return ArrayDataset(
        name=name or os.path.splitext(os.path.basename(path))[0],
        x_train=_as_images(arrays["x_train"]), y_train=y_train,
        x_test=_as_images(arrays["x_test"]), y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return _as_images(images), labels


def load_tfds(name: str, data_dir: str | None = None) -> ArrayDataset:
    """A prepared tfds dataset, read through ``tfds.data_source`` without TensorFlow."""
    import tensorflow_datasets as tfds

    try:
        splits = tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                                  download=False)
    except (NotImplementedError, FileNotFoundError) as e:
        # What tfds raises when the dataset is not prepared (or not as array_record, which
        # random access needs); any other error is not ours to rename.
        raise FileNotFoundError(
            f"The tfds dataset {name!r} is not prepared for random access in "
            f"{data_dir or 'the default data_dir'} ({type(e).__name__}: {e}).\nOn a machine "
            f"with internet access prepare it with\n"
            f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir=DIR).download_and_prepare(file_format='array_record')\"\n"
            f"then pass --data_dir=DIR, or use local arrays with --dataset=npz:PATH.") from e
    (x_train, y_train), (x_test, y_test) = (_read_split(s) for s in splits)
    return ArrayDataset(name, x_train, y_train, x_test, y_test, TFDS_DATASETS[name])


def load_dataset(spec: str, data_dir: str | None = None) -> ArrayDataset:
    """``mnist``, ``cifar10``, ``cifar100`` (tfds) or ``npz:PATH`` (local arrays)."""
    if spec.startswith("npz:"):
        return load_npz(spec[len("npz:"):])
    if spec not in TFDS_DATASETS:
        raise ValueError(f"Unknown dataset {spec!r}: use one of {sorted(TFDS_DATASETS)} "
                         "or npz:PATH.")
    return load_tfds(spec, data_dir)
