"""Structured pruning at FLOP targets: accuracy, FLOPs and parameters kept, and the measured
speed-up of the exported model.

    python -m experiments.structured --out=results/structured
    python -m experiments.structured --quick --out=/tmp/structured

Methods x FLOP-reduction targets x seeds on a setting of ``experiments.compare`` (its
preset, its shared dense runs, its resumable run directories under OUT/runs), every model
with a trained BatchNorm scale (``--train_bn_scale=true``, the same model for every
method; channel Hyperflows needed it while its flows came from the BatchNorm side). For each finished run the last checkpoint is
exported (``hf.export``) and timed against the masked dense model at batch 1 and 256
(median of interleaved calls, ``experiments.export``). Row fields::

    method, flops_target, seed, test_accuracy,
    flops_fraction   multiply-adds the exported model runs / the dense model's
    params_fraction  parameters of the exported model / the dense model's
    speedup_b1, speedup_b256
    speedup_b256_x8  the exported model with its channel counts rounded up to multiples
                     of 8 (zeros), at batch 256

Methods: ``hyperflows_channel`` and FTWT (``ftwt``) prune the shared dense model; DHP
trains its hypernetwork model from initialization for as many epochs in all: by default
``dhp_reach``, whose search can reach the target in them (``--methods=dhp`` for DHP's own
reg, which at these lengths ends far short of it).
FTWT's masks change with the input: its ``flops_fraction`` is the mean executed over the
test set, its ``params_fraction`` counts its gating heads on top of the whole backbone, and
it has no exported model (speed-ups null). Unstructured Hyperflows (``hyperflows``) runs at
a weight sparsity equal to the FLOP target, for contrast: its ``flops_fraction`` is what
the exported model still runs. Writes structured.json, structured.md and structured.png to
--out. Defaults (cifar10_5k: 50/70/85 % x 2 seeds x 4 methods) take about 70 minutes on 2
CPU cores.
"""

from __future__ import annotations

import os
import statistics
import sys

import jax
import numpy as np
from tqdm import tqdm

from experiments import compare, scaffold
from experiments import export as export_tools
from hflows_jax import methods, models
from hflows_jax.training import Config, outputs
from hflows_jax.training.checkpoint import checkpoint_dir

# Every channel method, and unstructured Hyperflows for contrast.
METHODS = tuple(m.name for m in methods.REGISTRY.values() if m.target == "flops") + (
    "hyperflows",)
# By default DHP with the reg that reaches its target in the run's epochs: at DHP's own
# reg a search this short ends far short of it (README, "DHP as its authors run it").
DEFAULT_METHODS = tuple(m for m in METHODS if m != "dhp")
REPEATS = 50  # timed calls per model and batch size
QUICK_WIDTH = 0.0625  # the VGG-19 of --quick
# The exported model is also timed with its channel counts rounded up to a multiple of
# this (hf.export's channel_multiple): thin convs with odd counts run slow on XLA:CPU
# (experiments.conv_speed).
CHANNEL_MULTIPLE = 8
# Below this fraction of the multiply-adds a run has lost every channel of some layer: its
# exported model is a constant, and its speed-ups mean nothing.
COLLAPSED = 0.01


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.structured", __doc__, "workdir/structured",
                        "one target, one seed, the setting's quick preset: under 5 minutes")
    p.add_argument("--setting", default="cifar10_5k", choices=list(compare.SETTINGS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--targets", default="0.5,0.7,0.85",
                   help="FLOP-reduction targets (fractions of the multiply-adds removed)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1")
    p.add_argument("--dataset", default=None, help="override the setting's npz:PATH")
    p.add_argument("--model", default=None, choices=sorted(models.BATCHNORM_MODELS),
                   help="override the setting's model (DHP and FTWT take vgg19 and the "
                        "basic-block ResNets); give each model its own --out")
    p.add_argument("--width", type=float, default=None, help="override the model's width")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per batch size")
    args = scaffold.parse(p, argv, {"targets": "0.5", "seeds": 1, "repeats": 10})
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}: choose from {list(METHODS)}")
    args.targets = [float(t) for t in args.targets.split(",")]
    if any(not 0 < t < 1 for t in args.targets) or args.seeds < 1:
        p.error("targets must lie in (0, 1) and --seeds be >= 1")
    return args


def structured(cfg: Config, args) -> Config:
    """Every run with a trained BatchNorm scale; with --quick a narrow VGG-19 instead of
    the quick preset's LeNet-5 (DHP and FTWT build on VGG and ResNets); --model and
    --width over either."""
    over = {"model": "vgg19", "width": QUICK_WIDTH} if args.quick else {}
    over.update({k: v for k, v in (("model", args.model), ("width", args.width)) if v})
    return cfg.replace(train_bn_scale=True, **over)


def dense_config(args, seed: int) -> Config:
    """The shared dense start."""
    return structured(compare.dense_config(args, seed), args).replace(
        workdir=os.path.join(args.out, "runs", f"dense_bn_scale_seed{seed}"))


def run_config(args, method: str, target: float, seed: int) -> Config:
    """compare's run (same preset and layout), from that dense start."""
    cfg = structured(compare.run_config(args, method, target, seed), args)
    if cfg.schedule.init_checkpoint:
        cfg = cfg.replace(init_checkpoint=checkpoint_dir(dense_config(args, seed).run.workdir,
                                                         "dense"))
    return cfg


