"""Small models and data shared by the tests."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hflows_jax.structured import LatencyTable


class TinyConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(x)


def mlp_params(key, sizes=(6, 8, 3)):
    """A dict MLP: kernels are prunable, biases are not."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {"kernel": jax.random.normal(sub, (n_in, n_out)) / jnp.sqrt(n_in),
                               "bias": jnp.zeros((n_out,))}
    return params


def mlp_apply(params, x):
    layers = [params[k] for k in sorted(params)]
    for i, layer in enumerate(layers):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            x = jnp.tanh(x)
    return x


def classification_batch(key, n=32, features=6, classes=3):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, features))
    y = jax.random.randint(ky, (n,), 0, classes)
    return x, y


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def subset_npz(source: pathlib.Path, target: pathlib.Path, train: int, test: int) -> str:
    """The first images of a shared .npz, saved as a small one; returns its --dataset."""
    with np.load(source) as f:
        arrays = dict(x_train=f["x_train"][:train], y_train=f["y_train"][:train],
                      x_test=f["x_test"][:test], y_test=f["y_test"][:test])
    np.savez(target, **arrays)
    return f"npz:{target}"


def interrupt_after_epoch(monkeypatch, epoch: int):
    """Make the run stop with Ctrl-C right after its checkpoint of ``epoch`` is on disk,
    as an interrupted process would. Returns ``resume()``, which saves as before."""
    from hflows_jax.training.checkpoint import Checkpoints

    original_save = Checkpoints.save

    def crash(self, at, state, record):
        original_save(self, at, state, record)
        if at == epoch:
            self._manager.wait_until_finished()
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(Checkpoints, "save", crash)
    return lambda: monkeypatch.setattr(Checkpoints, "save", original_save)


def host_devices_xla_flags(n: int) -> str:
    """XLA_FLAGS for ``n`` simulated CPU devices, each computing on its own thread.

    With XLA:CPU's multi-threaded Eigen pool shared by the simulated devices, a
    collective can wait on a device whose work is queued behind it: one CI run of the
    2-device notebook died after 40 s in an all-reduce rendezvous ("only 1 of 2 threads
    arrived"). Single-threaded Eigen per device is what JAX's authors advise for
    simulated devices (jax-ml/jax#823) and removed such hangs elsewhere (PyAutoFit#1528).
    """
    return f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false"


def macs_latency_table(groups):
    """A table whose seconds are each layer's multiply-adds (1 ns each) on a grid of 0,
    half and all of every group: deterministic, unlike a measured one."""
    points = {g: (0, n // 2, n) for g, n in groups.sizes.items()}
    layers = []
    for unit, read, written in groups.layers:
        names = tuple(dict.fromkeys(read + written))
        grid = np.zeros([3] * len(names))
        for index in np.ndindex(*grid.shape):
            counts = dict(zip(names, (points[g][i] for g, i in zip(names, index))))
            grid[index] = 1e-9 * unit * np.prod([counts[g] for g in read + written])
        layers.append((names, grid))
    return LatencyTable(1, points, tuple(layers), rest_s=1e-5, scale=1.0, machine="macs")
