"""First use of a tfds dataset: download and prepare as array_record, without a network.

The download is fed from local files the way tfds's own DatasetBuilderTestCase feeds
dummy data: ``DownloadManager.download_and_extract`` returns a directory laid out like
the extracted archive (here a tiny CIFAR-10 in its binary format). Preparing imports
TensorFlow, so that test runs in a child process and this one stays free of it.
"""

import importlib.abc
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from experiments import cifar
from hflows_jax import data
from hflows_jax.data import sources
from hflows_jax.training import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_cifar10_archive(root: pathlib.Path, per_file: int = 3, seed: int = 0):
    """``root/cifar-10-batches-bin/`` as in cifar-10-binary.tar.gz: records of one label
    byte and 3072 image bytes (channel-major 3x32x32), five train files, one test file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
             "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    arrays = {}
    for file in CIFAR10_FILES:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        (folder / file).write_bytes(b"".join(
            bytes([label]) + image.transpose(2, 0, 1).tobytes()
            for label, image in zip(labels, images)))
        arrays[file] = (images, labels.astype(np.int32))
    train = [arrays[f] for f in CIFAR10_FILES[:5]]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            *arrays["test_batch.bin"])


def sorted_examples(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Each example as label + pixels, sorted: equal iff the same examples (any order)."""
    return sorted(int(y).to_bytes(2, "little") + x.tobytes() for x, y in zip(images, labels))


