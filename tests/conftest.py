"""Tests run on CPU with two forced host devices, so pmap paths are exercised in-process."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
