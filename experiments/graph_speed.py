"""How long the traced graph takes: tracing, channel groups and export, per model.

    python -m experiments.graph_speed --out=results/graph_speed
    python -m experiments.graph_speed --quick --out=/tmp/graph_speed

For each model (ResNet-50 at the ImageNet shape, batch 1, by default), one process times
``hf.graph.trace`` (``jax.make_jaxpr`` and the channel labels), ``hf.structured.
channel_groups`` (trace and groups) and ``hf.export`` with 90 % random unstructured masks
and a third of each group's channels pruned (trace, the channel fixed point, the
rewrite): the first call in the process (with its compilations) and the median of
``--repeats`` more. Writes graph_speed.json, .md and .png to --out.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import hflows_jax as hf
from experiments import scaffold
from hflows_jax import models
from hflows_jax.training import outputs

# name -> (model name, classes, input shape, width)
MODELS = {
    "resnet50_imagenet": ("resnet50", 1000, (224, 224, 3), 1.0),
    "vgg19_cifar": ("vgg19", 10, (32, 32, 3), 1.0),
    "lenet300_mnist": ("lenet300", 10, (28, 28, 1), 1.0),
}
STAGES = ("trace", "channel_groups", "export")


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.graph_speed", __doc__, "workdir/graph_speed",
                        "one timed call per stage, ResNet-50 only")
    p.add_argument("--models", default=",".join(MODELS), help=f"from {sorted(MODELS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per stage")
    args = scaffold.parse(p, argv, {"repeats": 1, "models": "resnet50_imagenet"})
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; known: {sorted(MODELS)}")
    return args


def _timed(fn, repeats: int) -> dict:
    """Seconds of the first call and the median of ``repeats`` more."""
    times = []
    for _ in range(1 + repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"first": times[0], "median": statistics.median(times[1:])}


def measure(name: str, repeats: int) -> dict:
    model_name, classes, shape, width = MODELS[name]
    model = models.create(model_name, classes, width=width)
    x = jnp.zeros((1,) + shape, jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def fn(p, x):
        return model.apply({"params": p, **rest}, x)

    seconds = {"trace": _timed(lambda: hf.graph.trace(fn, params, x), repeats),  # first
               "channel_groups": _timed(lambda: hf.structured.channel_groups(fn, params, x),
                                        repeats)}
    groups = hf.structured.channel_groups(fn, params, x)
    rng = np.random.default_rng(0)
    kept = {g: rng.random(n) < 2 / 3 for g, n in groups.sizes.items()}
    channel_masks = groups.expand(kept, params)
    masks = jax.tree.map(lambda p, m: None if p.ndim < 2 else (rng.random(p.shape) < 0.1) & (
        True if m is None else np.asarray(m)), params, channel_masks,
        is_leaf=lambda m: m is None)
    seconds["export"] = _timed(lambda: hf.export(fn, params, masks, x), repeats)
    graph = hf.graph.trace(fn, params, x)
    compact = hf.export(fn, params, masks, x)
    return {"model": name, "input": [1, *shape], "equations": len(graph.eqns),
            "groups": len(groups.sizes), "channels": groups.total,
            "dense_macs": compact.dense_macs, "compact_macs": compact.macs,
            "seconds": seconds}


def markdown(result: dict) -> str:
    rows = [[r["model"], "x".join(map(str, r["input"])), r["equations"], r["groups"],
             *(f"{r['seconds'][s]['first']:.2f} / {r['seconds'][s]['median']:.2f}"
               for s in STAGES),
             f"{r['dense_macs'] / max(r['compact_macs'], 1):.2f}x"] for r in result["rows"]]
    header = ["model", "input", "equations", "groups", "trace s", "channel_groups s",
              "export s", "MACs dense/compact"]
    return (f"# graph_speed\n\nSeconds: the first call in the process / the median of "
            f"{result['repeats']} more. Export with 90 % random masks and a third of each "
            "group's channels pruned.\n\n" + outputs.markdown_table(header, rows))


def plot(fig, result: dict) -> None:
    ax = fig.subplots()
    x = np.arange(len(result["rows"]))
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        ax.bar(x + (i - 1) * width, [r["seconds"][stage]["first"] for r in result["rows"]],
               width, label=stage)
    ax.set_xticks(x, [r["model"] for r in result["rows"]])
    ax.set_ylabel("seconds (first call)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = [measure(name, args.repeats) for name in args.models.split(",")]
    result = {"rows": rows, "repeats": args.repeats, "environment": outputs.environment()}
    scaffold.write_results(args.out, "graph_speed", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
