"""Hyperflows beside the baseline pruners, at equal epochs, on real data.

    python -m experiments.compare --setting=mnist --out=results/compare_mnist
    python -m experiments.compare --setting=cifar10_5k --quick --out=/tmp/compare
    python -m experiments.compare --setting=cifar10 --plan      # the grid, not run

Methods x target sparsities x seeds, and a dense row (method "dense", target 0) trained
for the same total epochs. Where the setting's schedule has dense epochs (mnist, and
cifar10_5k in the reference's regime: 10 dense, 20 pruning, 5 regrowth epochs at batch
64), Hyperflows and gradual magnitude pruning start from a dense model (trained once per
seed and shared), prune, then fine-tune (Hyperflows regrows there), and a row's wall time
includes that dense training; SNIP, GraSP, random and RigL prune at initialization and
train sparse for the same total number of epochs. Where it has none (cifar10_5k_short,
the earlier 6-epoch setting), every method starts from the same initialization. Each run
is an ordinary training run (its own workdir under OUT/runs, resumable); finished runs
are reused, so a killed sweep continues. Writes compare.json, compare.md and compare.png
to --out. Default grids (SETTINGS): mnist and cifar10_5k_short 90/95/98/99 % x 3 seeds;
cifar10_5k 95/99 % x 2 seeds, what fits in 90 minutes on 2 CPU cores.

cifar10 is the whole CIFAR-10 (JPEG) set, 50000 training and 10000 test images: the
narrow VGG-19 of cifar10_5k in 8 epochs (2 dense, 5 pruning, 1 regrowth; 8 to 12 minutes
a run on 2 CPU cores). Its default grid, what fits in about 100 minutes there (94 epochs
at 840 images/s; about 135 with the cores shared): Hyperflows and the three strongest
baselines of the cifar10_5k sweep (magnitude, random ERK, RigL) at 95, 98 and 99 %, one
seed (one shared dense start), and the dense row: 14 runs, 94 epochs of training. Left
out: SNIP and GraSP (both one class at 99 % on cifar10_5k; at 95 % GraSP level with
random ERK, SNIP 7 points below), a second seed (twice the time; 10000 test images put
one accuracy within about 0.5 points, the subset's 1017 within 1.5), 90 %. --plan lists
the runs and their epochs without training; cifar10's --quick is cifar10_5k's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys

import jax
from tqdm import tqdm

from experiments import scaffold
from hflows_jax import methods
from hflows_jax.training import Config, outputs, presets, run
from hflows_jax.training.checkpoint import checkpoint_dir

DENSE = "dense"  # the dense row: no pruning, the same total epochs, target_sparsity 0
# Each setting (presets compare_SETTING[_quick]) with its default grid: target
# sparsities, seeds and methods (None: every method whose target is a weight sparsity,
# and the dense row). cifar10_5k's grid is what fits in 90 minutes on 2 CPU cores,
# cifar10's in about 100 (the module's docstring says what it leaves out).
SETTINGS = {"mnist": ("0.90,0.95,0.98,0.99", 3, None),
            "cifar10": ("0.95,0.98,0.99", 1, f"hyperflows,magnitude,random,rigl,{DENSE}"),
            "cifar10_5k": ("0.95,0.99", 2, None),
            "cifar10_5k_short": ("0.90,0.95,0.98,0.99", 3, None)}


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.compare", __doc__, "workdir/compare",
                        "2 sparsities, 1 seed, short runs: under 5 minutes on 2 CPU cores")
    p.add_argument("--setting", default="mnist", choices=list(SETTINGS))
    unstructured = [m.name for m in methods.REGISTRY.values() if m.target == "weights"]
    p.add_argument("--methods",
                   help=f"pruning methods, and {DENSE!r} for the dense row (default: the "
                        "setting's; else every method whose target is a weight sparsity)")
    p.add_argument("--sparsities", help="comma-separated targets (default: the setting's grid)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the setting's grid)")
    p.add_argument("--dataset", default=None, help="override the setting's npz:PATH")
    p.add_argument("--plan", action="store_true",
                   help="list the runs and their training epochs, and train nothing")
    args = scaffold.parse(p, argv, {"sparsities": "0.9,0.98", "seeds": 1})
    grid_sparsities, grid_seeds, grid_methods = SETTINGS[args.setting]
    args.methods = (args.methods or grid_methods or ",".join([*unstructured, DENSE])).split(",")
    unknown = set(args.methods) - {*methods.REGISTRY, DENSE}
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}: choose from "
                f"{[*methods.REGISTRY, DENSE]}")
    args.sparsities = [float(s) for s in (args.sparsities or grid_sparsities).split(",")]
    args.seeds = grid_seeds if args.seeds is None else args.seeds
    if any(not 0 < s < 1 for s in args.sparsities) or args.seeds < 1:
        p.error("sparsities must lie in (0, 1) and --seeds be >= 1")
    return args


def setting_config(args) -> Config:
    """The setting's preset (its quick variant with --quick), with --dataset applied."""
    cfg = presets.get(f"compare_{args.setting}" + ("_quick" if args.quick else ""))
    return cfg.replace(dataset=args.dataset) if args.dataset else cfg


