"""What Hyperflows costs per step: step time against plain SGD, and optimizer-state bytes.

    python -m experiments.overhead --out=results/overhead
    python -m experiments.overhead --quick --out=/tmp/overhead

For each model, one process times a dense step (``optax.sgd``) and a Hyperflows step
(``hf.hyperflows`` chained before the same SGD, on ``W * M``), interleaved after
warm-up, and reports the median of each and their ratio, plus the optimizer-state bytes
per model parameter. Writes overhead.json, overhead.md and overhead.png to --out.
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import hflows_jax as hf
from experiments import scaffold
from hflows_jax import models
from hflows_jax.training import TrainState, make_train_step, outputs

# model -> (input shape, batch size, timed steps, warm-up steps); VGG-19 takes ~12 s a
# step on 2 CPU cores, so it gets a few steps only.
MODELS = {
    "lenet300": ((28, 28, 1), 128, 200, 20),
    "resnet20": ((32, 32, 3), 128, 30, 3),
    "vgg19": ((32, 32, 3), 128, 3, 1),
}
QUICK_STEPS = {"lenet300": 100, "resnet20": 12, "vgg19": 2}


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.overhead", __doc__, "workdir/overhead",
                        "fewer timed steps")
    p.add_argument("--models", default=",".join(MODELS))
    args = scaffold.parse(p, argv, {})
    args.models = args.models.split(",")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}: choose from {list(MODELS)}")
    return args


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(name: str, steps: int, warmup: int) -> dict:
    shape, batch, _, _ = MODELS[name]
    model = models.create(name, 10)
    x = jax.random.normal(jax.random.key(0), (batch,) + shape)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = jax.jit(lambda: model.init(jax.random.key(2), x[:1]))()
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    sgd = optax.sgd(0.01, momentum=0.9)
    hf_tx = optax.chain(hf.hyperflows(hf.pressure.constant(1.0)), sgd)
    runs = {}
    for key, tx, masked in (("dense", sgd, False), ("hyperflows", hf_tx, True)):
        state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))
        runs[key] = [state, jax.jit(make_train_step(model, tx, masked, axis_name=None))]
    times = scaffold.step_times(runs, (x, y), steps, warmup)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    dense_s, hf_s = statistics.median(times["dense"]), statistics.median(times["hyperflows"])
    return {"model": name, "batch_size": batch, "timed_steps": steps,
            "dense_step_s": dense_s, "hyperflows_step_s": hf_s, "ratio": hf_s / dense_s,
            "state_bytes_per_param": tree_bytes(runs["hyperflows"][0].opt_state) / num_params,
            "dense_state_bytes_per_param": tree_bytes(runs["dense"][0].opt_state) / num_params,
            "params": int(num_params)}


def markdown(rows: list[dict]) -> str:
    table = outputs.markdown_table(
        ["model", "params", "batch", "timed steps", "dense step", "hyperflows step", "ratio",
         "state bytes / param (hyperflows)", "(dense SGD)"],
        [[r["model"], r["params"], r["batch_size"], r["timed_steps"],
          f"{1e3 * r['dense_step_s']:.1f} ms", f"{1e3 * r['hyperflows_step_s']:.1f} ms",
          f"{r['ratio']:.3f}", f"{r['state_bytes_per_param']:.2f}",
          f"{r['dense_state_bytes_per_param']:.2f}"] for r in rows])
    return f"# overhead\n\n{table}\nMedians of interleaved steps after warm-up.\n"


def plot(fig, rows: list[dict]) -> None:
    ax = fig.subplots()
    names = [r["model"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [1.0] * len(rows), 0.4, label="dense SGD")
    ax.bar([x + 0.2 for x in xs], [r["ratio"] for r in rows], 0.4, label="Hyperflows + SGD")
    for x, r in zip(xs, rows):
        ax.text(x + 0.2, r["ratio"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("step time (relative to dense)")
    ax.set_title("per-step overhead (median, interleaved)")
    ax.legend(loc="lower right")


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = outputs.environment()
    rows = []
    for name in args.models:
        _, _, steps, warmup = MODELS[name]
        row = measure(name, QUICK_STEPS[name] if args.quick else steps, warmup)
        rows.append(row)
        print(f"{name:>9}: dense {1e3 * row['dense_step_s']:.1f} ms  hyperflows "
              f"{1e3 * row['hyperflows_step_s']:.1f} ms  ratio {row['ratio']:.3f}  state "
              f"{row['state_bytes_per_param']:.1f} B/param", file=sys.stderr, flush=True)
    result = {"rows": rows, "environment": env}
    scaffold.write_results(args.out, "overhead", result, markdown(rows),
                           lambda fig: plot(fig, rows))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
