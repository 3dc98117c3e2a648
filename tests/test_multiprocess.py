"""Multi-process runs on localhost: two processes, one CPU device each, joined through
``--coordinator_address`` (gloo collectives), against one process with two devices.

Every run is a child process with a time limit; the one-process run is the reference.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import host_devices_xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT_S = 240


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> pathlib.Path:
    """64 training and 24 test images whose class sets a bright row: learnable in a few steps."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, 12, 12, 1))
        x[np.arange(n), 2 + 2 * y] += 150
        return x.astype(np.uint8), y.astype(np.int32)

    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    (x_train, y_train), (x_test, y_test) = split(64), split(24)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def command(npz: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.mnist", f"--dataset=npz:{npz}",
            "--model=lenet300", "--width=0.25", "--batch_size=16", "--dense_epochs=1",
            "--pruning_epochs=3", "--regrowth_epochs=1", "--target_sparsity=0.8",
            "--presence_lr=0.2", "--pressure_updates_per_epoch=2", "--augment=true",
            f"--workdir={workdir}", *extra]


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=host_devices_xla_flags(devices))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(npz, workdir, port) -> list[subprocess.Popen]:
    return [subprocess.Popen(
        command(npz, workdir, f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", f"--process_id={i}"),
        cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=LIMIT_S)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def final_state(workdir: pathlib.Path) -> dict:
    """The last pruning checkpoint's arrays, read as NumPy whatever devices wrote them."""
    directory = workdir / "checkpoints" / "pruning"
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    path = directory / str(step) / "state"
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    got, want = (json.loads((w / "report.json").read_text()) for w in (workdir, reference))
    for key in ("test_accuracy", "sparsity", "params_remaining"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    for field in ("loss", "train_accuracy", "sparsity", "pressure"):
        np.testing.assert_allclose([r[field] for r in got["history"]],
                                   [r[field] for r in want["history"]],
                                   rtol=2e-4, atol=1e-5, err_msg=field)
    a, b = final_state(workdir), final_state(reference)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def one_process(tiny_npz, tmp_path_factory) -> tuple[pathlib.Path, float]:
    """The reference: one process, two devices, the same global batch of 16."""
    workdir = tmp_path_factory.mktemp("one_process")
    started = time.time()
    result = subprocess.run(command(tiny_npz, workdir), cwd=ROOT, env=env(2), text=True,
                            capture_output=True, timeout=LIMIT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["processes"] == 1 and len(report["devices"]) == 2
    assert 0.5 < report["sparsity"] < 0.9, report["sparsity"]  # it did prune
    return workdir, time.time() - started


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices(tiny_npz, one_process, tmp_path):
    reference, one_s = one_process
    started = time.time()
    outs = finish(start_two_processes(tiny_npz, tmp_path, free_port()))
    print(f"one process, 2 devices: {one_s:.1f} s; two processes, 1 device each: "
          f"{time.time() - started:.1f} s")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2 and len(report["devices"]) == 2
    assert_same_run(tmp_path, reference)
    # Process 0 alone logs the epochs and writes the run's files.
    assert "pruning epoch" in outs[0] and "pruning epoch" not in outs[1]
    assert "2 devices" in outs[0] and "in 2 process(es)" in outs[0]


@pytest.mark.slow
def test_two_processes_killed_mid_run_resume_to_the_same_result(tiny_npz, one_process,
                                                                tmp_path):
    procs = start_two_processes(tiny_npz, tmp_path, free_port())
    pruning = tmp_path / "checkpoints" / "pruning"
    deadline = time.time() + LIMIT_S
    # Kill both once the first pruning checkpoint is committed (orbax renames its
    # temporary directory to the epoch number): the run is inside its pruning phase.
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if pruning.exists() and any(p.name.isdigit() for p in pruning.iterdir()):
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (tmp_path / "report.json").exists()
    outs = finish(start_two_processes(tiny_npz, tmp_path, free_port()))
    assert "Resuming pruning after epoch" in outs[0], outs[0][-3000:]
    assert_same_run(tmp_path, one_process[0])
