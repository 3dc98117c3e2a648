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
plain network (DHP's ``reset_after_searching``).

``DHPVGG`` is the VGG with these convs (a subclass replacing its ``conv_layer``),
``DHPResNet`` the basic-block ResNet with them, latents shared per stage as in DHP's
``resnet_dhp_share.py``; ``dhp`` is the search as an optax transformation (the proximal
step, the masks, and the stop at a FLOP target); ``plain_variables`` turns the result into
the plain network's weights, for the fine-tune and ``hf.export``. The registry's
``--method=dhp`` puts them together.
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
from hflows_jax.models import VGG, ResNet, network_fields
from hflows_jax.models.norm import batch_norm
from hflows_jax.models.resnet import ResNetBlock, block_layout, last_norm
from hflows_jax.structured.channels import ChannelGroups, keep_at_least, path_of

PyTree = Any
EMBEDDING = 8
THRESHOLD = 5e-3  # |z| below this: the channel is pruned
MIN_CHANNELS = 4  # mc: every layer keeps at least this many channels
LATENT = "latent"  # the param name of a HyperConv's latent vector
WHOLE = "latent_whole"  # a latent DHP never prunes: its ResNets' last stage


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
    whole: bool = False  # its own latent is never pruned (named WHOLE, not LATENT)

    @nn.compact
    def __call__(self, x: jax.Array, z_in: jax.Array, z_out: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        c_in, c_out, e = x.shape[-1], self.features, self.embedding
        taps = math.prod(self.kernel_size)
        if z_out is None:  # its own latent; else one it shares (a ResNet stage's)
            z_out = self.param(WHOLE if self.whole else LATENT, nn.initializers.normal(1.0),
                               (c_out,))

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
        self.sow("intermediates", "kernel", kernel)  # for plain_variables
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

    stem = "HyperConv_0"  # the conv that reads the image

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
        return VGG(**network_fields(self, VGG))


class DHPBlock(nn.Module):
    """``ResNetBlock`` with HyperConvs, its layers named as the plain block's. The first
    conv has its own latent; the second conv and the projection write the stage's
    residual stream, whose one latent they share (``z_stage``; None: the first block of a
    stage makes it, in its second conv)."""

    filters: int
    norm: Any
    strides: int = 1
    zero_init_residual: bool = True
    whole: bool = False  # the stage's latent is never pruned (the last stage's)

    @nn.compact
    def __call__(self, x, z_in, z_stage):
        y, z = HyperConv(self.filters, strides=self.strides, name="Conv_0")(x, z_in)
        y = nn.relu(self.norm()(y))
        y, z_stage = HyperConv(self.filters, whole=self.whole, name="Conv_1")(y, z, z_stage)
        y = last_norm(self)(y)
        if x.shape != y.shape:
            x, _ = HyperConv(self.filters, (1, 1), self.strides, name="conv_proj")(
                x, z_in, z_stage)
            x = self.norm(name="norm_proj")(x)
        return nn.relu(x + y), z_stage


class DHPResNet(ResNet):
    """The CIFAR ResNet (basic blocks) with every conv a ``HyperConv``, latents shared as
    in DHP's ``resnet_dhp_share.py``: one per stage for its residual stream (the stem's
    output, every block's second conv and projection), one per block's first conv. As
    there, the last stage's latent (the classifier's input) is never pruned, and the
    image's channels are ones. Variables named as the plain ResNet's (``base``)."""

    stem = "conv_init"

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = batch_norm(train, self.dtype, self.axis_name, self.train_bn_scale)
        filters = max(1, int(self.num_filters * self.width))
        last = len(self.stage_sizes) - 1
        image = x.astype(self.dtype)
        y, z_stage = HyperConv(filters, whole=last == 0, name="conv_init")(
            image, jnp.ones(image.shape[-1], jnp.float32))
        x, z_in = nn.relu(norm(name="bn_init")(y)), z_stage
        for index, (stage, strides) in enumerate(block_layout(self.stage_sizes)):
            opens = strides != 1  # the first block of a later stage makes its latent
            x, z_stage = DHPBlock(
                filters * 2 ** stage, norm=norm, strides=strides,
                zero_init_residual=self.zero_init_residual, whole=stage == last,
                name=f"ResNetBlock_{index}")(x, z_in, None if opens else z_stage)
            z_in = z_stage
        return self.classifier(jnp.mean(x, axis=(1, 2)))

    @property
    def base(self) -> ResNet:
        return ResNet(**network_fields(self, ResNet))


def to_dhp(model: nn.Module) -> DHPVGG | DHPResNet:
    """The DHP network of a ``hflows_jax.models`` VGG or basic-block ResNet."""
    if isinstance(model, VGG):
        return DHPVGG(**network_fields(model, VGG))
    if isinstance(model, ResNet) and model.block_cls is ResNetBlock:
        return DHPResNet(**network_fields(model, ResNet))
    raise ValueError(f"dhp builds on vgg19 and basic-block ResNets (resnet18, resnet20), got "
                     f"{type(model).__name__}.")


def plain_name(path: str) -> str:
    """A HyperConv's path (``"HyperConv_3"``, ``"ResNetBlock_0/Conv_1"``) -> the plain
    network's layer it is (``"Conv_3"``, ``"ResNetBlock_0/Conv_1"``)."""
    return path.replace("HyperConv_", "Conv_")


def latent_groups(params: PyTree, groups: ChannelGroups) -> dict[str, str]:
    """Latent path -> the plain network's channel group its conv writes. Groups without
    one (a latent DHP never prunes, ``WHOLE``) keep every channel."""
    found = {}
    for path, _ in jax.tree.leaves_with_path(params):
        if _is_latent(path):
            layer = plain_name(path_of(path[:-1]))
            if not groups.writes.get(layer):
                raise ValueError(f"the channel groups have no layer {layer} for the latent "
                                 f"{path_of(path)}: build them from the plain model of these "
                                 "DHP params.")
            found[path_of(path)] = groups.writes[layer][0]
    if not found:
        raise ValueError("params have no latent: pass the DHP model's params, not the plain "
                         "model's.")
    return found


def plain_variables(model: DHPVGG | DHPResNet, params: PyTree, batch_stats: PyTree,
                    kept: dict | None = None, groups: ChannelGroups | None = None
                    ) -> tuple[nn.Module, PyTree, PyTree]:
    """``(model.base, params, batch_stats)``: the plain network whose kernels ``model``'s
    hypernetworks generate, so that it computes what ``model`` does; the hypernetworks are
    gone. With ``kept`` (the search's channel masks, per group of ``groups``, the plain
    model's), the channels not kept are cut, as DHP's ``reset_after_searching`` slices
    them away: every row that reads them zeroed, so ``hf.export`` removes them.
    """
    if kept is not None and groups is None:
        raise ValueError("plain_variables cuts the channels not kept by the plain model's "
                         "groups: pass groups= with kept=.")
    params, batch_stats = masking.unwrap_nnx(params), masking.unwrap_nnx(batch_stats)
    image = jnp.zeros((1, 32, 32, params[model.stem]["w2"].shape[0]))
    _, sown = model.apply({"params": params, "batch_stats": batch_stats}, image,
                          mutable=["intermediates"])
    kernels = {plain_name(path_of(p[:-2])): k
               for p, k in jax.tree.leaves_with_path(sown["intermediates"])}
    plain = _rebuilt(params, "", kernels)
    if kept is not None:
        plain = masking.multiply_masks(plain, groups.expand(kept, plain))
    return model.base, plain, batch_stats


def _rebuilt(params: dict, prefix: str, kernels: dict) -> dict:
    """``params`` with every HyperConv (a dict with ``w2``) replaced by its plain conv's
    ``{"kernel": ...}`` from ``kernels`` (plain path -> kernel)."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict) and "w2" in value:
            out[plain_name(name)] = {"kernel": kernels[plain_name(prefix + name)]}
        elif isinstance(value, dict):
            out[name] = _rebuilt(value, f"{prefix}{name}/", kernels)
        else:
            out[name] = value
    return out


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
    (``groups``: the plain network's, ``channel_groups(model.base, ...)``). Once at most
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

    def channels(params, group_of):
        masks = latent_masks(params, threshold, min_channels)
        kept = {g: jnp.ones(n, bool) for g, n in groups.sizes.items()}
        kept.update({group_of[path_of(p)]: m
                     for p, m in jax.tree.leaves_with_path(masks) if m is not None})
        return kept, masks

    def init(params):
        params = masking.unwrap_nnx(params)
        kept, masks = channels(params, latent_groups(params, groups))
        return DHPState(prox.init(params), jnp.zeros((), bool), kept, masks)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("dhp needs params: call update(updates, state, params).")
        shrunk, prox_state = prox.update(updates, state.prox, params)
        updates = jax.tree.map(lambda plain, proximal: jnp.where(state.stopped, plain, proximal),
                               updates, shrunk)
        kept, masks = channels(optax.apply_updates(params, updates),
                               latent_groups(params, groups))
        freeze = lambda old, new: jnp.where(state.stopped, old, new)  # noqa: E731
        kept, masks = jax.tree.map(freeze, (state.kept, state.masks), (kept, masks))
        stopped = state.stopped | (groups.flops_fraction(kept) <= 1 - target + margin)
        return updates, DHPState(prox_state, stopped, kept, masks)

    return optax.GradientTransformationExtraArgs(init, update)
