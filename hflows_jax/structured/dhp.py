"""DHP's pieces (Li et al., ofsoundof/dhp; METHOD.md section 9): hypernetwork convs, the
proximal L1 step on their latent vectors, and the channel masks the latents give.

Each conv owns a latent vector ``z_out`` (one entry per output channel, N(0, 1)) and reads
the latent of the layer before it, ``z_in``. A small hypernetwork of embedding size E = 8
turns the pair into the kernel::

    A = outer(z_in, z_out) + b0              # (c_in, c_out)
    B = A[..., None] * w1 + b1               # (c_in, c_out, E)
    K = (w2 @ B[..., None])[..., 0] + b2     # (c_in, c_out, kh * kw)

so a latent entry near zero leaves its channel little but what the biases make, in this
conv's outputs and the next conv's inputs. A proximal L1 step after every weight step
drives latents to exactly zero; a channel is kept while ``|z| >= min(threshold, k-th
largest |z|)`` (k = min_channels). As in the official search, the forward pass uses the
latents as they are, never masked (``resnet_dhp_share.py``: the masked variant was
dropped): a latent at zero still gets a gradient, and comes back when that outweighs the
shrink. The channels are cut when the search ends: ``plain_variables`` builds the pruned
plain VGG (DHP's ``reset_after_searching``).

``DHPVGG`` is the VGG with these convs (a subclass replacing its ``conv_layer``); ``dhp``
is the search as an optax transformation (the proximal step, the masks, and the stop at a
FLOP target); ``plain_variables`` turns the result into the plain VGG's weights, for the
fine-tune and ``hf.export``. The registry's ``--method=dhp`` puts them together.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from hflows_jax import masking
from hflows_jax.models import VGG
from hflows_jax.models.vgg import vgg_fields
from hflows_jax.structured.channels import ChannelGroups, keep_at_least, path_of

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
    """Whether a latent may shrink: more than ``min_channels`` entries at or above the
    threshold (``proximal_operator`` in the official code)."""
    return jnp.sum(jnp.abs(z) >= threshold) > min_channels


class ProximalL1State(NamedTuple):
    count: jax.Array  # int32: steps taken, for the learning-rate schedule


def proximal_l1(learning_rate: float | optax.Schedule, reg: float = 1e-4,
                threshold: float = THRESHOLD,
                min_channels: int = MIN_CHANNELS) -> optax.GradientTransformationExtraArgs:
    """DHP's proximal L1 step on every latent, as the last link of a chain.

    It receives the chain's final updates ``u`` and returns ``prox(z + u) - z`` on latent
    leaves (params named ``"latent"``), so that ``optax.apply_updates`` lands each latent on
    ``sign(v) * max(|v| - reg * lr, 0)`` with ``v = z + u``, while that latent has more than
    ``min_channels`` entries at or above ``threshold`` (official code). Other leaves pass
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
        return keep_at_least(jnp.abs(z), threshold, min_channels) if _is_latent(path) else None
    return jax.tree.map_with_path(mask, params)


class DHPVGG(VGG):
    """The VGG with every conv a ``HyperConv``: its ``conv_layer`` replaced, its layer loop
    carrying the latent from conv to conv (ones for the image's channels).

    Nothing is masked, as in DHP's search: a channel whose latent entry is 0 still outputs
    what its hypernetwork's biases make. ``plain_variables`` cuts the pruned channels.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        x, _ = self.backbone(x, train, jnp.ones(x.shape[-1], jnp.float32))
        return self.classifier(x)

    def conv_layer(self, x, features: int, norm, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, z = HyperConv(features)(x, z)
        return nn.relu(norm()(y)), z

    @property
    def base(self) -> VGG:
        """The plain VGG of the same layers: the network ``plain_variables`` gives weights."""
        return VGG(**vgg_fields(self))


def to_dhp(model: nn.Module) -> DHPVGG:
    """The DHP network of a ``hflows_jax.models`` model (VGG only, so far)."""
    if not isinstance(model, VGG):
        raise ValueError(f"dhp builds on vgg19 only, got {type(model).__name__}: its "
                         "hypernetwork model chains one latent from conv to conv.")
    return DHPVGG(**vgg_fields(model))


def plain_name(latent_path: str) -> str:
    """``"HyperConv_3/latent"`` -> ``"Conv_3"``: the plain VGG's layer, and channel group."""
    return latent_path.removesuffix(f"/{LATENT}").replace("HyperConv_", "Conv_")