def measure(cfg: Config, report: dict, repeats: int) -> dict:
    """The run's row (``Method.structured_row``): by default, the exported model's
    fractions and its speed-up over the masked dense model."""
    run, epoch, state = export_tools.restore_last(cfg)

    def exported() -> dict:
        dense, compacted = export_tools.predict_functions(run, state, epoch)
        compact, compact_model = compacted(bcsr=False)
        padded, _ = compacted(bcsr=False, channel_multiple=CHANNEL_MULTIPLE)
        fns = {"dense": jax.jit(dense), "compact": jax.jit(compact),
               "padded": jax.jit(padded)}
        ms = {b: export_tools.latency(fns, run.inputs.data.x_test, b, repeats, warmup=3)
              for b in (1, 256)}
        return {"flops_fraction": compact_model.macs / compact_model.dense_macs,
                "params_fraction": compact_model.params_compact / compact_model.params_dense,
                "speedup_b1": ms[1]["dense"] / ms[1]["compact"],
                "speedup_b256": ms[256]["dense"] / ms[256]["compact"],
                "speedup_b256_x8": ms[256]["dense"] / ms[256]["padded"]}

    return run.method.structured_row(report, state, exported)


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["flops_target"]), []).append(r)

    def mean(values):
        return None if None in values else statistics.mean(values)

    return [{"method": m, "flops_target": t, "runs": len(rs),
             **{k: mean([r[k] for r in rs])
                for k in ("test_accuracy", "flops_fraction", "params_fraction", "speedup_b1",
                          "speedup_b256", "speedup_b256_x8")}}
            for (m, t), rs in groups.items()]


def times(speedup: float | None) -> str:
    return "n/a (per input)" if speedup is None else f"{speedup:.2f}x"


def markdown(setting: str, summary: list[dict], rows: list[dict]) -> str:
    """``setting``: the setting and its model, as the title says them."""
    table = outputs.markdown_table(
        ["method", "FLOP target", "runs", "test accuracy", "FLOPs kept", "params kept",
         "speed-up b1", "speed-up b256", f"b256, x{CHANNEL_MULTIPLE} channels"],
        [[s["method"], f"{s['flops_target']:.2f}", s["runs"],
          f"{100 * s['test_accuracy']:.2f} %", f"{100 * s['flops_fraction']:.1f} %",
          f"{100 * s['params_fraction']:.1f} %", times(s['speedup_b1']),
          times(s['speedup_b256']), times(s['speedup_b256_x8'])] for s in summary])
    empty = [f"{r['method']} (target {r['flops_target']:.2f}, seed {r['seed']})"
             for r in rows if r["flops_fraction"] < COLLAPSED]
    note = (f"\n\nRuns that lost every channel of some layer (their exported model is a "
            f"constant, their speed-ups mean nothing; the plot leaves them out): "
            f"{', '.join(empty)}." if empty else "")
    return (f"# structured: {setting}\n\nMeans over seeds. FLOPs and params kept: the "
            f"exported model's over the dense model's (ftwt: the mean executed over the test "
            f"set, and the params of its whole backbone and gating heads). Speed-ups: "
            f"exported model against the masked dense model, median of interleaved calls."
            f"\n\n{table}{note}")


def plot(fig, setting: str, rows: list[dict]) -> None:
    """Every run, not means: one seed that collapses would drag a mean anywhere."""
    a, b = fig.subplots(1, 2)
    rows = [r for r in rows if r["flops_fraction"] >= COLLAPSED]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        flops = np.array([r["flops_fraction"] for r in mine])
        a.plot(100 * flops, [100 * r["test_accuracy"] for r in mine], "o", label=method)
        if mine[0]["speedup_b256"] is not None:
            line, = b.plot(1 / flops, [r["speedup_b256"] for r in mine], "o", label=method)
            b.plot(1 / flops, [r["speedup_b256_x8"] for r in mine], "x",
                   color=line.get_color(), label=f"{method}, x{CHANNEL_MULTIPLE} channels")
    lim = max([1.0] + [1 / r["flops_fraction"] for r in rows])
    b.plot([1, lim], [1, lim], color="gray", ls=":", lw=0.8, label="in proportion")
    a.set_xlabel("FLOPs kept (% of dense)")
    a.set_ylabel("test accuracy (%)")
    b.set_xlabel("FLOP reduction (dense / kept)")
    b.set_ylabel("measured speed-up, batch 256")
    a.set_title(setting)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = outputs.environment()
    jobs = [(m, t, seed) for t in args.targets for seed in range(args.seeds)
            for m in args.methods]
    rows = []
    for method, target, seed in tqdm(jobs, desc="structured", file=sys.stderr):
        if compare.starts_dense(args, method):
            compare.one_run(dense_config(args, seed))
        cfg = run_config(args, method, target, seed)
        report = compare.one_run(cfg)
        rows.append({"method": method, "flops_target": target, "seed": seed,
                     "test_accuracy": report["test_accuracy"],
                     **measure(cfg, report, args.repeats)})
        tqdm.write(f"{method:>18}  target {target:.2f}  seed {seed}  "
                   f"acc {rows[-1]['test_accuracy']:.4f}  "
                   f"flops {rows[-1]['flops_fraction']:.3f}  "
                   f"b256 {times(rows[-1]['speedup_b256'])}", file=sys.stderr)
    summary = summarize(rows)
    model = dense_config(args, 0).model
    setting = f"{args.setting}, {model.name} x{model.width:g}"
    result = {"setting": args.setting, "model": model.name, "width": model.width, "rows": rows,
              "summary": summary, "environment": env,
              "methods": {m: methods.get(m).target for m in args.methods}}
    scaffold.write_results(args.out, "structured", result,
                           markdown(setting, summary, rows),
                           lambda fig: plot(fig, setting, rows))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