def starts_dense(args, method: str) -> bool:
    """Whether this method prunes a shared dense model (else it starts from initialization)."""
    return not methods.get(method).prunes_at_init and setting_config(args).schedule.dense_epochs > 0


def dense_config(args, seed: int) -> Config:
    """The dense training that the dense-first methods of this seed start from."""
    return setting_config(args).replace(dense_only=True, seed=seed, workdir=os.path.join(
        args.out, "runs", f"dense_seed{seed}"))


def dense_row_config(args, seed: int) -> Config:
    """Dense training for as many epochs as every pruning run has in all."""
    s = setting_config(args).schedule
    return setting_config(args).replace(
        dense_only=True, seed=seed, dense_epochs=s.dense_epochs + s.pruning_epochs
        + s.regrowth_epochs, workdir=os.path.join(args.out, "runs", f"dense_total_seed{seed}"))


def run_config(args, method: str, sparsity: float, seed: int) -> Config:
    cfg = setting_config(args)
    s = cfg.schedule
    if starts_dense(args, method):
        phases = dict(init_checkpoint=checkpoint_dir(dense_config(args, seed).run.workdir,
                                                     "dense"))
    else:  # at-initialization methods train sparse for the same total number of epochs
        phases = dict(dense_epochs=0, pruning_epochs=s.dense_epochs + s.pruning_epochs)
    return cfg.replace(method=method, target_sparsity=sparsity, seed=seed, **phases,
                       workdir=os.path.join(args.out, "runs", f"{method}_s{sparsity}_seed{seed}"))


def grid(args) -> list[tuple[str, float, int]]:
    """(method, target sparsity, seed) of every row, the dense row last."""
    jobs = [(m, s, seed) for s in args.sparsities for seed in range(args.seeds)
            for m in args.methods if m != DENSE]
    return jobs + [(DENSE, 0.0, seed) for seed in range(args.seeds) if DENSE in args.methods]


def plan(args) -> dict[str, int]:
    """The epochs each run of the grid trains, by workdir, shared dense starts included:
    the sweep's time is about their sum times one epoch's."""
    runs = {}
    for method, sparsity, seed in grid(args):
        if method != DENSE and starts_dense(args, method):
            dense = dense_config(args, seed)
            runs[dense.run.workdir] = dense.schedule.dense_epochs
        cfg = (dense_row_config(args, seed) if method == DENSE
               else run_config(args, method, sparsity, seed))
        s = cfg.schedule
        runs[cfg.run.workdir] = ((0 if s.init_checkpoint else s.dense_epochs)
                                 + (0 if s.dense_only else s.pruning_epochs + s.regrowth_epochs))
    return runs


