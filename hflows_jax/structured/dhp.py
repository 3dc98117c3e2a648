"""DHP's pieces (Li et al., ofsoundof/dhp; METHOD.md section 9): hypernetwork convs, the
proximal L1 step on their latent vectors, and the channel masks the latents give.

Each conv owns a latent vector ``z_out`` (one entry per output channel, N(0, 1)) and reads
the latent of the layer before it, ``z_in``. A small hypernetwork of embedding size E = 8
turns the pair into the kernel::

    A = outer(z_in, z_out) + b0              # (c_in, c_out)
    B = A[..., None] * w1 + b1               # (c_in, c_out, E)
    K = (w2 @ B[..., None])[..., 0] + b2     # (c_in, c_out, kh * kw)

so a latent entry near zero switches its whole channel off, in this conv's outputs and the
next conv's inputs. A proximal L1 step after every weight step drives latents to exactly
zero; a channel is kept while ``|z| >= min(threshold, k-th largest |z|)`` (k = min_channels).
Not yet a method in the registry: the DHP model (a VGG/ResNet built of these convs), its
FLOP-target stop and its finalization come next.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any
EMBEDDING = 8
THRESHOLD = 5e-3  # |z| below this: the channel is pruned
MIN_CHANNELS = 4  # mc: every layer keeps at least this many channels
LATENT = "latent"  # the param name of a HyperConv's latent vector


def hyper_kernel(z_in: jax.Array, z_out: jax.Array, b0, w1, b1, w2, b2,
                 kernel_size: tuple[int, int]) -> jax.Array:
    """The conv kernel (kh, kw, c_in, c_out) the hypernetwork makes of two latents."""
    a = jnp.outer(z_in, z_out) + b0
    b = a[..., None] * w1 + b1
    k = jnp.einsum("iote,ioe->iot", w2, b) + b2
    return jnp.transpose(k, (2, 0, 1)).reshape(*kernel_size, *a.shape)


class HyperConv(nn.Module):
    """A conv whose kernel a hypernetwork generates from ``z_in`` and its own latent.

    ``__call__(x, z_in) -> (y, z_out)``: pass ``z_out`` to the next HyperConv. Init as in
    the official code: latent N(0, 1), w1 ~ U(+-sqrt(3)), w2 ~ U(+-sqrt(3 / (E c_in kh kw))),
    biases 0.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int = 1
    padding: str = "SAME"
    embedding: int = EMBEDDING

    @nn.compact
    def __call__(self, x: jax.Array, z_in: jax.Array) -> tuple[jax.Array, jax.Array]:
        c_in, c_out, e = x.shape[-1], self.features, self.embedding
        taps = math.prod(self.kernel_size)
        z_out = self.param(LATENT, nn.initializers.normal(1.0), (c_out,))

        def uniform(bound):
            return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)

        zeros = nn.initializers.zeros
        b0 = self.param("b0", zeros, (c_in, c_out))
        w1 = self.param("w1", uniform(math.sqrt(3.0)), (c_in, c_out, e))
        b1 = self.param("b1", zeros, (c_in, c_out, e))
        w2 = self.param("w2", uniform(math.sqrt(3.0 / (e * c_in * taps))),
                        (c_in, c_out, taps, e))
        b2 = self.param("b2", zeros, (c_in, c_out, taps))
        kernel = hyper_kernel(z_in, z_out, b0, w1, b1, w2, b2, self.kernel_size)
        y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (self.strides,) * 2,
                                     self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y, z_out


def _is_latent(path) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == LATENT


def _shrinks(z: jax.Array, threshold: float, min_channels: int) -> jax.Array:
    """Whether a latent may shrink: more than ``min_channels`` entries above threshold."""
    return jnp.sum(jnp.abs(z) > threshold) > min_channels


class ProximalL1State(NamedTuple):
    count: jax.Array  # int32: steps taken, for the learning-rate schedule


def proximal_l1(learning_rate: float | optax.Schedule, reg: float = 1e-4,
                threshold: float = THRESHOLD,
                min_channels: int = MIN_CHANNELS) -> optax.GradientTransformationExtraArgs:
    """DHP's proximal L1 step on every latent, as the last link of a chain.

    It receives the chain's final updates ``u`` and returns ``prox(z + u) - z`` on latent
    leaves (params named ``"latent"``), so that ``optax.apply_updates`` lands each latent on
    ``sign(v) * max(|v| - reg * lr, 0)`` with ``v = z + u``, while that latent has more than
    ``min_channels`` entries above ``threshold`` (official code). Other leaves pass
    through. ``learning_rate`` is the weight optimizer's, so the shrink is ``reg * lr``.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        del params
        return ProximalL1State(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("proximal_l1 needs params: call update(updates, state, params).")
        shrink = reg * schedule(state.count)

        def step(path, u, z):
            if not _is_latent(path):
                return u
            v = z + u
            proximal = jnp.sign(v) * jnp.maximum(jnp.abs(v) - shrink, 0.0)
            return jnp.where(_shrinks(z, threshold, min_channels), proximal, v) - z

        return (jax.tree.map_with_path(step, updates, params),
                ProximalL1State(optax.safe_increment(state.count)))

    return optax.GradientTransformationExtraArgs(init, update)


def latent_masks(params: PyTree, threshold: float = THRESHOLD,
                 min_channels: int = MIN_CHANNELS) -> PyTree:
    """Per latent, the channels kept: ``|z| >= min(threshold, k-th largest |z|)``, so at
    least ``min_channels`` stay; None on the other leaves."""
    def mask(path, z):
        if not _is_latent(path):
            return None
        k = min(min_channels, z.shape[-1])
        kth = jnp.sort(jnp.abs(z))[-k]
        return jnp.abs(z) >= jnp.minimum(threshold, kth)
    return jax.tree.map_with_path(mask, params)
