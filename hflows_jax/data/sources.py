"""Where images come from: tensorflow_datasets (the real path) or local ``.npz`` arrays.

Both end as an in-memory ``ArrayDataset`` of uint8 NHWC images. CIFAR and MNIST fit in
host memory many times over, and random access to plain arrays keeps shuffling,
sharding and resuming exact and cheap. tfds is read with ``tfds.data_source`` (random
access over array_record files), so no TensorFlow is needed at read time. On first use
a tfds dataset is downloaded and prepared as array_record into ``data_dir``; that one
step does need TensorFlow (tfds's builders read and encode with it), which the
``prepare`` extra installs: ``pip install "hflows_jax[prepare]"``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse
import urllib.request
import zipfile
import zlib

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


def _as_images(x: np.ndarray, where: str = "images") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale without a channel axis (MNIST)
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 images shaped (N, H, W[, C]), got "
                         f"{x.dtype} {x.shape}")
    return x


NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_HOW = ("write an .npz with numpy.savez(PATH, x_train=..., y_train=..., x_test=..., "
           "y_test=...) (uint8 images)")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of an .npz file. A file that is not one (truncated, a renamed
    .npy, other bytes) is a ValueError that names the file, not numpy's own error."""
    damaged = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
    try:
        f = np.load(path)
    except damaged as e:
        raise ValueError(f"--dataset=npz:{path} is damaged or truncated ({e}): copy it "
                         f"again, or {NPZ_HOW}.") from e
    except ValueError as e:  # numpy found neither an .npz nor an .npy ("pickled data")
        raise ValueError(f"--dataset=npz:{path} is not an .npz file: {NPZ_HOW}.") from e
    if not isinstance(f, np.lib.npyio.NpzFile):  # an .npy file: np.load gave an array
        raise ValueError(f"--dataset=npz:{path} holds a single .npy array, not an .npz "
                         f"of {', '.join(NPZ_ARRAYS)}: {NPZ_HOW}.")
    with f:
        missing = set(NPZ_ARRAYS) - set(f.files)
        if missing:
            raise ValueError(f"--dataset=npz:{path} lacks the arrays {sorted(missing)} "
                             f"(needs {', '.join(NPZ_ARRAYS)}).")
        try:
            return {k: f[k] for k in NPZ_ARRAYS}
        except (*damaged, ValueError) as e:  # a damaged member
            raise ValueError(f"--dataset=npz:{path} is damaged ({type(e).__name__}: {e}): "
                             "copy it again.") from e


# Every .npz this process read, for the provenance of what it writes
# (``outputs.environment``: each file's SHA-256).
FILES_READ: list[str] = []


def load_npz(path: str, name: str | None = None) -> ArrayDataset:
    """Arrays ``x_train, y_train, x_test, y_test`` (uint8 images) from one ``.npz`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset=npz:{path}: no such file.")
    if path not in FILES_READ:
        FILES_READ.append(path)
    arrays = _read_npz(path)
    split = {}
    for part in ("train", "test"):
        images = _as_images(arrays[f"x_{part}"], f"--dataset=npz:{path} x_{part}")
        labels = arrays[f"y_{part}"].astype(np.int32).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"--dataset=npz:{path}: x_{part} holds {len(images)} images "
                             f"and y_{part} {len(labels)} labels.")
        split[part] = images, labels
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    return ArrayDataset(
        name=name or os.path.splitext(os.path.basename(path))[0],
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return _as_images(images), labels


PREPARE_EXTRA = 'pip install "hflows_jax[prepare]"'


def _prepare_command(name: str) -> str:
    return (f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir=DIR).download_and_prepare(file_format='array_record')\"")


def _not_prepared(name: str, where: str, why: str) -> FileNotFoundError:
    """The one error for "not prepared here, and it cannot be prepared here"."""
    return FileNotFoundError(
        f"The tfds dataset {name!r} is not prepared in {where} and {why}.\n"
        f"On a machine with internet access and TensorFlow (the prepare extra: "
        f"{PREPARE_EXTRA}) prepare it with\n{_prepare_command(name)}\n"
        f"then copy DIR here and pass --data_dir=DIR, or use local arrays with "
        f"--dataset=npz:PATH.")


def _require_prepare_packages(name: str, where: str) -> None:
    """tfds prepares mnist/cifar with TensorFlow, and imports importlib_resources lazily
    (not a tfds dependency): both come with the ``prepare`` extra."""
    try:
        import importlib_resources  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise FileNotFoundError(
            f"The tfds dataset {name!r} is not prepared in {where}, and preparing it "
            f"needs TensorFlow and importlib_resources ({e}).\n"
            f"Install them with {PREPARE_EXTRA} (in a checkout: pip install -e "
            f"\".[prepare]\"), or prepare the dataset on another "
            f"machine and pass --data_dir=DIR, or use local arrays with "
            f"--dataset=npz:PATH.") from e


def _check_reachable(builder, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, without a network: tfds retries a failed download
    ten times with backoff (about 3.5 minutes). Skipped behind a proxy, which only
    tfds's own request can test."""
    if urllib.request.getproxies():
        return
    hosts = {urllib.parse.urlsplit(url) for url in (builder.url_infos or {})}
    for host in sorted({(u.hostname, u.port or (443 if u.scheme == "https" else 80))
                        for u in hosts if u.hostname}):
        try:
            socket.create_connection(host, timeout=timeout).close()
        except OSError as e:
            raise ConnectionError(f"cannot reach {host[0]}: {e}") from e


def _download_errors() -> tuple[type[BaseException], ...]:
    import requests
    from tensorflow_datasets.core.download.util import DownloadError
    return (ConnectionError, TimeoutError, socket.gaierror,
            requests.exceptions.RequestException, DownloadError)


def _download_and_prepare(builder, name: str) -> None:
    where = os.fspath(builder.data_dir_root)
    _require_prepare_packages(name, where)
    try:
        _check_reachable(builder)  # first, so that an offline run does not announce a download
        print(f"Downloading and preparing the tfds dataset {name!r} (first use) as "
              f"array_record in {os.fspath(builder.data_dir)}", flush=True)
        builder.download_and_prepare(file_format="array_record")
    except _download_errors() as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise _not_prepared(
            name, where, f"could not be downloaded; no network access? "
            f"({type(e).__name__}: {reason})") from e


def _data_source(tfds, name: str, data_dir: str | None):
    return tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                            download=False)


def load_tfds(name: str, data_dir: str | None = None) -> ArrayDataset:
    """A tfds dataset, read through ``tfds.data_source`` without TensorFlow; downloaded
    and prepared as array_record into ``data_dir`` first if it is not there yet."""
    import tensorflow_datasets as tfds

    try:
        splits = _data_source(tfds, name, data_dir)
    except (NotImplementedError, FileNotFoundError, KeyError) as e:
        # What tfds raises when the dataset is not prepared (an empty data_dir is taken
        # for tfrecord: NotImplementedError; the default data_dir gives a builder without
        # splits: KeyError) or not as array_record, which random access needs; any other
        # error is not ours to rename.
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared() and isinstance(e, KeyError):
            raise
        if builder.is_prepared():  # prepared, but in a format without random access
            raise FileNotFoundError(
                f"The tfds dataset {name!r} is prepared in {builder.data_dir} but not as "
                f"array_record, which random access needs.\nPrepare it as array_record "
                f"into another directory DIR with\n{_prepare_command(name)}\n"
                f"(or let hflows_jax do it: pass an empty --data_dir=DIR), or use local "
                f"arrays with --dataset=npz:PATH.") from e
        _download_and_prepare(builder, name)
        splits = _data_source(tfds, name, data_dir)
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
