"""Tests run on CPU with one device. tests/multidevice runs in a child process with two
forced host devices (see test_multidevice.py): XLA:CPU collectives in one long-lived
process with forced devices can stall on a loaded 2-core machine."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs in the tests rebuild the same step functions many times: cache their compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "hflows_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

collect_ignore = [] if os.environ.get("HFLOWS_JAX_MULTIDEVICE") else ["multidevice"]

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> pathlib.Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: CI places ../shared beside the checkout.")
    return path


@pytest.fixture
def mnist_npz() -> pathlib.Path:
    return shared_file("mnist.npz")


@pytest.fixture
def cifar_npz() -> pathlib.Path:
    return shared_file("cifar10_5k.npz")