class _Uninstalled(importlib.abc.MetaPathFinder):
    """Wraps an import finder so that it finds no top-level module in ``names``: then
    ``import`` fails and ``importlib.util.find_spec`` says None, as when they are not
    installed (``sys.modules[name] = None`` instead reads as "already imported")."""

    def __init__(self, finder, names):
        self.finder, self.names = finder, names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return None
        return self.finder.find_spec(fullname, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


def _child(data_dir: str, out: str, archive: str = "", uninstalled: str = "") -> None:
    """Runs in a child process: load cifar10 twice from ``data_dir`` (the download fed
    from ``archive``, at most once) with ``uninstalled`` modules unimportable, and save
    the arrays, or the error, to ``out``."""
    names = [n for n in uninstalled.split(",") if n]
    assert not set(names) & set(sys.modules), f"{names} imported before the test"
    sys.meta_path[:] = [_Uninstalled(finder, names) for finder in sys.meta_path]
    calls = []

    def download_and_extract(self, url_or_urls):
        calls.append(url_or_urls)
        if len(calls) > 1 or not archive:
            raise AssertionError(f"tried to download {url_or_urls} (call {len(calls)})")
        return archive

    download_manager.DownloadManager.download_and_extract = download_and_extract
    sources._check_reachable = lambda builder: None  # tested on its own below
    try:
        loads = [data.load_dataset("cifar10", data_dir=data_dir) for _ in range(2)]
    except Exception as e:  # noqa: BLE001  (the parent checks the error)
        np.savez(out, error_type=type(e).__name__, error=str(e), calls=np.asarray(calls))
        return
    arrays = {f"{k}_{i}": getattr(ds, k) for i, ds in enumerate(loads)
              for k in ("x_train", "y_train", "x_test", "y_test", "num_classes")}
    np.savez(out, calls=np.asarray(calls), **arrays)


def run_child(tmp_path: pathlib.Path, data_dir: pathlib.Path, archive: str = "",
              uninstalled: str = ""):
    """``_child`` in a fresh interpreter: TensorFlow (which preparing imports) stays out
    of the test process, and modules can be made unimportable for real."""
    out = tmp_path / f"child_{len(list(tmp_path.glob('child_*')))}.npz"
    code = "import sys; from tests.test_tfds_prepare import _child; _child(*sys.argv[1:])"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", code, str(data_dir), str(out), archive, uninstalled],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(out) as f:
        return result.stdout, {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny CIFAR-10 prepared on first use from local files (once for this module)."""
    pytest.importorskip("tensorflow", reason="preparing needs the prepare extra")
    pytest.importorskip("importlib_resources", reason="preparing needs the prepare extra")
    tmp_path = tmp_path_factory.mktemp("prepared")
    generated = write_cifar10_archive(tmp_path / "extracted")
    data_dir = tmp_path / "tfds"
    stdout, loaded = run_child(tmp_path, data_dir, archive=str(tmp_path / "extracted"))
    return tmp_path, data_dir, generated, stdout, loaded


def assert_loaded(loaded: dict, generated, run: int) -> None:
    x_train, y_train, x_test, y_test = generated
    xs, ys = loaded[f"x_train_{run}"], loaded[f"y_train_{run}"]
    xt, yt = loaded[f"x_test_{run}"], loaded[f"y_test_{run}"]
    assert xs.dtype == xt.dtype == np.uint8
    assert xs.shape == (15, 32, 32, 3) and xt.shape == (3, 32, 32, 3)
    assert sorted_examples(xs, ys) == sorted_examples(x_train, y_train)
    assert sorted_examples(xt, yt) == sorted_examples(x_test, y_test)
    assert int(loaded[f"num_classes_{run}"]) == 10


@pytest.mark.slow
def test_first_use_prepares_then_reads_prepared_data(prepared):
    _, data_dir, generated, stdout, loaded = prepared
    assert "error" not in loaded, loaded.get("error")
    announced = [line for line in stdout.splitlines()
                 if line.startswith("Downloading and preparing the tfds dataset")]
    assert announced == [f"Downloading and preparing the tfds dataset 'cifar10' (first use) "
                         f"as array_record in {data_dir}/cifar10/3.0.2"], stdout
    # Downloaded once: the second load read the prepared files.
    assert list(loaded["calls"]) == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert list(data_dir.glob("cifar10/3.0.2/cifar10-train.array_record*"))
    for run in (0, 1):
        assert_loaded(loaded, generated, run)


@pytest.mark.slow
def test_prepared_data_is_read_without_tensorflow(prepared):
    tmp_path, data_dir, generated, _, _ = prepared
    _, loaded = run_child(tmp_path, data_dir, uninstalled="tensorflow")
    assert "error" not in loaded, loaded.get("error")
    assert list(loaded["calls"]) == []
    assert_loaded(loaded, generated, 0)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["tensorflow", "importlib_resources"])
def test_without_tensorflow_the_error_names_the_prepare_extra(tmp_path, module):
    _, loaded = run_child(tmp_path, tmp_path / "tfds", uninstalled=module)
    assert str(loaded["error_type"]) == "FileNotFoundError" and list(loaded["calls"]) == []
    message = str(loaded["error"])
    assert message.startswith(f"The tfds dataset 'cifar10' is not prepared in "
                              f"{tmp_path / 'tfds'}, and preparing it needs TensorFlow and "
                              f"importlib_resources (No module named '{module}')."), message
    assert 'pip install "hflows_jax[prepare]"' in message
    assert 'pip install -e ".[prepare]"' in message
    assert "--data_dir=DIR" in message and "--dataset=npz:PATH" in message


def _no_download(self, url_or_urls):
    raise AssertionError(f"tried to download {url_or_urls}")


def _assert_offline_message(message: str, data_dir: pathlib.Path) -> None:
    assert message.startswith(f"The tfds dataset 'cifar10' is not prepared in {data_dir} "
                              "and could not be downloaded; no network access?")
    assert ("tfds.builder('cifar10', data_dir=DIR)"
            ".download_and_prepare(file_format='array_record')") in message
    assert 'pip install "hflows_jax[prepare]"' in message
    assert "--data_dir=DIR" in message and "--dataset=npz:PATH" in message
    assert len(message.splitlines()) == 4 and len(message) < 800, message


def test_offline_download_fails_with_instructions(tmp_path, monkeypatch):
    """tfds's own failure without a network, after its retries: a requests error."""
    def offline(self, url_or_urls):
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded "
            "with url: /~kriz/cifar-10-binary.tar.gz (Caused by NameResolutionError("
            + "x" * 500 + "))")

    monkeypatch.setattr(sources, "_require_prepare_packages", lambda name, where: None)
    monkeypatch.setattr(sources, "_check_reachable", lambda builder: None)
    monkeypatch.setattr(download_manager.DownloadManager, "download_and_extract", offline)
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    _assert_offline_message(str(error.value), tmp_path)
    assert "ConnectionError: HTTPSConnectionPool(host='www.cs.toronto.edu'" in str(error.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-prepared


def test_unreachable_host_fails_in_seconds_before_downloading(tmp_path, monkeypatch):
    """Without this check tfds retries ten times with backoff: about 3.5 minutes."""
    def unreachable(address, timeout=None):
        assert address == ("www.cs.toronto.edu", 443) and timeout
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(sources, "_require_prepare_packages", lambda name, where: None)
    monkeypatch.setattr(sources.urllib.request, "getproxies", lambda: {})
    monkeypatch.setattr(sources.socket, "create_connection", unreachable)
    monkeypatch.setattr(download_manager.DownloadManager, "download_and_extract",
                        _no_download)
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    _assert_offline_message(str(error.value), tmp_path)
    assert "cannot reach www.cs.toronto.edu" in str(error.value)


def test_default_data_dir_offline_fails_with_instructions(tmp_path, monkeypatch, capsys):
    """No --data_dir and an empty default tfds directory: tfds's data_source then fails
    with a KeyError ("splits is empty"), not as with an explicit --data_dir."""
    def unreachable(builder):
        raise ConnectionError("cannot reach www.cs.toronto.edu: [Errno 101] Network is "
                              "unreachable")

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "_require_prepare_packages", lambda name, where: None)
    monkeypatch.setattr(sources, "_check_reachable", unreachable)
    monkeypatch.setattr(download_manager.DownloadManager, "download_and_extract",
                        _no_download)
    with pytest.raises(SystemExit) as exit:
        cli.exit_on_user_errors(lambda: cifar.main([f"--workdir={tmp_path / 'run'}"]))
    message = str(exit.value.code)
    assert message.startswith("error: ")
    _assert_offline_message(message[len("error: "):], tmp_path)
    out, err = capsys.readouterr()
    assert "KeyError" not in message + err and "Downloading" not in out


def test_prepared_without_random_access_is_not_prepared_again(tmp_path, monkeypatch):
    """A tfrecord preparation in data_dir: tfds would reuse it rather than write
    array_record, so say so instead of trying."""
    def tfrecord_only(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format "
                                  "FileFormat.TFRECORD is not supported.")

    monkeypatch.setattr(tfds, "data_source", tfrecord_only)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(sources, "_download_and_prepare", _no_download)
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    assert str(error.value).startswith(
        f"The tfds dataset 'mnist' is prepared in {tmp_path}/mnist/3.0.1 but not as "
        "array_record, which random access needs.\nPrepare it as array_record into another "
        "directory DIR with\n  python -c \"import tensorflow_datasets as tfds; "
        "tfds.builder('mnist', data_dir=DIR).download_and_prepare(file_format='array_record')"
        "\"\n")