def one_run(cfg: Config) -> dict:
    """The report of a finished run with this config, else a fresh (or resumed) run."""
    path = os.path.join(cfg.run.workdir, "report.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if done["config"] == cfg.flags():
            return done
    os.makedirs(cfg.run.workdir, exist_ok=True)
    try:
        with open(os.path.join(cfg.run.workdir, "log.txt"), "a") as log, \
                contextlib.redirect_stdout(log):
            return run(cfg)
    finally:
        # Every run compiles its own step functions. Kept for the whole sweep, their
        # machine code exhausted the process's memory maps after about 40 VGG runs.
        jax.clear_caches()


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_sparsity"]), []).append(r)
    out = []
    for (method, target), rs in groups.items():
        acc = [r["test_accuracy"] for r in rs]
        out.append({"method": method, "target_sparsity": target, "runs": len(rs),
                    "acc_mean": statistics.mean(acc),
                    "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "sparsity_mean": statistics.mean(r["sparsity"] for r in rs),
                    "wall_time_mean_s": statistics.mean(r["wall_time_s"] for r in rs)})
    return out


def markdown(setting: str, summary: list[dict]) -> str:
    table = outputs.markdown_table(
        ["method", "target", "runs", "test accuracy (mean ± std)", "sparsity", "wall time"],
        [[s["method"], f"{s['target_sparsity']:.2f}", s["runs"],
          f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} %",
          f"{100 * s['sparsity_mean']:.2f} %", f"{s['wall_time_mean_s']:.0f} s"]
         for s in summary])
    return f"# compare: {setting}\n\n{table}"


def plot(fig, setting: str, summary: list[dict]) -> None:
    ax = fig.subplots()
    for s in summary:
        if s["method"] == DENSE:
            ax.axhline(100 * s["acc_mean"], color="black", ls="--", lw=1,
                       label=f"dense ({100 * s['acc_mean']:.2f} %)")
    for method in dict.fromkeys(s["method"] for s in summary if s["method"] != DENSE):
        # At the sparsity reached, not the one asked for: a method that overshoots its
        # target is compared where it actually stands.
        pts = sorted((s["sparsity_mean"], s["acc_mean"], s["acc_std"]) for s in summary
                     if s["method"] == method)
        xs, ys, es = zip(*pts)
        ax.errorbar([100 * x for x in xs], [100 * y for y in ys], [100 * e for e in es],
                    marker="o", capsize=3, lw=2.5 if method == "hyperflows" else 1.2,
                    label=method)
    ax.set_xlabel("achieved sparsity (%), mean over seeds")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"pruning methods at equal epochs: {setting}")
    ax.grid(alpha=0.3)
    ax.legend()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plan:
        runs = plan(args)
        for workdir, epochs in runs.items():
            print(f"{epochs:3d} epochs  {workdir}")
        print(f"{len(runs)} runs, {sum(runs.values())} epochs of training")
        return {"setting": args.setting, "plan": runs}
    env = outputs.environment()
    jobs = grid(args)
    rows, dense_seconds = [], {}
    for method, sparsity, seed in tqdm(jobs, desc="compare", file=sys.stderr):
        seconds = 0.0
        if method != DENSE and starts_dense(args, method):
            if seed not in dense_seconds:
                dense_seconds[seed] = one_run(dense_config(args, seed))["wall_time_s"]
            seconds = dense_seconds[seed]
        result = one_run(dense_row_config(args, seed) if method == DENSE
                         else run_config(args, method, sparsity, seed))
        rows.append({"method": method, "target_sparsity": sparsity, "seed": seed,
                     "test_accuracy": result["test_accuracy"], "sparsity": result["sparsity"],
                     "wall_time_s": seconds + result["wall_time_s"]})
        tqdm.write(f"{method:>10}  target {sparsity:.2f}  seed {seed}  "
                   f"acc {result['test_accuracy']:.4f}  sparsity {result['sparsity']:.4f}  "
                   f"{rows[-1]['wall_time_s']:.0f}s", file=sys.stderr)
    summary = summarize(rows)
    result = {"setting": args.setting, "rows": rows, "summary": summary, "environment": env}
    scaffold.write_results(args.out, "compare", result, markdown(args.setting, summary),
                           lambda fig: plot(fig, args.setting, summary))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
