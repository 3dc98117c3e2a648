"""The gradient-flow framework's three claims (Lubana and Dick, ICLR 2021), tested here.

    python -m experiments.gradient_flow --setting=mnist --out=results/gradient_flow_mnist
    python -m experiments.gradient_flow --setting=cifar10_5k --out=results/gradient_flow_cifar
    python -m experiments.gradient_flow --quick --out=/tmp/gradient_flow

A dense model trains at a constant lr; at each of two times (an early one, the model
minimally trained, and a late one) every measure of ``hf.importance`` prunes the same
fraction of filters (neurons, for LeNet-300-100) once, ranked globally with every layer
keeping 5 % of its filters plus one, as the seed code does (``hf.prune`` with the traced
graph's groups; gradients in eval mode on class-balanced batches), and the pruned model
trains on for the same epochs (cosine from the same lr). Right after pruning, BatchNorm's
statistics are re-estimated on the pruned network (32 training batches): the running
ones describe the dense network. Recorded per run: the loss,
‖θ‖², θᵀg and ‖g‖² on the scoring batches just before and just after pruning, the
training loss of every epoch after, and the test accuracy right after pruning and at the
end. The claims, as checked here:

1. Magnitude pruning (θ², the seed code's ``mag_based``) removes what contributes least to
   the loss's decrease, so the pruned model converges faster: at the late time its training
   loss in the first epoch after pruning is below loss preservation's (|θ·g|).
2. Loss preservation (|θ·g|) keeps the first-order dynamics and suits minimally trained
   models: at the early time it changes the loss less on pruning than magnitude does, and
   ends at least as accurate.
3. Raising the gradient norm (GraSP, θ·Hg) hurts and preserving it (|θ·Hg|) does better:
   GraSP raises ‖g‖² on pruning, and ends below gradient-norm preservation at both times.

Writes gradient_flow.json, .md (the numbers and each claim's yes or no) and .png (the
training loss after pruning) to --out. mnist: about 3 minutes on 2 CPU cores;
cifar10_5k: about 25.
"""

from __future__ import annotations

import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from experiments import plain_loop as loop
from experiments import scaffold
from hflows_jax import models
from hflows_jax.training import outputs
from hflows_jax.training.presets import SHARED_DATA

