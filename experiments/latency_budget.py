"""Latency as the budget: channel Hyperflows asked for a speed-up, beside FLOP targets.

    python -m experiments.latency_budget --out=docs/results/latency_budget
    python -m experiments.latency_budget --quick --out=/tmp/latency_budget

On a setting of ``experiments.compare`` (default ``compare_cifar10``: the narrow VGG-19,
x0.125, on the whole CIFAR-10 as JPEG), from one dense model:

1. the latency table of the model's layers at ``--batch`` (``hf.structured.latency``),
   measured first, with nothing else running, and saved as OUT/runs/latency_table.json;
2. channel Hyperflows (``hyperflows_channel``, its defaults) with ``--target=latency
   --target_speedup=S`` for each of ``--speedups``, and with each FLOP target of
   ``--flops_targets`` (the multiply-add budget a user would otherwise guess at);
3. each run's exported model (``hf.export``, BatchNorm folded, no BCSR) timed against
   the dense model's export (every channel kept), interleaved, median of ``--repeats``,
   at batches 1, 32 and 256: ``speedup`` measured beside ``predicted`` (the table's).
   A latency run lands on its exported model's measured speed-up at the table's batch
   (``hf.structured.land_measured``, in the run): ``landing`` lists the cuts it timed.

The runs resume from OUT/runs. Writes latency_budget.json, .md and .png: per run its
test accuracy, multiply-adds kept, predicted and measured speed-ups. A speed-up depends
on the machine: the table and the timings are this one's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import hflows_jax as hf
from experiments import compare, scaffold
from experiments import export as export_tools
from hflows_jax.training import Config, outputs, run, train
from hflows_jax.training.checkpoint import checkpoint_dir
from hflows_jax.training.runs import open_run

BATCHES = (1, 32, 256)


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.latency_budget", __doc__,
                        "workdir/latency_budget", "LeNet-5 on cifar10_5k, one epoch a phase")
    p.add_argument("--setting", default="cifar10", choices=list(compare.SETTINGS))
    p.add_argument("--dataset", default=None, help="override the setting's npz:PATH")
    p.add_argument("--dense_epochs", type=int, default=4)
    p.add_argument("--speedups", default="2", help="comma-separated --target_speedup values")
    p.add_argument("--flops_targets", default="0.6,0.7",
                   help="comma-separated fractions of multiply-adds removed")
    p.add_argument("--batch", type=int, default=1, help="the batch the table is measured at")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per batch size")
    return scaffold.parse(p, argv, {"setting": "cifar10_5k", "dense_epochs": 1,
                                    "speedups": "1.5", "flops_targets": "0.5",
                                    "repeats": 5})


def dense_config(args) -> Config:
    cfg = compare.dense_config(args, seed=0)
    return cfg.replace(dense_epochs=args.dense_epochs,
                       workdir=os.path.join(args.out, "runs", "dense"))


def run_config(args, name: str, **flags) -> Config:
    cfg = compare.run_config(args, "hyperflows_channel", flags.pop("target_sparsity", 0.5),
                             seed=0)
    return cfg.replace(dense_epochs=0, workdir=os.path.join(args.out, "runs", name),
                       init_checkpoint=checkpoint_dir(dense_config(args).run.workdir,
                                                      "dense"), **flags).validate()


def table_path(args) -> str:
    return os.path.join(args.out, "runs", "latency_table.json")


def measure_table(args) -> None:
    """The table of the dense run's model, measured once, before any run trains."""
    path = table_path(args)
    if os.path.exists(path):
        return
    opened = open_run(dense_config(args), axis_name=None, dtype=jnp.float32)
    shape = opened.inputs.data.image_shape
    table = hf.structured.latency.measure(opened.model, opened.params, shape,
                                          batch=args.batch, repeats=args.repeats)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.save(path)


