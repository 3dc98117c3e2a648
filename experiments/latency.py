"""Latency of pruned models beside their dense ones, as a user serves them.

    python -m experiments.latency --out=docs/results/latency
    python -m experiments.latency --quick --out=/tmp/latency

For each model and target, ``hf.export`` builds the pruned model, tuned on this machine
(``tune=``: at each batch size the fastest of its programs, the masked dense one among
them, each conv as XLA's conv or as a matmul of its patches), and the dense model the
same way (every mask 1: its own fastest program, so that a speed-up is the pruning's).
Each is timed at each batch size beside the plain dense model (the model's function
jitted as it is: ``plain_dense_ms``, ``speedup_over_plain``):

- ``xla``: in this process, dense and pruned calls interleaved, each waited for; the
  median after a warm-up;
- ``xla_served``: the same, in a fresh process that loads the two ``jax.export`` files
  (``model.jax``-style: weights inside, batch symbolic), as a server would;
- ``onnxruntime``: the dense and the compact program (no route: ONNX Runtime picks its
  own kernels) converted with ``jax2onnx``, run by ONNX Runtime in a fresh process with
  as many threads as cores (``pip install -e ".[deploy]"``; skipped without it).

Models: LeNet-300-100 at 98 % of its weights removed (the masks of ``--lenet_run``, a
finished ``experiments.mnist`` run, else random masks: say which), and full-width VGG-19,
ResNet-20 (CIFAR, 32x32) and ResNet-50 (ImageNet stem, 224x224, batches up to 32)
channel-pruned to 50, 70 and 85 % of their multiply-adds removed. The channel structures
are not trained: every coupling group keeps the same fraction of its channels, bisected
to the target (``structure`` in each row). Latency depends on the shapes only, but a
trained run keeps channels unevenly and so runs at other speeds.

Writes latency.json, .md and .png: one row per (model, width, method, target, runtime,
batch) with ``flops_fraction`` (multiply-adds kept), ``dense_ms``, ``pruned_ms``,
``speedup`` and ``mac_bound`` (dense over compact multiply-adds), and the programs the
pruned model runs (``routes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import scaffold

RUNTIMES = ("xla", "xla_served", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model to time: how to build it, its input, how it is pruned, at which targets."""

    build: Callable
    image_shape: tuple
    method: str  # "weights" (unstructured) or "channels"
    targets: tuple
    batches: tuple | None = None  # None: --batches


def _models():
    from hflows_jax import models

    return {
        "lenet300": Spec(lambda: models.create("lenet300", 10), (28, 28, 1), "weights",
                         (0.98,)),
        "vgg19": Spec(lambda: models.create("vgg19", 10), (32, 32, 3), "channels",
                      (0.5, 0.7, 0.85)),
        "resnet20": Spec(lambda: models.create("resnet20", 10), (32, 32, 3), "channels",
                         (0.5, 0.7, 0.85)),
        "resnet50": Spec(lambda: models.ResNet50(num_classes=1000, imagenet_stem=True),
                         (224, 224, 3), "channels", (0.5, 0.7, 0.85), (1, 8, 32)),
    }


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.latency", __doc__, "workdir/latency",
                        "LeNet and ResNet-20 at 70 %, batches 1 and 32, 3 calls")
    p.add_argument("--models", default="lenet300,vgg19,resnet20,resnet50",
                   help="comma-separated: " + ", ".join(_models()))
    p.add_argument("--targets", default=None,
                   help="fractions of multiply-adds removed for the channel-pruned models "
                        "(comma-separated; default 0.5,0.7,0.85)")
    p.add_argument("--batches", default="1,8,32,256")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--repeats", type=int, default=30, help="timed calls at most ...")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="... and about this long per batch size (at least 3 calls)")
    p.add_argument("--lenet_run", default=None,
                   help="a finished experiments.mnist run whose masks LeNet-300-100 takes")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the fresh process
    args = scaffold.parse(p, argv, {"models": "lenet300,resnet20", "targets": "0.7",
                                    "batches": "1,32", "repeats": 3, "seconds": 1.0})
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(_models()))
    if unknown:
        p.error(f"--models: unknown {unknown}; known: {sorted(_models())}")
    args.batches = tuple(int(b) for b in args.batches.split(","))
    args.runtimes = args.runtimes.split(",")
    if set(args.runtimes) - set(RUNTIMES):
        p.error(f"--runtimes: choose from {RUNTIMES}")
    args.targets = None if args.targets is None else tuple(
        float(t) for t in args.targets.split(","))
    if args.targets and not all(0 < t < 1 for t in args.targets):
        p.error("--targets: fractions removed, in (0, 1)")
    return args