# Every layer keeps at least 5 % of its filters, plus one: the seed code's floor
# (pruner.py, constrain_ratios). Without it the global ranking empties whole layers.
MIN_FRACTION = 0.05
SETTINGS = {
    "mnist": dict(dataset=f"npz:{SHARED_DATA}/mnist.npz", model="lenet300", width=1.0,
                  augment=False, lr=0.05, times=(1, 8), after=4, sparsity=0.75),
    "cifar10_5k": dict(dataset=f"npz:{SHARED_DATA}/cifar10_5k.npz", model="vgg19",
                       width=0.125, augment=True, lr=0.05, times=(1, 15), after=8,
                       sparsity=0.5),
}


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.gradient_flow", __doc__,
                        "workdir/gradient_flow", "mnist, times 1 and 2, 1 epoch after, "
                        "3 measures: under a minute")
    p.add_argument("--setting", default="mnist", choices=list(SETTINGS))
    p.add_argument("--dataset", default=None, help="override the setting's data set")
    p.add_argument("--measures", default=",".join(hf.importance.MEASURES))
    p.add_argument("--times", default=None,
                   help="comma-separated dense epochs before pruning (default: the "
                        "setting's, an early and a late one)")
    p.add_argument("--after", type=int, default=None, help="epochs after pruning")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of the filters (neurons) pruned")
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = scaffold.parse(p, argv, {"times": "1,2", "after": 1,
                                    "measures": "magnitude_squared,loss_preservation,grasp"})
    setting = SETTINGS[args.setting]
    args.dataset = args.dataset or setting["dataset"]
    args.times = (tuple(int(t) for t in args.times.split(",")) if args.times
                  else setting["times"])
    args.after = args.after or setting["after"]
    args.sparsity = args.sparsity or setting["sparsity"]
    args.measures = args.measures.split(",")
    for name in args.measures:
        hf.importance.measure(name)
    if list(args.times) != sorted(set(args.times)) or args.times[0] < 0:
        p.error(f"--times must increase from >= 0, got {args.times}")
    if not 0 < args.sparsity < 1:
        p.error(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    return args


def dynamics(loss_fn, params, batches) -> dict:
    """The loss, ‖θ‖², θᵀg and ‖g‖² on ``batches`` (the framework's quantities)."""
    g = hf.importance.gradient(loss_fn, params, batches)
    return {"loss": float(np.mean([loss_fn(params, b) for b in batches])),
            "norm2": float(optax.tree.norm(params, squared=True)),
            "theta_g": float(optax.tree.vdot(params, g)),
            "grad_norm2": float(optax.tree.norm(g, squared=True))}


def measure(args) -> list[dict]:
    setting = SETTINGS[args.setting]
    data = loop.load(args.dataset, setting["augment"])
    model = models.create(setting["model"], data.raw.num_classes, width=setting["width"])
    params, stats = loop.init(model, data, args.seed)
    groups = hf.structured.channel_groups(
        lambda p, x: model.apply(loop.variables(p, stats), x, train=False), params,
        data.x_test[:1])
    scoring = data.scoring(args.per_class, args.seed)
    dense_tx = optax.sgd(setting["lr"], momentum=0.9)
    after_steps = args.after * (len(data.raw.x_train) // loop.BATCH)
    rows, done = [], 0
    bar = tqdm(total=len(args.times) * len(args.measures), desc="gradient_flow")
    for time in args.times:
        params, stats, _, _ = loop.train(model, params, stats, dense_tx, data, time - done,
                                         args.seed + done)
        done = time
        loss_fn = loop.eval_loss(model, stats)
        before = dynamics(loss_fn, params, scoring)
        for name in args.measures:
            masks = hf.prune(params, name, args.sparsity, groups=groups, loss_fn=loss_fn,
                             batches=scoring, min_fraction=MIN_FRACTION)
            pruned = hf.multiply_masks(params, masks)
            pruned_stats = loop.reestimated(model, pruned, stats, data, seed=args.seed)
            tx = optax.chain(hf.fixed_masks(masks), optax.sgd(
                optax.cosine_decay_schedule(setting["lr"], after_steps), momentum=0.9))
            final, final_stats, _, losses = loop.train(model, pruned, pruned_stats, tx, data,
                                                       args.after, args.seed + 1000)
            rows.append({"time": time, "measure": name, "before": before,
                         "after": dynamics(loop.eval_loss(model, pruned_stats), pruned,
                                           scoring),
                         "pruned_accuracy": loop.accuracy(model, pruned, pruned_stats, data),
                         "train_loss": losses,
                         "final_accuracy": loop.accuracy(model, final, final_stats, data)})
            bar.update()
            bar.write(f"epoch {time:3d}  {name:28s} loss {before['loss']:.3f} -> "
                      f"{rows[-1]['after']['loss']:.3f}  then {losses[0]:.3f}  final acc "
                      f"{100 * rows[-1]['final_accuracy']:.2f} %")
    bar.close()
    return rows


def claims(rows: list[dict], times: tuple) -> list[dict]:
    """Each claim's verdict with the numbers it rests on; None where a measure it needs
    was not run."""
    at = {(r["time"], r["measure"]): r for r in rows}
    early, late = times[0], times[-1]

    def get(time, name):
        return at.get((time, name))

    out = []
    mag, lp = get(late, "magnitude_squared"), get(late, "loss_preservation")
    out.append({"claim": "1. magnitude pruning converges faster (late time: first-epoch "
                         "training loss, θ² below |θ·g|)",
                "holds": None if not (mag and lp) else
                mag["train_loss"][0] < lp["train_loss"][0],
                "numbers": None if not (mag and lp) else
                f"θ² {mag['train_loss'][0]:.4f}, |θ·g| {lp['train_loss'][0]:.4f}"})
    mag, lp = get(early, "magnitude_squared"), get(early, "loss_preservation")

    def jump(r):
        return abs(r["after"]["loss"] - r["before"]["loss"])

    out.append({"claim": "2. loss preservation suits minimally trained models (early time: "
                         "|θ·g| changes the loss less on pruning and ends at least as "
                         "accurate as θ²)",
                "holds": None if not (mag and lp) else
                jump(lp) < jump(mag) and lp["final_accuracy"] >= mag["final_accuracy"],
                "numbers": None if not (mag and lp) else
                f"loss change |θ·g| {jump(lp):.4f}, θ² {jump(mag):.4f}; final accuracy "
                f"|θ·g| {100 * lp['final_accuracy']:.2f} %, θ² "
                f"{100 * mag['final_accuracy']:.2f} %"})
    def growth(r):
        return r["after"]["grad_norm2"] / r["before"]["grad_norm2"]

    pairs = [(get(t, "grasp"), get(t, "gradient_norm_preservation")) for t in times]
    complete = all(a and b for a, b in pairs)
    out.append({"claim": "3. raising the gradient norm hurts (GraSP raises ‖g‖² on pruning "
                         "and ends below |θ·Hg| at every time)",
                "holds": None if not complete else all(
                    growth(a) > 1 and a["final_accuracy"] < b["final_accuracy"]
                    for a, b in pairs),
                "numbers": None if not complete else "; ".join(
                    f"epoch {a['time']}: ‖g‖² x{growth(a):.2f} (|θ·Hg| x{growth(b):.2f}), "
                    f"accuracy {100 * a['final_accuracy']:.2f} against "
                    f"{100 * b['final_accuracy']:.2f} %" for a, b in pairs)})
    return out


def markdown(result: dict) -> str:
    table = outputs.markdown_table(
        ["epoch", "measure", "loss: before -> after", "‖θ‖² after/before",
         "θᵀg: before -> after", "‖g‖² after/before", "train loss, epoch 1 after",
         "test acc: pruned", "final"],
        [[r["time"], r["measure"], f"{r['before']['loss']:.3f} -> {r['after']['loss']:.3f}",
          f"{r['after']['norm2'] / r['before']['norm2']:.3f}",
          f"{r['before']['theta_g']:.2e} -> {r['after']['theta_g']:.2e}",
          f"{r['after']['grad_norm2'] / r['before']['grad_norm2']:.2f}",
          f"{r['train_loss'][0]:.4f}", f"{100 * r['pruned_accuracy']:.2f} %",
          f"{100 * r['final_accuracy']:.2f} %"] for r in result["rows"]])
    verdicts = "\n".join(
        f"- {c['claim']}: **{ {True: 'yes', False: 'no', None: 'not run'}[c['holds']] }**"
        + (f" ({c['numbers']})" if c["numbers"] else "") for c in result["claims"])
    return (f"# gradient_flow: {result['setting']} ({result['model']})\n\nEvery measure "
            f"prunes {100 * result['sparsity']:g} % of the filters once, after "
            f"{' and after '.join(map(str, result['times']))} dense epochs, then trains "
            f"{result['after']} epochs. Loss, ‖θ‖², θᵀg and ‖g‖² on the scoring batches "
            f"(eval mode).\n\n{verdicts}\n\n{table}\n")


def plot(fig, result: dict) -> None:
    axes = fig.subplots(1, len(result["times"]), squeeze=False)[0]
    for ax, time in zip(axes, result["times"]):
        for r in result["rows"]:
            if r["time"] == time:
                ax.plot(range(0, len(r["train_loss"]) + 1),
                        [r["after"]["loss"]] + r["train_loss"], marker="o", ms=3,
                        label=r["measure"])
        ax.set_title(f"pruned after {time} epoch(s)", fontsize=9)
        ax.set_xlabel("epochs after pruning (0: eval loss when pruned)", fontsize=8)
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = measure(args)
    setting = SETTINGS[args.setting]
    result = {"setting": args.setting, "model": setting["model"], "dataset": args.dataset,
              "times": list(args.times), "after": args.after, "sparsity": args.sparsity,
              "per_class": args.per_class, "seed": args.seed, "rows": rows,
              "claims": claims(rows, args.times), "environment": outputs.environment()}
    scaffold.write_results(args.out, "gradient_flow", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