def plain_variables(model: DHPVGG, params: PyTree, batch_stats: PyTree,
                    kept: dict | None = None) -> tuple[VGG, PyTree, PyTree]:
    """``(model.base, params, batch_stats)``: the plain VGG of ``model`` with the channels
    not ``kept`` cut (plain group ``"Conv_i"`` -> bool per channel, the search's
    ``channel_masks``; default: those whose latent entry is 0), as DHP's
    ``reset_after_searching`` slices them away. Pass the search's ``kept``: its floor keeps
    a layer's ``min_channels`` even where their latents reached 0.

    Every kernel is generated by its hypernetwork from the latents; a cut channel gets a
    zero filter, BatchNorm scale, shift and running mean, and zero rows in the layer after
    it (conv or classifier), so it is exactly 0 and read by nothing; ``hf.export`` then
    removes it. With no latent at 0 the plain VGG computes what ``model`` does. The
    hypernetworks are gone.
    """
    params, batch_stats = masking.unwrap_nnx(params), masking.unwrap_nnx(batch_stats)
    out, stats = {}, dict(batch_stats)
    z_in = on_in = None
    for i in range(sum(1 for name in params if name.startswith("HyperConv_"))):
        h, norm = params[f"HyperConv_{i}"], f"BatchNorm_{i}"
        z = h[LATENT]
        c_in, taps = h["w2"].shape[0], h["w2"].shape[2]
        if z_in is None:
            z_in = on_in = jnp.ones(c_in, jnp.float32)
        size = math.isqrt(taps)
        kernel = hyper_kernel(z_in, z, h["b0"], h["w1"], h["b1"], h["w2"], h["b2"],
                              (size, size))
        on = (z != 0) if kept is None else jnp.asarray(kept[f"Conv_{i}"], bool)
        out[f"Conv_{i}"] = {"kernel": kernel * on_in[:, None] * on}
        out[norm] = {k: v * on for k, v in params[norm].items()}
        stats[norm] = {**batch_stats[norm], "mean": batch_stats[norm]["mean"] * on}
        z_in, on_in = z, on
    dense = params["Dense_0"]
    out["Dense_0"] = {**dense, "kernel": dense["kernel"] * on_in[:, None]}
    return model.base, out, stats


class DHPState(NamedTuple):
    """The search's state: its masks are on the latents only (``None`` elsewhere). They
    say which channels the plain network loses (``hf.finalize`` zeroes those latents for
    ``plain_variables``); the search's forward pass does not apply them."""

    prox: ProximalL1State
    stopped: jax.Array  # bool: the FLOP target was reached; masks frozen, no more shrinking
    kept: dict  # plain channel group (``"Conv_3"``) -> bool per channel
    masks: PyTree  # bool on latent leaves, None elsewhere

    def pruning_masks(self) -> PyTree:
        return self.masks

    def channel_masks(self) -> dict:
        return self.kept


def dhp(groups: ChannelGroups, target: float, learning_rate: float | optax.Schedule,
        reg: float = 1e-4, threshold: float = THRESHOLD, min_channels: int = MIN_CHANNELS,
        margin: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """DHP's search, as the last link of a chain (after the weight optimizer).

    Every step: ``proximal_l1`` on the latents, then the channel masks of the latents it
    leaves (``latent_masks``), then the multiply-adds of the plain net they leave
    (``groups``: the plain VGG's, ``channel_groups(model.base, ...)``). Once at most
    ``1 - target + margin`` of them remain, the search stops: the masks freeze and the
    latents shrink no more. (DHP checks every 100 batches with a margin of 0.02 to 0.05; a
    check here costs a few vector ops.)

    Train on the params as they are, not on ``hf.apply_masks(params, state)``: the
    search's forward pass is unmasked, so that a latent at 0 can come back. The masks are
    for its end: ``plain_variables(model, hf.finalize(params, state), ...)`` is the
    pruned plain network, which DHP then fine-tunes.
    """
    if not isinstance(groups, ChannelGroups):
        raise ValueError("groups must be the plain model's hf.structured.channel_groups, got "
                         f"{type(groups).__name__}.")
    if not 0 < target < 1:
        raise ValueError(f"target (the fraction of multiply-adds removed) must lie in (0, 1), "
                         f"got {target!r}.")
    prox = proximal_l1(learning_rate, reg, threshold, min_channels)

    def channels(params):
        masks = latent_masks(params, threshold, min_channels)
        kept = {plain_name(path_of(p)): m
                for p, m in jax.tree.leaves_with_path(masks) if m is not None}
        missing = set(groups.sizes) - set(kept)
        if missing:
            raise ValueError(f"the channel groups {sorted(missing)} have no latent in params: "
                             "build the groups from the plain model of these DHP params.")
        return kept, masks

    def init(params):
        params = masking.unwrap_nnx(params)
        kept, masks = channels(params)
        return DHPState(prox.init(params), jnp.zeros((), bool), kept, masks)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("dhp needs params: call update(updates, state, params).")
        shrunk, prox_state = prox.update(updates, state.prox, params)
        updates = jax.tree.map(lambda plain, proximal: jnp.where(state.stopped, plain, proximal),
                               updates, shrunk)
        kept, masks = channels(optax.apply_updates(params, updates))
        freeze = lambda old, new: jnp.where(state.stopped, old, new)  # noqa: E731
        kept, masks = jax.tree.map(freeze, (state.kept, state.masks), (kept, masks))
        stopped = state.stopped | (groups.flops_fraction(kept) <= 1 - target + margin)
        return updates, DHPState(prox_state, stopped, kept, masks)

    return optax.GradientTransformationExtraArgs(init, update)
