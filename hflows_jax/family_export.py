"""Compact models from pruned ones: dead units and channels removed, BatchNorm folded.

``export(model, params, masks, batch_stats, image_shape=...)`` returns a :class:`CompactModel`,
a plain JAX function over a few float32 arrays that computes the logits of the masked model
in eval mode (BatchNorm on its running statistics), with every unit and channel removed that
cannot change them:

- a unit or channel is *constant* when no weight that survives the mask connects it to the
  input image (all its incoming weights pruned, or they all come from constant channels).
  Its value (``relu(bias)``, ``relu(beta - mean * scale / sqrt(var + eps))``, ...) is folded
  into the bias of every layer that reads it, and the channel is removed;
- a unit or channel is *unread* when all its outgoing weights are pruned, or they all lead
  to removed units: it is removed with the weights that compute it.

One forward sweep in graph order settles which channels are constant (a channel is visited
after everything it reads), and one backward sweep in reverse order settles which are read
(after everything that reads it): together they are the fixed point of "a dead unit's
weights are gone, so recheck its neighbours", reached in a single pass each way. Dead
units upstream of dead units, and constants of constants, are found that way.

Folding a constant is exact when the layer that reads it sees it at every tap of every
output position: a dense layer (also after a flatten or a global average pool), a VALID
conv, a 1x1 conv. A 3x3 conv with SAME padding sees zeros instead at the image border, so a
nonzero constant channel there is *not* spatially constant after the conv. ``border``
chooses what to do with such a channel:

- ``"keep"`` (default): the channel stays in the compact model (its producer computes it
  from a zero kernel column and its bias), and the padded conv reads it as before: exact,
  at the price of that channel's weights and multiply-adds.
- ``"map"``: the channel is removed and the padded conv gets an exact per-position bias,
  the conv of the constant image. By linearity that is ``conv(ones, B)`` with
  ``B[dy, dx, o] = sum_i c_i W[dy, dx, i, o]`` over the removed constant channels ``i``: the
  compact model stores ``B`` (``kh * kw * C`` entries, however many channels it replaces)
  and computes the map once per call, on one ``(1, H, W, 1)`` image of ones, whatever the
  batch size (those multiply-adds are not in the per-image counts).

Either way, a channel that reads a nonzero constant through a padded conv counts as not
constant (its value varies at the border), so constants are only ever folded exactly.

BatchNorm is folded into the conv before it (kernel scaled per output channel, bias added).
A residual stream channel is removed from a sum only where nothing reads it there; both
branches of an addition then compute every channel the sum keeps, a constant one from zero
kernel columns and its bias. Dropping such a constant from one branch only, and
zero-filling it back by index at the addition, made a ResNet-20 at 99 % slower than the
masked model on CPU (0.84x at batch 256; computing it: 1.12x and 1.15x, ``docs/RESULTS.md``).

Dense (fully connected) layers can run as ``jax.experimental.sparse.BCSR`` matrices
(``bcsr=``), faster on CPU below 10 to 20 % density from batch ``BCSR_MIN_BATCH`` on, slower
below it (measurements at ``BCSR_AUTO_DENSITY``). The automatic choice keeps both kernels and
switches on the batch size: at trace time for a concrete batch, by one ``lax.cond`` around the
whole network for a symbolic one (``jax.export``). On CPU, BCSR runs as a custom call
(``BCSR_CUSTOM_CALL``) that ``jax.export`` only serializes with that check disabled: such a
file is tied to the jaxlib that reads it.

Each model family is described by a short list of layers (:class:`Linear`, :class:`Pool`,
:class:`Add` over named tensors, ``"image"`` in, ``"logits"`` out), built from the linen
module in :func:`graph` -- no tracing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hflows_jax.masking import check_same_structure, prunable_leaves, unwrap_nnx

PyTree = Any

# bcsr=None: on the CPU backend, dense layers at most this dense run as BCSR; small kernels
# (at most BCSR_SMALL_KERNEL entries) up to BCSR_SMALL_DENSITY. Measured on the 2-core CPU
# (jit, median of 300), dense / BCSR ms at batch 16, 32, 256 -- 784x300: density 10 %
# 0.096/0.087, 0.070/0.084, 0.403/0.274; 15 % 0.123/0.128, 0.086/0.124, 0.427/0.423; 512x512
# at 15 %: 0.092/0.119, 0.128/0.132, 0.640/0.609; 168x79 at 20 %: 0.023/0.013, 0.022/0.015,
# 0.082/0.054; 300x100 at 20 %: 0.029/0.023, 0.066/0.026, 0.185/0.134, at 30 % 0.146/0.239
# at batch 256. Not measured on GPU or TPU.
BCSR_AUTO_DENSITY = 0.1
BCSR_SMALL_KERNEL = 32_768
BCSR_SMALL_DENSITY = 0.2
# bcsr=None: below this batch size the dense kernels run (LeNet-300-100 at 98 %, serialized,
# median of 100 calls: batch 1 BCSR 0.092 ms vs dense kernels 0.032 ms; batch 32: 0.120 vs
# 0.162 ms; batch 256: 0.252 vs 0.434 ms). Batches 2 to 15 were not measured.
BCSR_MIN_BATCH = 16
# What a BCSR matmul lowers to on CPU (jax 0.10): jax.export needs this check disabled.
BCSR_CUSTOM_CALL = "cpu_csr_sparse_dense_ffi"
NO_MASKS = "this run has no masks: it is dense-only; nothing to export"
BORDERS = ("keep", "map")


# ---------------------------------------------------------------------------------------
# The graph description: one short list of layers per model family.

@dataclass(frozen=True)
class Linear:
    """``out = relu?(BatchNorm?(conv_or_dense(inp)))``; ``name`` is the layer's path in params.

    A dense layer flattens its input (NHWC order, as the linen models do).
    """

    out: str
    inp: str
    name: str
    bn: str | None = None  # the BatchNorm's path in params and batch_stats
    dense: bool = False
    stride: int = 1
    padding: str = "SAME"  # conv only; flax's default
    relu: bool = True


@dataclass(frozen=True)
class Pool:
    """``"max"``: 2x2 max-pool, stride 2, VALID (``nn.max_pool``); ``"mean"``: global average."""

    out: str
    inp: str
    kind: str


@dataclass(frozen=True)
class Add:
    """``out = relu?(a + b)``: a residual addition."""

    out: str
    a: str
    b: str
    relu: bool = True


def graph(model, params: PyTree) -> tuple:
    """The layer list of a linen model from ``hflows_jax.models`` (params tell projections apart).

    Tensors are named after the layer that writes them (``"Conv_3"``, ``"Dense_1"``), pools
    ``"pool_<i>"``, the global average pool ``"features"``. ResNet: ``"stem"``; per block
    ``"<block>/conv0"`` (and ``"<block>/conv1"`` in a bottleneck) after each conv + BN + ReLU,
    ``"<block>/z"`` after its last conv + BN, ``"<block>/proj"`` for a projection shortcut
    and ``"<block>"`` (e.g. ``"ResNetBlock_4"``) for the block's output, ``relu(shortcut + z)``.
    """
    from hflows_jax.models.lenet import LeNet5, LeNet300
    from hflows_jax.models.resnet import BottleneckResNetBlock, ResNet
    from hflows_jax.models.vgg import VGG

    dense = functools.partial(Linear, dense=True)
    if isinstance(model, LeNet300):
        return (dense("Dense_0", "image", "Dense_0"), dense("Dense_1", "Dense_0", "Dense_1"),
                dense("logits", "Dense_1", "Dense_2", relu=False))
    if isinstance(model, LeNet5):
        return (Linear("Conv_0", "image", "Conv_0", padding="VALID"),
                Pool("pool_0", "Conv_0", "max"),
                Linear("Conv_1", "pool_0", "Conv_1", padding="VALID"),
                Pool("pool_1", "Conv_1", "max"),
                dense("Dense_0", "pool_1", "Dense_0"), dense("Dense_1", "Dense_0", "Dense_1"),
                dense("logits", "Dense_1", "Dense_2", relu=False))
    if isinstance(model, VGG):
        ops, x, convs, pools = [], "image", 0, 0
        for layer in model.layers:
            if layer == "M":
                ops.append(Pool(f"pool_{pools}", x, "max"))
                x, pools = f"pool_{pools}", pools + 1
            else:
                ops.append(Linear(f"Conv_{convs}", x, f"Conv_{convs}", bn=f"BatchNorm_{convs}"))
                x, convs = f"Conv_{convs}", convs + 1
        return (*ops, Pool("features", x, "mean"),
                dense("logits", "features", "Dense_0", relu=False))
    if isinstance(model, ResNet):
        ops = [Linear("stem", "image", "conv_init", bn="bn_init")]
        x, index = "stem", 0
        bottleneck = issubclass(model.block_cls, BottleneckResNetBlock)
        for i, block_count in enumerate(model.stage_sizes):
            for j in range(block_count):
                stride = 2 if i > 0 and j == 0 else 1
                b = f"{model.block_cls.__name__}_{index}"
                index += 1

                def conv(k, inp, s=1, relu=True, b=b):
                    return Linear(f"{b}/conv{k}" if relu else f"{b}/z", inp, f"{b}/Conv_{k}",
                                  bn=f"{b}/BatchNorm_{k}", stride=s, relu=relu)

                if bottleneck:
                    ops += [conv(0, x), conv(1, f"{b}/conv0", stride),
                            conv(2, f"{b}/conv1", relu=False)]
                else:
                    ops += [conv(0, x, stride), conv(1, f"{b}/conv0", relu=False)]
                shortcut = x
                if "conv_proj" in params.get(b, {}):
                    ops.append(Linear(f"{b}/proj", x, f"{b}/conv_proj", bn=f"{b}/norm_proj",
                                      stride=stride, relu=False))
                    shortcut = f"{b}/proj"
                ops.append(Add(b, shortcut, f"{b}/z"))
                x = b
        return (*ops, Pool("features", x, "mean"),
                dense("logits", "features", "Dense_0", relu=False))
    raise ValueError(f"export knows LeNet300, LeNet5, VGG and ResNet (hflows_jax.models); "
                     f"got {type(model).__name__}.")


# ---------------------------------------------------------------------------------------
# Counts and the compact model.

@dataclass(frozen=True)
class LayerCounts:
    """One conv or dense layer: channels kept, params and multiply-adds per image.

    ``*_total``: the dense model; ``*_nonzero``: the masked model (present kernel entries,
    plus biases and BatchNorm parameters); ``*_compact``: the compact model's arrays.
    ``rows``: for dense layers, flattened inputs read (kept, total). ``bcsr``: the compact
    kernel runs as a BCSR matrix (its compact counts are its nonzero entries; with
    ``bcsr=None`` the dense kernel is kept too, for small batches).
    """

    name: str
    inputs: tuple[int, int]
    outputs: tuple[int, int]
    rows: tuple[int, int] | None
    params_total: int
    params_nonzero: int
    params_compact: int
    macs_total: int
    macs_nonzero: int
    macs_compact: int
    bcsr: bool = False


@dataclass(frozen=True)
class ExportCounts:
    """Whole-model counts (per image for multiply-adds; conv and dense kernels only, as in
    ``hflows_jax.flops.forward_macs``). ``params_compact`` sums the layers': kernel (BCSR:
    its nonzeros), bias and ``border="map"`` border kernel."""

    params_total: int
    params_nonzero: int
    params_compact: int
    macs_total: int
    macs_nonzero: int
    macs_compact: int
    layers: tuple[LayerCounts, ...]


@dataclass(frozen=True)
class ChannelCount:
    kept: int
    constant: int  # channels whose value does not depend on the image (kept or folded)
    total: int


# Compact program steps (static, hashable); their arrays live in CompactModel.arrays[key].
@dataclass(frozen=True)
class _Conv:
    out: str
    inp: str
    key: str
    stride: int
    padding: str
    relu: bool
    border: bool  # add conv(ones, arrays[key]["border"]): constants folded across a padded border


@dataclass(frozen=True)
class _Dense:
    out: str
    inp: str
    key: str
    rows: bool  # gather the flattened inputs arrays[key]["rows"] first
    relu: bool
    bcsr: bool  # arrays[key]["sparse"]: a BCSR matrix of the transposed kernel


@dataclass(frozen=True)
class _Pool:
    out: str
    inp: str
    kind: str
    key: str | None  # channel selection after pooling, or None


@dataclass(frozen=True)
class _Add:
    out: str
    a: str
    b: str
    key: str  # arrays[key]["a" or "b"]: the channels of a branch that keeps more, by index
    relu: bool


@dataclass(frozen=True)
class _Select:
    out: str
    inp: str
    key: str


@dataclass(frozen=True, eq=False)
class CompactModel:
    """The exported model: ``apply(images) -> logits`` (float32), eval mode.

    ``forward(arrays, images)`` is the same function with its arrays as an argument (for
    ``jax.jit``, ``jax.export``, sharding); ``program`` and ``min_sparse_batch`` (the batch
    size from which BCSR layers run, 0 for always) are static. ``jax.export`` serializes it
    with a symbolic batch size; with BCSR layers only with ``BCSR_CUSTOM_CALL``'s check
    disabled. ``channels`` maps each tensor of the graph to its :class:`ChannelCount`;
    ``summary()`` is a per-layer table of the counts.
    """

    program: tuple
    arrays: dict
    counts: ExportCounts
    channels: dict
    min_sparse_batch: int = 0

    @property
    def forward(self):
        return functools.partial(_forward, self.program, self.min_sparse_batch)

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self.forward)

    def apply(self, images: jax.Array) -> jax.Array:
        return self._jitted(self.arrays, images)

    def summary(self) -> str:
        c = self.counts
        lines = [f"{'layer':<28} {'in':^9} {'out':^9} {'params total/nonzero/compact':>30} "
                 f"{'MACs total/nonzero/compact':>36}"]
        for r in c.layers:
            name = r.name + (" (BCSR)" if r.bcsr else "")
            lines.append(f"{name:<28} {r.inputs[0]:>4}/{r.inputs[1]:<4} "
                         f"{r.outputs[0]:>4}/{r.outputs[1]:<4} "
                         f"{r.params_total:>10}/{r.params_nonzero:>9}/{r.params_compact:>9} "
                         f"{r.macs_total:>12}/{r.macs_nonzero:>11}/{r.macs_compact:>11}")
        lines.append(f"{'total':<38} {'':>9} {c.params_total:>10}/{c.params_nonzero:>9}/"
                     f"{c.params_compact:>9} {c.macs_total:>12}/{c.macs_nonzero:>11}/"
                     f"{c.macs_compact:>11}")
        return "\n".join(lines)


def _take(x, index):
    """Channels of ``x`` by index; all of them where ``index`` is None."""
    return x if index is None else jnp.take(x, index, axis=-1)


def _conv(x, kernel, stride: int, padding: str):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _forward(program: tuple, min_sparse_batch: int, arrays: dict, images: jax.Array):
    """``_run`` with or without its BCSR layers, chosen on the batch size."""
    dense = functools.partial(_run, program, False)
    if not any(isinstance(op, _Dense) and op.bcsr for op in program):
        return dense(arrays, images)
    sparse = functools.partial(_run, program, True)
    batch = images.shape[0]
    if not min_sparse_batch:
        return sparse(arrays, images)
    if isinstance(batch, int):
        return (sparse if batch >= min_sparse_batch else dense)(arrays, images)
    return lax.cond(jnp.asarray(batch) >= min_sparse_batch, sparse, dense, arrays, images)


def _run(program: tuple, sparse: bool, arrays: dict, images: jax.Array) -> jax.Array:
    env = {"image": jnp.asarray(images, jnp.float32)}
    for op in program:
        if isinstance(op, _Select):
            y, relu = _take(env[op.inp], arrays[op.key]), False
        elif isinstance(op, _Conv):
            a, x = arrays[op.key], env[op.inp]
            y = _conv(x, a["kernel"], op.stride, op.padding) + a["bias"]
            if op.border:
                ones = jnp.ones((1,) + x.shape[1:3] + (1,), jnp.float32)
                y = y + _conv(ones, a["border"][:, :, None, :], op.stride, op.padding)
            relu = op.relu
        elif isinstance(op, _Dense):
            a, x = arrays[op.key], env[op.inp]
            x = x.reshape((x.shape[0], -1))
            if op.rows:
                x = jnp.take(x, a["rows"], axis=1)
            y = (a["sparse"] @ x.T).T if sparse and op.bcsr else x @ a["kernel"]
            y, relu = y + a["bias"], op.relu
        elif isinstance(op, _Pool):
            x = env[op.inp]
            if op.kind == "max":
                x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            else:
                x = jnp.mean(x, axis=(1, 2))
            y, relu = (x if op.key is None else _take(x, arrays[op.key])), False
        else:  # _Add
            a = arrays[op.key]
            y, relu = _take(env[op.a], a.get("a")) + _take(env[op.b], a.get("b")), op.relu
        env[op.out] = jax.nn.relu(y) if relu else y
    return env["logits"]


# ---------------------------------------------------------------------------------------
# export

@dataclass
class _Layer:
    """A conv or dense layer as the analysis sees it: BatchNorm folded, mask applied (float64)."""

    kernel: np.ndarray  # (kh, kw, in, out); a dense layer's kernel viewed over its input's (H, W)
    bias: np.ndarray  # (out,)
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    padded: bool  # a nonzero constant input is not spatially constant at the output
    present: int  # kernel entries the mask keeps
    kernel_size: int
    other_params: int  # bias and BatchNorm parameters of the dense model

    @functools.cached_property
    def reads(self) -> np.ndarray:  # (in, out): which input channels each output reads
        return (self.kernel != 0).any(axis=(0, 1))

    @functools.cached_property
    def tap_sums(self) -> np.ndarray:  # (in, out): a constant input's contribution, per unit
        return self.kernel.sum(axis=(0, 1))


def _f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _get(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
            for p, x in jax.tree.leaves_with_path(tree)}


def _check_tree(what: str, tree: PyTree, expected: PyTree, model) -> None:
    got, want = _shapes(tree), _shapes(expected)
    if got == want:
        return
    problems = [f"missing {k} {want[k]}" for k in want if k not in got]
    problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
    problems += [f"{k}: shape {got[k]}, the model has {want[k]}" for k in want
                 if k in got and got[k] != want[k]]
    raise ValueError(f"{what} do not match the model {type(model).__name__} "
                     f"(width {getattr(model, 'width', '?')}) on these images: "
                     + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))


def _load(op: Linear, params, masks, batch_stats, in_hw, in_channels) -> _Layer:
    p, m = _get(params, op.name), _get(masks, op.name)
    kernel = _f64(p["kernel"])
    mask = m.get("kernel") if isinstance(m, Mapping) else None
    present = np.ones(kernel.shape, bool) if mask is None else np.asarray(mask, bool)
    w = np.where(present, kernel, 0.0)
    bias = _f64(p["bias"]) if "bias" in p else np.zeros(w.shape[-1])
    other = bias.size if "bias" in p else 0
    if op.bn is not None:
        from hflows_jax.models.norm import EPSILON  # the models' (imports flax: lazily)

        bn, stats = _get(params, op.bn), _get(batch_stats, op.bn)
        scale = _f64(bn["scale"]) if "scale" in bn else 1.0
        g = scale / np.sqrt(_f64(stats["var"]) + EPSILON)
        bias = (bias - _f64(stats["mean"])) * g + _f64(bn["bias"])
        w = w * g
        other += sum(np.size(v) for v in bn.values())
    if op.dense:
        w = w.reshape(tuple(in_hw) + (in_channels, w.shape[-1]))
        out_hw, padded = (1, 1), False
    else:
        pads = lax.padtype_to_pads(in_hw, w.shape[:2], (op.stride, op.stride), op.padding)
        out_hw = tuple((n + lo + hi - k) // op.stride + 1
                       for n, (lo, hi), k in zip(in_hw, pads, w.shape[:2]))
        padded = any(lo or hi for lo, hi in pads)
    return _Layer(w, bias, tuple(in_hw), out_hw, padded, int(present.sum()), kernel.size, other)


def _relu(x, on: bool):
    return np.maximum(x, 0.0) if on else x


def export(model, params: PyTree, masks: PyTree, batch_stats: PyTree | None = None, *,
           image_shape: tuple[int, int, int], border: str = "keep",
           bcsr: bool | None = None) -> CompactModel:
    """The compact model of a pruned linen model from ``hflows_jax.models``.

    Args:
      model: the linen module (``models.create(...)``) the params belong to.
      params: its params, unmasked or masked (``hf.finalize``); the masks decide.
      masks: boolean masks shaped like params, ``None`` where not prunable
        (``hf.masks(opt_state)``). A kernel whose mask is ``None`` is dense.
      batch_stats: the BatchNorm running statistics (``variables["batch_stats"]``).
      image_shape: ``(H, W, C)`` of one input image, as the model takes it.
      border: ``"keep"`` or ``"map"``, what to do with a constant channel read by a padded
        conv (see the module docstring).
      bcsr: run dense (fully connected) layers as ``jax.experimental.sparse.BCSR`` matrices:
        ``True`` every one at every batch size, ``False`` none, ``None`` on the CPU backend
        those whose compact kernel keeps at most ``BCSR_AUTO_DENSITY`` of its entries
        (``BCSR_SMALL_DENSITY`` for kernels of at most ``BCSR_SMALL_KERNEL`` entries), for
        batches of ``BCSR_MIN_BATCH`` or more (faster there, see the measurements above),
        elsewhere none (not measured on GPU or TPU).

    Raises:
      ValueError: without masks, when a tree does not match the model, for other models.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}.")
    masks = unwrap_nnx(masks)
    if masks is None or not prunable_leaves(masks):
        raise ValueError(NO_MASKS)
    params = unwrap_nnx(params)
    batch_stats = {} if batch_stats is None else unwrap_nnx(batch_stats)
    image_shape = tuple(int(n) for n in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape is (H, W, C) of one image, got {image_shape}.")
    ops = graph(model, params)
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))
    _check_tree("params", params, expected["params"], model)
    _check_tree("batch_stats", batch_stats, expected.get("batch_stats", {}), model)
    try:
        check_same_structure("masks", masks, params)
    except ValueError as e:
        raise ValueError(f"masks do not match the params of {type(model).__name__}: {e}") from None
    for (path, m), p in zip(jax.tree.leaves_with_path(masks, is_leaf=lambda x: x is None),
                            jax.tree.leaves(params, is_leaf=lambda x: x is None)):
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask {jax.tree_util.keystr(path)} has shape {tuple(m.shape)}, "
                             f"its param {tuple(p.shape)}.")

    # Shapes and layers, in graph order.
    hw, width, layers = {"image": image_shape[:2]}, {"image": image_shape[2]}, {}
    for op in ops:
        if isinstance(op, Linear):
            layer = _load(op, params, masks, batch_stats, hw[op.inp], width[op.inp])
            layers[op.name] = layer
            hw[op.out], width[op.out] = layer.out_hw, layer.kernel.shape[-1]
        elif isinstance(op, Pool):
            h, w = hw[op.inp]
            hw[op.out] = ((h - 2) // 2 + 1, (w - 2) // 2 + 1) if op.kind == "max" else (1, 1)
            width[op.out] = width[op.inp]
        else:
            if width[op.a] != width[op.b] or hw[op.a] != hw[op.b]:
                raise ValueError(f"{op.out}: cannot add {op.a} and {op.b} of different shapes.")
            hw[op.out], width[op.out] = hw[op.a], width[op.a]

    # Forward sweep: constant channels and their (spatially uniform) values.
    const = {"image": np.zeros(image_shape[2], bool)}
    value = {"image": np.zeros(image_shape[2])}
    for op in ops:
        if isinstance(op, Linear):
            layer, c, v = layers[op.name], const[op.inp], value[op.inp]
            from_image = (layer.reads & ~c[:, None]).any(axis=0)
            from_padded = layer.padded & (layer.reads & (c & (v != 0))[:, None]).any(axis=0)
            const[op.out] = ~from_image & ~from_padded
            pre = layer.bias + np.where(c, v, 0.0) @ layer.tap_sums
            value[op.out] = np.where(const[op.out], _relu(pre, op.relu), 0.0)
        elif isinstance(op, Pool):
            const[op.out], value[op.out] = const[op.inp], value[op.inp]
        else:
            const[op.out] = const[op.a] & const[op.b]
            value[op.out] = np.where(const[op.out], _relu(value[op.a] + value[op.b], op.relu), 0.0)

    # Backward sweep: the channels something kept still reads (all logits are kept).
    kept = {t: np.zeros(n, bool) for t, n in width.items()}
    kept["logits"][:] = True
    for op in reversed(ops):
        if isinstance(op, Linear):
            layer, c, v = layers[op.name], const[op.inp], value[op.inp]
            read = layer.reads[:, kept[op.out]].any(axis=1)
            unfoldable = (border == "keep") & layer.padded & c & (v != 0)
            kept[op.inp] |= read & (~c | unfoldable)
        elif isinstance(op, Pool):
            kept[op.inp] |= kept[op.out]
        else:
            # Both branches compute every channel the sum keeps, constants too: zero columns
            # in their kernels cost less than picking and zero-filling channels per block.
            kept[op.a] |= kept[op.out]
            kept[op.b] |= kept[op.out]

    # The compact program.
    index = {t: np.flatnonzero(k) for t, k in kept.items()}
    program, arrays, rows_of = [], {}, {}
    if len(index["image"]) < width["image"]:
        program.append(_Select("image", "image", "image_channels"))
        arrays["image_channels"] = jnp.asarray(index["image"], jnp.int32)
    for op in ops:
        if isinstance(op, Linear):
            layer, ki, ko = layers[op.name], index[op.inp], index[op.out]
            folded = np.where(const[op.inp] & ~kept[op.inp], value[op.inp], 0.0)
            kernel = layer.kernel[:, :, ki][..., ko]
            # Only with border="map": constants folded across a padded border.
            across_border = layer.padded and bool(
                (layer.reads[:, ko] & (folded != 0)[:, None]).any())
            if across_border:
                bias = layer.bias[ko]
                b_kernel = np.einsum("i,hwio->hwo", folded, layer.kernel[..., ko])
                entry = {"border": jnp.asarray(b_kernel, jnp.float32)}
            else:
                bias, entry = layer.bias[ko] + folded @ layer.tap_sums[:, ko], {}
            entry["bias"] = jnp.asarray(bias, jnp.float32)
            if op.dense:
                kernel = kernel.reshape(int(np.prod(kernel.shape[:-1])), len(ko))
                rows = np.flatnonzero((kernel != 0).any(axis=1))
                rows_of[op.name] = (len(rows), int(np.prod(layer.kernel.shape[:3])))
                gather = len(rows) < kernel.shape[0]
                if gather:
                    kernel, entry["rows"] = kernel[rows], jnp.asarray(rows, jnp.int32)
                nonzero = int(np.count_nonzero(kernel))
                if bcsr is None:
                    density = (BCSR_SMALL_DENSITY if kernel.size <= BCSR_SMALL_KERNEL
                               else BCSR_AUTO_DENSITY)
                    sparse = (jax.default_backend() == "cpu"
                              and nonzero <= density * kernel.size)
                else:
                    sparse = bool(bcsr)
                sparse = sparse and nonzero > 0
                if sparse:
                    from jax.experimental.sparse import BCSR
                    entry["sparse"] = BCSR.fromdense(jnp.asarray(kernel.T, jnp.float32))
                if not (sparse and bcsr):  # forced BCSR never runs the dense kernel
                    entry["kernel"] = jnp.asarray(kernel, jnp.float32)
                program.append(_Dense(op.out, op.inp, op.name, gather, op.relu, sparse))
            else:
                program.append(_Conv(op.out, op.inp, op.name, op.stride, op.padding, op.relu,
                                     across_border))
                entry["kernel"] = jnp.asarray(kernel, jnp.float32)
            arrays[op.name] = entry
        elif isinstance(op, Pool):
            select = np.searchsorted(index[op.inp], index[op.out])
            key = None
            if len(select) != len(index[op.inp]):
                key = f"{op.out}/channels"
                arrays[key] = jnp.asarray(select, jnp.int32)
            program.append(_Pool(op.out, op.inp, op.kind, key))
        else:
            entry = {}
            for side in ("a", "b"):
                t = getattr(op, side)
                if len(index[t]) > len(index[op.out]):  # the branch is also read elsewhere
                    entry[side] = jnp.asarray(np.searchsorted(index[t], index[op.out]),
                                              jnp.int32)
            arrays[op.out] = entry
            program.append(_Add(op.out, op.a, op.b, op.out, op.relu))

    # Counts.
    rows_out = []
    for op in ops:
        if not isinstance(op, Linear):
            continue
        layer, entry = layers[op.name], arrays[op.name]
        positions = int(np.prod(layer.out_hw))
        sparse = "sparse" in entry
        compact_kernel = int(entry["sparse"].nse if sparse else entry["kernel"].size)
        compact_bias = int(entry["bias"].size) + int(np.size(entry.get("border", ())))
        rows_out.append(LayerCounts(
            name=op.name, inputs=(len(index[op.inp]), width[op.inp]),
            outputs=(len(index[op.out]), width[op.out]), rows=rows_of.get(op.name),
            params_total=layer.kernel_size + layer.other_params,
            params_nonzero=layer.present + layer.other_params,
            params_compact=compact_kernel + compact_bias,
            macs_total=layer.kernel_size * positions, macs_nonzero=layer.present * positions,
            macs_compact=compact_kernel * positions, bcsr=sparse))
    counts = ExportCounts(
        params_total=sum(int(np.size(x)) for x in jax.tree.leaves(params)),
        params_nonzero=sum(r.params_nonzero for r in rows_out),
        params_compact=sum(r.params_compact for r in rows_out),
        macs_total=sum(r.macs_total for r in rows_out),
        macs_nonzero=sum(r.macs_nonzero for r in rows_out),
        macs_compact=sum(r.macs_compact for r in rows_out),
        layers=tuple(rows_out))
    channels = {t: ChannelCount(len(index[t]), int(const[t].sum()), width[t]) for t in width}
    return CompactModel(tuple(program), arrays, counts, channels,
                        0 if bcsr else BCSR_MIN_BATCH)


__all__ = ["Add", "BCSR_AUTO_DENSITY", "BCSR_CUSTOM_CALL", "BCSR_MIN_BATCH",
           "BCSR_SMALL_DENSITY", "BCSR_SMALL_KERNEL", "BORDERS", "ChannelCount", "CompactModel",
           "ExportCounts", "LayerCounts", "Linear", "NO_MASKS", "Pool", "export", "graph"]