# ---------------------------------------------------------------------------------------
# The pruned structures.

def uniform_channels(groups, target: float) -> tuple[dict, float]:
    """Every group keeps the same fraction of its channels (at least one), bisected so
    that ``1 - target`` of the multiply-adds stay: ``(kept, flops_fraction)``."""
    def kept_at(f):
        return {g: np.arange(n) < max(1, round(f * n)) for g, n in groups.sizes.items()}

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float(groups.flops_fraction(kept_at(mid))) > 1 - target:
            hi = mid
        else:
            lo = mid
    kept = kept_at(hi)
    return kept, float(groups.flops_fraction(kept))


def lenet_masks(params, lenet_run: str | None, sparsity: float):
    """The masks of a finished MNIST run (its last checkpoint), else random ones."""
    if lenet_run is None:
        rng = np.random.default_rng(0)
        return (jax.tree.map(lambda x: rng.random(x.shape) >= sparsity if x.ndim >= 2
                             else None, params), f"random masks, {100 * sparsity:.0f} %")
    from experiments.export import restore_last
    from hflows_jax import masks as masks_of
    from hflows_jax.training import Config

    report = scaffold.read_report(lenet_run)
    cfg = Config().replace(**{"bn_batches": 0, **report["config"], "workdir": lenet_run})
    _, epoch, state = restore_last(cfg)
    return (masks_of(state.opt_state),
            f"{lenet_run} epoch {epoch} ({100 * report['sparsity']:.2f} % removed)")


# ---------------------------------------------------------------------------------------
# Timing.

def serve(directory: str, batches: tuple, repeats: int, seconds: float) -> dict:
    """In this (fresh) process: load ``directory``'s files and time them, interleaved.
    Returns ``{runtime: {batch: {"dense": ms, "pruned": ms}}}``."""
    with open(os.path.join(directory, "serve.json")) as f:
        plan = json.load(f)
    shape = tuple(plan["image_shape"])
    from hflows_jax.compact import median_ms

    out = {}
    if "xla_served" in plan["runtimes"]:
        if plan["bcsr"]:
            from jax.experimental import sparse  # noqa: F401  (registers BCSR's custom call)
        fns = {}
        for name in ("plain", "dense", "pruned"):
            with open(os.path.join(directory, f"{name}.jax"), "rb") as f:
                fns[name] = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
        out["xla_served"] = {}
        for b in batches:
            x = jnp.asarray(np.random.default_rng(0).normal(size=(b,) + shape), jnp.float32)
            out["xla_served"][b] = median_ms({n: functools.partial(fn, x)
                                              for n, fn in fns.items()}, repeats,
                                             budget_s=seconds)
    if "onnxruntime" in plan["runtimes"]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        sessions = {name: ort.InferenceSession(os.path.join(directory, f"{name}.onnx"),
                                               options, providers=["CPUExecutionProvider"])
                    for name in ("dense", "pruned")}
        out["onnxruntime"] = {}
        for b in batches:
            x = np.random.default_rng(0).normal(size=(b,) + shape).astype(np.float32)
            calls = {n: functools.partial(s.run, None, {s.get_inputs()[0].name: x})
                     for n, s in sessions.items()}
            out["onnxruntime"][b] = median_ms(calls, repeats, budget_s=seconds)
    return out


