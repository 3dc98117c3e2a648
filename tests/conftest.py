"""Tests run on CPU with two forced host devices, so pmap paths are exercised in-process."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs in the tests rebuild the same step functions many times: cache their compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "hflows_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def mnist_npz() -> pathlib.Path:
    path = SHARED_DATA / "mnist.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing: CI places ../shared beside the checkout.")
    return path


@pytest.fixture
def cifar_npz() -> pathlib.Path:
    path = SHARED_DATA / "cifar10_5k.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing: CI places ../shared beside the checkout.")
    return path
