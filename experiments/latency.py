"""Latency of pruned models beside their dense ones, as a user serves them.

    python -m experiments.latency --out=docs/results/latency
    python -m experiments.latency --quick --out=/tmp/latency

For each model and target, ``hf.export`` builds the pruned model, tuned on this machine
(``tune=``: at each batch size the fastest of its programs, the masked dense one among
them), and both are timed at each batch size:

- ``xla``: in this process, dense and pruned calls interleaved, each waited for; the
  median after a warm-up;
- ``xla_served``: the same, in a fresh process that loads the two ``jax.export`` files
  (``model.jax``-style: weights inside, batch symbolic), as a server would;
- ``onnxruntime``: the dense and the compact model converted with ``jax2onnx``, run by
  ONNX Runtime in a fresh process (``pip install -e ".[deploy]"``; skipped without it).

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
        for name in ("dense", "pruned"):
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
    """``fn`` (float32 images -> logits) as an ONNX model with a symbolic batch."""
    from jax2onnx import to_onnx as convert

    model = convert(fn, [("B",) + tuple(image_shape)], model_name="model")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


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


def measure(name: str, spec: Spec, target: float, args) -> list[dict]:
    import hflows_jax as hf
    from hflows_jax.masking import multiply_masks

    model = spec.build()
    example = jnp.asarray(np.random.default_rng(0).normal(size=(2,) + spec.image_shape),
                          jnp.float32)
    variables = model.init(jax.random.key(0), example[:1])
    rest = {k: v for k, v in variables.items() if k != "params"}
    params = variables["params"]
    kwargs = {"train": False} if rest else {}

    def fn(p, x):
        return model.apply({"params": p, **rest}, x, **kwargs)

    if spec.method == "channels":
        groups = hf.structured.channel_groups(fn, params, example)
        kept, _ = uniform_channels(groups, target)
        masks = groups.expand(kept, params)
        structure = "uniform channel fraction"
    else:
        masks, structure = lenet_masks(params, args.lenet_run, target)
    batches = spec.batches or args.batches
    batches = tuple(b for b in args.batches if b in batches) or batches
    compact = hf.export(fn, params, masks, example, tune=batches)
    masked = multiply_masks(params, masks)
    dense = jax.jit(functools.partial(fn, masked))
    pruned = jax.jit(functools.partial(compact.forward, compact.params))
    flops_fraction = compact.macs / compact.dense_macs
    base = {"model": name, "width": 1.0, "method": spec.method, "target": target,
            "structure": structure, "flops_fraction": flops_fraction,
            "mac_bound": compact.dense_macs / max(compact.macs, 1),
            "routes": [r.name + f"@{max(r.batch, 1)}" for r in compact.routes]}
    from hflows_jax.compact import median_ms

    timings = {}
    if "xla" in args.runtimes:
        timings["xla"] = {}
        for b in batches:
            x = jnp.asarray(np.resize(np.asarray(example), (b,) + spec.image_shape))
            timings["xla"][b] = median_ms({"dense": functools.partial(dense, x),
                                           "pruned": functools.partial(pruned, x)},
                                          args.repeats, budget_s=args.seconds)
    served = [r for r in args.runtimes if r != "xla"]
    if served:
        with tempfile.TemporaryDirectory() as directory:
            spec_b = jax.export.symbolic_shape("b")[0]
            shape = jax.ShapeDtypeStruct((spec_b,) + spec.image_shape, jnp.float32)
            with open(os.path.join(directory, "dense.jax"), "wb") as f:
                f.write(jax.export.export(dense)(shape).serialize())
            with open(os.path.join(directory, "pruned.jax"), "wb") as f:
                f.write(compact.exported().serialize())
            runtimes = list(served)
            if "onnxruntime" in served:
                try:
                    to_onnx(functools.partial(fn, masked), spec.image_shape,
                            os.path.join(directory, "dense.onnx"))
                    to_onnx(functools.partial(compact.forward, compact.params),
                            spec.image_shape, os.path.join(directory, "pruned.onnx"))
                except ImportError:
                    print("onnxruntime: skipped (pip install -e '.[deploy]')")
                    runtimes.remove("onnxruntime")
            with open(os.path.join(directory, "serve.json"), "w") as f:
                json.dump({"image_shape": list(spec.image_shape), "runtimes": runtimes,
                           "bcsr": compact.has_bcsr}, f)
            timings.update(fresh_process(directory, batches, args))
    rows = []
    for runtime, by_batch in timings.items():
        for b, ms in sorted(by_batch.items()):
            rows.append({**base, "runtime": runtime, "batch": b, "dense_ms": ms["dense"],
                         "pruned_ms": ms["pruned"], "speedup": ms["dense"] / ms["pruned"]})
    return rows


# ---------------------------------------------------------------------------------------
# Results.

def markdown(result: dict) -> str:
    from hflows_jax.training import outputs

    header = ["model", "method", "removed", "runtime", "batch", "dense ms", "pruned ms",
              "speed-up", "MAC bound", "of bound"]
    rows = [[r["model"], r["method"], f"{100 * (1 - r['flops_fraction']):.1f} %", r["runtime"],
             r["batch"], f"{r['dense_ms']:.3f}", f"{r['pruned_ms']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['mac_bound']:.2f}x",
             f"{r['speedup'] / r['mac_bound']:.2f}"] for r in result["rows"]]
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

    specs = _models()
    work = [(name, t) for name in args.models for t in (
        specs[name].targets if specs[name].method == "weights" or not args.targets
        else args.targets)]
    rows = []
    for name, target in tqdm(work, desc="latency", unit="model"):
        rows.extend(measure(name, specs[name], target, args))
    result = {"command": "python -m experiments.latency " + " ".join(argv or sys.argv[1:]),
              "rows": rows, "environment": outputs.environment()}
    scaffold.write_results(args.out, "latency", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