def to_onnx(fn, image_shape: tuple, path: str) -> None:
    """``fn`` (float32 images -> logits) as an ONNX model with a symbolic batch, through
    ``jax2onnx`` (``pip install -e ".[deploy]"``), mended where jax2onnx 0.17 writes what
    ONNX Runtime 1.32 refuses: a max-pool over NHWC as a 4-D pool (its CPU kernel takes
    2-D ones) becomes transposes around a 2-D pool."""
    import onnx
    from jax2onnx import to_onnx as convert

    model = convert(fn, [("B",) + tuple(image_shape)], model_name="model")
    _nhwc_max_pools_as_2d(model)
    del model.graph.value_info[:]  # shapes stamped before the rewrite: let ORT infer them
    onnx.save_model(model, path)


def _nhwc_max_pools_as_2d(model) -> None:
    """Unsqueeze, Unsqueeze, MaxPool with kernel (1, kh, kw, 1), Squeeze (what jax2onnx
    makes of ``lax.reduce_window_max`` on NHWC) -> Transpose, 2-D MaxPool, Transpose."""
    from onnx import helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dropped, replaced = set(), {}
    for n in graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        k = list(a.get("kernel_shape", ()))
        s = list(a.get("strides", [1] * len(k)))
        pads = list(a.get("pads", [0] * 2 * len(k)))
        if (n.op_type != "MaxPool" or len(k) != 4 or (k[0], k[3], s[0], s[3]) != (1, 1, 1, 1)
                or pads[0] or pads[3] or pads[4] or pads[7]
                or any(d != 1 for d in a.get("dilations", [1] * 4))):
            continue
        inner = producer[n.input[0]]
        outer = producer[inner.input[0]]
        (squeeze,) = consumers[n.output[0]]
        if (inner.op_type, outer.op_type, squeeze.op_type) != ("Unsqueeze", "Unsqueeze",
                                                               "Squeeze"):
            continue
        nchw, pooled = n.name + "_nchw", n.name + "_pooled"
        pool = dict(kernel_shape=k[1:3], strides=s[1:3])
        if any(pads):
            pool["pads"] = [pads[1], pads[2], pads[5], pads[6]]
        replaced[id(n)] = [
            helper.make_node("Transpose", [outer.input[0]], [nchw], perm=[0, 3, 1, 2]),
            helper.make_node("MaxPool", [nchw], [pooled], **pool),
            helper.make_node("Transpose", [pooled], [squeeze.output[0]], perm=[0, 2, 3, 1])]
        dropped |= {id(inner), id(outer), id(squeeze)}
    nodes = [m for n in graph.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)


