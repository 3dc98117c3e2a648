"""Runs tests/multidevice in a child process with two forced host devices."""

import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import host_devices_xla_flags


@pytest.mark.slow
def test_multidevice_suite_on_two_host_devices():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, HFLOWS_JAX_MULTIDEVICE="1",
               XLA_FLAGS=host_devices_xla_flags(2))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/multidevice"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
