"""Training throughput: the dense step and the Hyperflows step, per model, width, batch
and dtype, and the fraction of the device's peak the multiply-adds say that is.

    python -m experiments.bench --out=docs/results/bench_cpu
    python -m experiments.bench --models=vgg19,resnet50 --batches=256,1024 \\
        --dtypes=float32,bfloat16 --out=docs/results/accelerator_bench   # on a GPU
    python -m experiments.bench --tiny --out=/tmp/bench                # seconds, on CPU

Each configuration jits the project's train step (``make_train_step``, state donated)
for plain SGD (``dense``) and for Hyperflows chained before it (``hyperflows``, on
``W * M``), warms each up, then times ``--steps`` steps of each, interleaved, one wait
per step: the median step time and images per second. The model's forward multiply-adds
(``hf.flops.forward_macs``) times 3 (forward and backward) times 2 FLOPs, times images
per second, is the achieved FLOP rate; over the device's peak for the dtype
(``PEAK_TFLOPS`` by device kind, or ``--peak_tflops``) its fraction. Where no peak is
known (a CPU), the fraction is null. Writes bench.json, bench.md and bench.png to --out.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import hflows_jax as hf
from experiments import scaffold
from hflows_jax import models
from hflows_jax.training import TrainState, make_train_step, outputs

SHAPES = {"lenet300": (28, 28, 1), "lenet5": (28, 28, 1)}  # else CIFAR's 32x32x3
# Dense peak TFLOP/s by device kind (vendor figures, no sparsity), per compute dtype.
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 67.0},
               "H200": {"bfloat16": 989.0, "float32": 67.0},
               "TPU v5 lite": {"bfloat16": 197.0}, "TPU v4": {"bfloat16": 275.0}}


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.bench", __doc__, "workdir/bench",
                        "(same as --tiny)")
    p.add_argument("--tiny", action="store_true", help="one tiny model, seconds on CPU")
    p.add_argument("--models", default="vgg19,resnet20")
    p.add_argument("--widths", default="0.125")
    p.add_argument("--batches", default="64")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak for every dtype (else PEAK_TFLOPS by kind)")
    tiny = {"models": "vgg19", "widths": "0.0625", "batches": "8", "steps": 2, "warmup": 1}
    args = p.parse_args(argv)
    if args.tiny or args.quick:  # its defaults; explicit flags still win
        p.set_defaults(**tiny)
        args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in models.MODELS:
            p.error(f"unknown model {name!r}: choose from {sorted(models.MODELS)}")
    for dtype in args.dtypes.split(","):
        if dtype not in ("float32", "bfloat16"):
            p.error(f"--dtypes takes float32 and bfloat16, got {dtype!r}")
    return args


def peak(dtype: str, override: float | None) -> float | None:
    if override is not None:
        return override
    kind = jax.devices()[0].device_kind
    found = [v for k, v in PEAK_TFLOPS.items() if k in kind]
    return found[0].get(dtype) if found else None


def measure(name: str, width: float, batch: int, dtype: str, steps: int, warmup: int,
            peak_tflops: float | None) -> dict:
    shape = SHAPES.get(name, (32, 32, 3))
    model = models.create(name, 10, width=width, dtype=jnp.dtype(dtype))
    x = jax.random.normal(jax.random.key(0), (batch,) + shape)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = jax.jit(lambda: model.init(jax.random.key(2), x[:1]))()
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    macs, _ = hf.flops.forward_macs(models.create(name, 10, width=width), params, shape)
    sgd = optax.sgd(0.01, momentum=0.9)
    txs = {"dense": (sgd, False),
           "hyperflows": (optax.chain(hf.hyperflows(hf.pressure.constant(1.0)), sgd), True)}
    runs, compile_s = {}, {}
    for key, (tx, masked) in txs.items():
        own = jax.tree.map(jnp.copy, (params, batch_stats))  # each run donates its own
        state = TrainState(jnp.zeros((), jnp.int32), *own, tx.init(own[0]))
        step = jax.jit(make_train_step(model, tx, masked, axis_name=None), donate_argnums=0)
        started = time.perf_counter()
        state, _ = step(state, x, y)
        jax.block_until_ready(state)
        compile_s[key] = time.perf_counter() - started
        runs[key] = [state, step]
    times = scaffold.step_times(runs, (x, y), steps, warmup)
    row = {"model": name, "width": width, "batch": batch, "dtype": dtype,
           "forward_macs": int(macs), "timed_steps": steps}
    for key in runs:
        step_s = statistics.median(times[key])
        tflops = 6 * macs * batch / step_s / 1e12
        row[key] = {"step_s": step_s, "images_per_s": batch / step_s, "tflops": tflops,
                    "compile_s": compile_s[key],
                    "peak_fraction": None if peak_tflops is None else tflops / peak_tflops}
    return row


def markdown(rows: list[dict], where: str) -> str:
    table = outputs.markdown_table(
        ["model", "width", "batch", "dtype", "dense img/s", "hyperflows img/s",
         "hyperflows / dense", "hyperflows TFLOP/s", "of peak"],
        [[r["model"], r["width"], r["batch"], r["dtype"],
          f"{r['dense']['images_per_s']:.0f}", f"{r['hyperflows']['images_per_s']:.0f}",
          f"{r['hyperflows']['images_per_s'] / r['dense']['images_per_s']:.2f}",
          f"{r['hyperflows']['tflops']:.3g}",
          "n/a" if r["hyperflows"]["peak_fraction"] is None
          else f"{r['hyperflows']['peak_fraction']:.1%}"] for r in rows])
    return (f"# bench ({where})\n\n{table}\nMedian step time of interleaved steps after "
            "warm-up; TFLOP/s from 6 x forward multiply-adds per image.\n")


def plot(fig, rows: list[dict]) -> None:
    ax = fig.subplots()
    labels = [f"{r['model']} x{r['width']:g}\nb{r['batch']} {r['dtype']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["dense"]["images_per_s"] for r in rows], 0.4,
           label="dense step")
    ax.bar([x + 0.2 for x in xs], [r["hyperflows"]["images_per_s"] for r in rows], 0.4,
           label="Hyperflows step")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("images per second")
    ax.legend()


def main(argv=None) -> dict:
    args = parse_args(argv)
    where = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    rows = []
    for name in args.models.split(","):
        for width in (float(w) for w in args.widths.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                for dtype in args.dtypes.split(","):
                    row = measure(name, width, batch, dtype, args.steps, args.warmup,
                                  peak(dtype, args.peak_tflops))
                    rows.append(row)
                    print(f"{name} x{width:g} b{batch} {dtype}: dense "
                          f"{row['dense']['images_per_s']:.0f} img/s, hyperflows "
                          f"{row['hyperflows']['images_per_s']:.0f} img/s ({where})",
                          file=sys.stderr, flush=True)
    result = {"device": where, "rows": rows, "environment": outputs.environment()}
    scaffold.write_results(args.out, "bench", result, markdown(rows, where),
                           lambda fig: plot(fig, rows))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