def fresh_process(directory: str, batches: tuple, args) -> dict:
    """``serve`` in a new Python process; its JSON on the last line of its output."""
    command = [sys.executable, "-m", "experiments.latency", f"--serve={directory}",
               f"--batches={','.join(map(str, batches))}",
               f"--repeats={args.repeats}", f"--seconds={args.seconds}"]
    done = subprocess.run(command, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"the serving process failed:\n{done.stderr[-2000:]}")
    return {runtime: {int(b): ms for b, ms in by_batch.items()}
            for runtime, by_batch in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def network(spec: Spec):
    """``(fn, params, example)`` of a model with its initial weights (latency depends on
    the shapes only)."""
    model = spec.build()
    example = jnp.asarray(np.random.default_rng(0).normal(size=(2,) + spec.image_shape),
                          jnp.float32)
    variables = model.init(jax.random.key(0), example[:1])
    rest = {k: v for k, v in variables.items() if k != "params"}
    kwargs = {"train": False} if rest else {}

    def fn(p, x):
        return model.apply({"params": p, **rest}, x, **kwargs)

    return fn, variables["params"], example


def plain_program(compact):
    """The compact model's own program, no route taken: what ONNX Runtime gets (its
    kernels are its own)."""
    from hflows_jax.compact import _run

    return functools.partial(_run, compact.programs["compact"], compact.params, sparse=False)


def measure(name: str, spec: Spec, target: float, args, dense_cache: dict) -> list[dict]:
    import hflows_jax as hf
    from hflows_jax.compact import median_ms
    from hflows_jax.masking import multiply_masks

    fn, params, example = network(spec)
    if spec.method == "channels":
        groups = hf.structured.channel_groups(fn, params, example)
        kept, _ = uniform_channels(groups, target)
        masks = groups.expand(kept, params)
        structure = "uniform channel fraction"
    else:
        masks, structure = lenet_masks(params, args.lenet_run, target)
    batches = tuple(b for b in args.batches if spec.batches is None or b in spec.batches)
    pruned = hf.export(fn, params, masks, example, tune=batches)
    everything = jax.tree.map(lambda m: None if m is None else np.ones(np.shape(m), bool),
                              masks, is_leaf=lambda m: m is None)
    if name not in dense_cache:  # the dense model as hf.export serves it: its best program
        dense_cache[name] = hf.export(fn, params, everything, example, tune=batches)
    dense = dense_cache[name]
    functions = {"plain": jax.jit(functools.partial(fn, multiply_masks(params, masks))),
                 "dense": jax.jit(functools.partial(dense.forward, dense.params)),
                 "pruned": jax.jit(functools.partial(pruned.forward, pruned.params))}
    base = {"model": name, "width": 1.0, "method": spec.method, "target": target,
            "structure": structure, "flops_fraction": pruned.macs / pruned.dense_macs,
            "mac_bound": pruned.dense_macs / max(pruned.macs, 1),
            "routes": [f"{r.name}@{max(r.batch, 1)}" for r in pruned.routes],
            "dense_routes": [f"{r.name}@{max(r.batch, 1)}" for r in dense.routes]}
    timings = {}
    if "xla" in args.runtimes:
        timings["xla"] = {}
        for b in batches:
            x = jnp.asarray(np.resize(np.asarray(example), (b,) + spec.image_shape))
            timings["xla"][b] = median_ms({k: functools.partial(f, x)
                                           for k, f in functions.items()},
                                          args.repeats, budget_s=args.seconds)
    served = [r for r in args.runtimes if r != "xla"]
    if served:
        with tempfile.TemporaryDirectory() as directory:
            (b,) = jax.export.symbolic_shape("b")
            shape = jax.ShapeDtypeStruct((b,) + spec.image_shape, jnp.float32)
            files = {"plain": jax.export.export(functions["plain"])(shape),
                     "dense": dense.exported(), "pruned": pruned.exported()}
            for key, exported in files.items():
                with open(os.path.join(directory, f"{key}.jax"), "wb") as out:
                    out.write(exported.serialize())
            if "onnxruntime" in served:  # each compact program as built, dense kernels
                for key, key_masks in (("dense", everything), ("pruned", masks)):
                    compact = hf.export(fn, params, key_masks, example, bcsr=False)
                    to_onnx(plain_program(compact), spec.image_shape,
                            os.path.join(directory, f"{key}.onnx"))
            with open(os.path.join(directory, "serve.json"), "w") as out:
                json.dump({"image_shape": list(spec.image_shape), "runtimes": served,
                           "bcsr": pruned.has_bcsr or dense.has_bcsr}, out)
            timings.update(fresh_process(directory, batches, args))
    rows = []
    for runtime, by_batch in timings.items():
        for b, ms in sorted(by_batch.items()):
            rows.append({**base, "runtime": runtime, "batch": b, "dense_ms": ms["dense"],
                         "pruned_ms": ms["pruned"], "speedup": ms["dense"] / ms["pruned"],
                         "plain_dense_ms": ms.get("plain"),
                         "speedup_over_plain": ms["plain"] / ms["pruned"] if "plain" in ms
                         else None})
    return rows


# ---------------------------------------------------------------------------------------
# Results.

def markdown(result: dict) -> str:
    from hflows_jax.training import outputs

    header = ["model", "method", "removed", "runtime", "batch", "dense ms", "pruned ms",
              "speed-up", "MAC bound", "of bound", "plain dense ms", "over plain"]
    rows = [[r["model"], r["method"], f"{100 * (1 - r['flops_fraction']):.1f} %", r["runtime"],
             r["batch"], f"{r['dense_ms']:.3f}", f"{r['pruned_ms']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['mac_bound']:.2f}x",
             f"{r['speedup'] / r['mac_bound']:.2f}",
             "" if r["plain_dense_ms"] is None else f"{r['plain_dense_ms']:.3f}",
             "" if r["speedup_over_plain"] is None else f"{r['speedup_over_plain']:.2f}x"]
            for r in result["rows"]]
    slower = [r for r in result["rows"] if r["speedup"] < 1]
    verdict = ("No pruned model ran slower than its dense one." if not slower else
               "Slower than dense: " + "; ".join(
                   f"{r['model']} at {100 * r['target']:.0f} %, {r['runtime']}, batch "
                   f"{r['batch']} ({r['speedup']:.2f}x)" for r in slower) + ".")
    structures = sorted({f"{r['model']}: {r['structure']}" for r in result["rows"]})
    return (f"# Latency, pruned beside dense\n\n`{result['command']}`\n\n"
            + outputs.markdown_table(header, rows)
            + f"\n{verdict} Structures: {'; '.join(structures)}. Routes (the programs the "
            "pruned model runs, by batch size): "
            + "; ".join(sorted({f"{r['model']} at {100 * r['target']:.0f} %: "
                                f"{', '.join(r['routes'])}" for r in result["rows"]}))
            + ".\n")


def plot(fig, result: dict) -> None:
    runtimes = sorted({r["runtime"] for r in result["rows"]}, key=RUNTIMES.index)
    axes = fig.subplots(1, len(runtimes), sharey=True, squeeze=False)[0]
    for ax, runtime in zip(axes, runtimes):
        series = {}
        for r in result["rows"]:
            if r["runtime"] == runtime:
                key = f"{r['model']} {100 * (1 - r['flops_fraction']):.0f} %"
                series.setdefault(key, []).append((r["batch"], r["speedup"], r["mac_bound"]))
        for key, points in series.items():
            points.sort()
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=key,
                            lw=1)
            ax.axhline(points[0][2], color=line.get_color(), ls=":", lw=0.6)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_title(runtime, fontsize=9)
    axes[0].set_ylabel("speed-up over dense (dotted: MAC bound)")
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.serve:
        print(json.dumps(serve(args.serve, args.batches, args.repeats, args.seconds)))
        return {}
    from hflows_jax.training import outputs
    from tqdm import tqdm

    missing = [m for m in ("jax2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if "onnxruntime" in args.runtimes and missing:
        print(f"onnxruntime: skipped, {' and '.join(missing)} missing "
              "(pip install -e '.[deploy]')")
        args.runtimes.remove("onnxruntime")
    specs = _models()
    work = [(name, t) for name in args.models for t in (
        specs[name].targets if specs[name].method == "weights" or not args.targets
        else args.targets)]
    rows, dense = [], {}
    result = {"command": "python -m experiments.latency " + " ".join(
        argv if argv is not None else sys.argv[1:]), "rows": rows,
        "environment": outputs.environment()}
    for name, target in tqdm(work, desc="latency", unit="model"):
        rows.extend(measure(name, specs[name], target, args, dense))
        scaffold.write_results(args.out, "latency", result, markdown(result),  # so far
                               lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