def timed(cfg: Config, table: hf.structured.LatencyTable, repeats: int) -> dict:
    """The run's exported model against the dense export, by batch size. The dense
    model's weights are the run's initial ones: a latency depends on the shapes only, and
    the pruned weights' zero rows would be dropped from it too."""
    opened, epoch, state = export_tools.restore_last(cfg)
    model, variables, masks, groups = train.evaluated_network(opened, state, epoch)

    def logits(params, x):
        return model.apply({**variables, "params": params}, x, train=False)

    example = np.zeros((2,) + opened.inputs.data.image_shape, np.float32)
    every = jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), masks,
                         is_leaf=lambda m: m is None)
    pruned = hf.export(logits, variables["params"], masks, example, bcsr=False)
    # the dense model: the run's initial weights (no zero rows for the export to drop)
    dense = hf.export(logits, opened.params, every, example, bcsr=False)
    images = np.random.default_rng(0).normal(size=(max(BATCHES),) + example.shape[1:])
    speedups = {}
    for b in BATCHES:
        x = jnp.asarray(images[:b], jnp.float32)
        ms = hf.compact.median_ms({"dense": lambda: dense(x), "pruned": lambda: pruned(x)},
                                  repeats, warmup=3)
        speedups[b] = ms["dense"] / ms["pruned"]
    counts = groups.live_counts(hf.channel_masks(state.opt_state))
    predicted = 1.0 / float(table.fraction(counts))
    return {"flops_fraction": pruned.macs / pruned.dense_macs, "predicted": predicted,
            "speedup": speedups}


def markdown(result: dict) -> str:
    lines = [f"# Latency as the budget ({result['setting']}, table at batch "
             f"{result['batch']})", "",
             "| run | test accuracy | multiply-adds kept | predicted speed-up | "
             + " | ".join(f"measured b{b}" for b in BATCHES) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(BATCHES)]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['test_accuracy']:.2%} | {r['flops_fraction']:.3f} | "
                     f"{r['predicted']:.2f}x | "
                     + " | ".join(f"{r['speedup'][b]:.2f}x" for b in BATCHES) + " |")
    lines += ["", f"Dense model: {result['dense_accuracy']:.2%}. Speed-ups: the exported "
              "pruned model over the exported dense model, both BatchNorm-folded, median "
              "of interleaved calls in one process."]
    for r in result["rows"]:
        if r.get("landing"):
            lines += ["", f"{r['run']}, its landing (cuts timed at the land step, batch "
                      f"{result['batch']}): " + "; ".join(
                          f"{x['predicted']:.2f}x predicted, {x['measured']:.2f}x measured"
                          for x in r["landing"]) + "."]
    return "\n".join(lines) + "\n"


def plot(fig, result: dict) -> None:
    ax = fig.add_subplot(1, 1, 1)
    b = result["batch"]
    for r in result["rows"]:
        latency = r["run"].startswith("latency")
        ax.plot(r["speedup"][b], r["test_accuracy"], "o" if latency else "s",
                color="tab:red" if latency else "tab:blue")
        ax.annotate(r["run"], (r["speedup"][b], r["test_accuracy"]),
                    textcoords="offset points", xytext=(5, 3), fontsize=8)
    for s in result["speedups"]:
        ax.axvspan(0.9 * s, 1.1 * s, color="tab:red", alpha=0.1)
    ax.set(xlabel=f"measured speed-up at batch {b} (exported, over dense)",
           ylabel="test accuracy", title="latency budget (red) and FLOP budgets (blue)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    measure_table(args)
    table = hf.structured.LatencyTable.load(table_path(args))
    dense = run(dense_config(args))
    speedups = [float(s) for s in args.speedups.split(",") if s]
    configs = {f"latency_{s:g}x": run_config(args, f"latency_{s:g}x", target="latency",
                                             target_speedup=s,
                                             latency_table=table_path(args))
               for s in speedups}
    configs.update({f"flops_{t:g}": run_config(args, f"flops_{t:g}", target_sparsity=t)
                    for t in (float(t) for t in args.flops_targets.split(",") if t)})
    reports = {name: run(cfg) for name, cfg in configs.items()}
    rows = [{"run": name, "test_accuracy": reports[name]["test_accuracy"],
             "target": reports[name]["target"],
             "target_removed": reports[name]["target_removed"],
             "landing": (reports[name].get("measured_landing") or {}).get("readings"),
             **timed(cfg, table, args.repeats)} for name, cfg in configs.items()]
    result = {"setting": args.setting, "batch": args.batch, "speedups": speedups,
              "dense_accuracy": dense["test_accuracy"], "table_machine": table.machine,
              "rows": rows, "environment": outputs.environment()}
    scaffold.write_results(args.out, "latency_budget", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
