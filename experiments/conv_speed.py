"""Why channel-pruned convs run slower than their multiply-adds say on XLA:CPU.

    python -m experiments.conv_speed --out=results/conv_speed
    python -m experiments.conv_speed --quick --out=/tmp/conv_speed

Every conv of a model on a CIFAR image (an MNIST one for the LeNets), traced
(``hflows_jax.graph``; the narrow VGG-19 of the CIFAR comparisons by default), is timed
alone at batch 256, as traced (dense) and with its
channels cut as a channel pruner leaves them at a fraction of the multiply-adds kept
(``--kept``: every layer's input and output channels times ``sqrt(kept)``, the image's
channels whole), then the same cut rounded up to a multiple of 8 channels
(``hf.export(..., channel_multiple=8)``). Calls of one layer's variants are interleaved;
the median of ``--repeats``. Writes conv_speed.json, .md and .png to --out: per layer and
in all, the time kept against the multiply-adds kept.
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp

from experiments import scaffold
from hflows_jax import graph as graph_lib
from hflows_jax import models
from hflows_jax.training import outputs

MULTIPLE = 8


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.conv_speed", __doc__, "workdir/conv_speed",
                        "one fraction kept, batch 32, 3 repeats")
    p.add_argument("--model", default="vgg19", choices=sorted(models.MODELS))
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--kept", default="0.5,0.3,0.15",
                   help="fractions of the multiply-adds kept (comma-separated)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = scaffold.parse(p, argv, {"kept": "0.3", "batch": 32, "repeats": 3})
    args.kept = [float(k) for k in args.kept.split(",")]
    if not all(0 < k <= 1 for k in args.kept):
        p.error("--kept: fractions in (0, 1]")
    return args


def conv_layers(model_name: str, width: float, image_shape: tuple) -> list[dict]:
    """Every conv of the model on an image, from its traced graph."""
    model = models.create(model_name, 10, width=width)
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + image_shape))
    graph = graph_lib.trace(lambda p, x: model.apply({**variables, "params": p}, x),
                            variables["params"], jnp.zeros((2,) + image_shape))
    names = dict(zip(graph.param_ids, graph.param_paths))
    layers = []
    for c in graph.contractions:
        eqn = graph.eqns[c.eqn]
        if eqn.name != "conv_general_dilated":
            continue
        p = eqn.params
        layers.append({"name": names[c.param].rsplit("/", 1)[0],
                       "input": graph.shapes[eqn.ins[0]][1:],
                       "positions": math.prod(graph.shapes[eqn.outs[0]][1:-1]),
                       "kernel": graph.shapes[eqn.ins[1]],
                       "strides": tuple(p["window_strides"]), "padding": tuple(p["padding"])})
    return layers


def cut(layer: dict, kept: float, multiple: int = 1) -> tuple[int, int]:
    """(input, output) channels at ``kept`` of the multiply-adds, rounded up."""
    scale = math.sqrt(kept)
    (*_, c_in), (*_, c_out) = layer["input"], layer["kernel"]

    def channels(c):
        return min(c, math.ceil(max(1, round(c * scale)) / multiple) * multiple)

    return (c_in if c_in <= 3 else channels(c_in)), channels(c_out)


def conv(layer: dict, c_in: int, c_out: int):
    kh, kw = layer["kernel"][:2]
    kernel = jnp.full((kh, kw, c_in, c_out), 0.01, jnp.float32)
    return jax.jit(lambda x: jax.lax.conv_general_dilated(
        x, kernel, layer["strides"], layer["padding"],
        dimension_numbers=("NHWC", "HWIO", "NHWC")))


def time_layer(layer: dict, variants: dict, batch: int, repeats: int) -> dict:
    """Median ms per call of each variant (name -> (c_in, c_out)), calls interleaved."""
    h, w, _ = layer["input"]
    calls = {name: (conv(layer, *io), jnp.ones((batch, h, w, io[0]), jnp.float32))
             for name, io in variants.items()}
    times = {name: [] for name in calls}
    for i in range(2 + repeats):
        for name, (fn, x) in calls.items():
            started = time.perf_counter()
            fn(x).block_until_ready()
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure(args) -> list[dict]:
    rows = []
    shape = (28, 28, 1) if args.model.startswith("lenet") else (32, 32, 3)
    for layer in conv_layers(args.model, args.width, shape):
        kh, kw = layer["kernel"][:2]
        variants = {"dense": (layer["input"][-1], layer["kernel"][-1])}
        for k in args.kept:
            variants[f"{k:g}"] = cut(layer, k)
            variants[f"{k:g} x{MULTIPLE}"] = cut(layer, k, MULTIPLE)
        ms = time_layer(layer, variants, args.batch, args.repeats)
        rows.append({"layer": layer["name"], "input": list(layer["input"]),
                     "variants": {name: {"channels": list(io), "ms": ms[name],
                                         "macs": layer["positions"] * kh * kw * io[0] * io[1]}
                                  for name, io in variants.items()}})
    return rows


def totals(rows: list[dict]) -> dict:
    names = rows[0]["variants"]
    return {n: {k: sum(r["variants"][n][k] for r in rows) for k in ("ms", "macs")}
            for n in names}


def markdown(result: dict) -> str:
    rows, total = result["rows"], result["totals"]
    names = list(total)
    dense = total["dense"]
    header = ["layer", "input"] + [f"{n}: channels, ms" for n in names]
    table = [[r["layer"], "x".join(map(str, r["input"]))]
             + [f"{v['channels'][0]}->{v['channels'][1]}: {v['ms']:.2f}"
                for v in r["variants"].values()] for r in rows]
    summary = [[n, f"{total[n]['macs'] / dense['macs']:.3f}",
                f"{total[n]['ms'] / dense['ms']:.3f}", f"{dense['ms'] / total[n]['ms']:.2f}x"]
               for n in names]
    return (f"# conv_speed: {result['model']} x{result['width']:g}, batch {result['batch']}\n\n"
            f"Every conv alone, median of {result['repeats']} interleaved calls. Variants: "
            f"dense; the multiply-adds kept (every layer's channels times sqrt); the same "
            f"rounded up to a multiple of {MULTIPLE} channels.\n\n"
            + outputs.markdown_table(["variant", "MACs kept", "time kept", "speed-up"],
                                     summary)
            + "\n\n" + outputs.markdown_table(header, table))


def plot(fig, result: dict) -> None:
    ax = fig.subplots()
    dense = [r["variants"]["dense"] for r in result["rows"]]
    for name in list(result["totals"])[1:]:
        mine = [r["variants"][name] for r in result["rows"]]
        ax.plot([m["macs"] / d["macs"] for m, d in zip(mine, dense)],
                [m["ms"] / d["ms"] for m, d in zip(mine, dense)], "o", label=name)
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=0.8, label="in proportion")
    ax.set_xlabel("multiply-adds kept (per layer)")
    ax.set_ylabel("time kept (per layer)")
    ax.set_title(f"{result['model']} x{result['width']:g}, batch {result['batch']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = measure(args)
    result = {"model": args.model, "width": args.width, "batch": args.batch,
              "repeats": args.repeats, "rows": rows, "totals": totals(rows),
              "environment": outputs.environment()}
    scaffold.write_results(args.out, "conv_speed", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
