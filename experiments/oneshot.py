"""One-shot pruning of a trained model by every importance measure, then one epoch of
fine-tuning: what ``hf.prune`` keeps, unstructured (90 %) and N:M (2:4).

    python -m experiments.oneshot --out=results/oneshot
    python -m experiments.oneshot --quick --out=/tmp/oneshot

LeNet-300-100 on MNIST (``--dataset``, an npz path or a tfds name) is trained dense,
then for each measure of ``hf.importance`` and each sparsity pattern, from the same
trained params: ``hf.prune`` (gradients on class-balanced batches, ``--per_class``
examples of each class), the test accuracy right after, and after ``--finetune_epochs``
with the masks fixed (``hf.fixed_masks``) at a tenth of the dense learning rate, in a
plain optax loop (``plain_loop``), as a user's own would be. Writes oneshot.json,
oneshot.md and oneshot.png to --out; the default run takes about 2 minutes on 2 CPU
cores.
"""

from __future__ import annotations

import time

import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from experiments import plain_loop as loop
from experiments import scaffold
from hflows_jax import masking, models
from hflows_jax.training import outputs
from hflows_jax.training.presets import SHARED_DATA

PATTERNS = (("global", 0.9), ("2:4", None))  # (distribution, sparsity)


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.oneshot", __doc__, "workdir/oneshot",
                        "2 dense epochs and 2 measures: under a minute")
    p.add_argument("--dataset", default=f"npz:{SHARED_DATA}/mnist.npz")
    p.add_argument("--model", default="lenet300", choices=sorted(models.MODELS))
    p.add_argument("--measures", default=",".join(hf.importance.MEASURES))
    p.add_argument("--dense_epochs", type=int, default=10)
    p.add_argument("--finetune_epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05, help="the dense phase's peak lr")
    p.add_argument("--per_class", type=int, default=100,
                   help="class-balanced examples per class for the gradients")
    p.add_argument("--seed", type=int, default=0)
    args = scaffold.parse(p, argv, {"dense_epochs": 2, "measures": "magnitude,grasp"})
    args.measures = args.measures.split(",")
    for name in args.measures:
        hf.importance.measure(name)  # a clear error for an unknown one
    return args


def measure(args) -> tuple[float, list[dict]]:
    data = loop.load(args.dataset, augment=False)
    model = models.create(args.model, data.raw.num_classes)
    params, stats = loop.init(model, data, args.seed)
    steps = args.dense_epochs * (len(data.raw.x_train) // loop.BATCH)
    dense_tx = optax.sgd(optax.cosine_decay_schedule(args.lr, steps), momentum=0.9)
    start = time.time()
    params, stats, _, _ = loop.train(model, params, stats, dense_tx, data, args.dense_epochs,
                                     args.seed)
    dense = loop.accuracy(model, params, stats, data)
    print(f"dense: {100 * dense:.2f} % after {args.dense_epochs} epochs "
          f"({time.time() - start:.0f} s)")
    scoring = data.scoring(args.per_class, args.seed)
    rows = []
    for name, (distribution, sparsity) in tqdm(
            [(m, p) for m in args.measures for p in PATTERNS], desc="oneshot"):
        masks = hf.prune(params, name, sparsity, distribution=distribution,
                         loss_fn=loop.eval_loss(model, stats), batches=scoring)
        pruned = hf.multiply_masks(params, masks)
        tx = optax.chain(hf.fixed_masks(masks), optax.sgd(args.lr / 10, momentum=0.9))
        tuned, tuned_stats, _, _ = loop.train(model, pruned, stats, tx, data,
                                              args.finetune_epochs, args.seed + 1)
        kept, total = masking.count_present(masks)
        rows.append({"measure": name, "pattern": distribution if sparsity is None else
                     f"{100 * sparsity:g} %", "sparsity": 1 - float(kept) / total,
                     "pruned_accuracy": loop.accuracy(model, pruned, stats, data),
                     "finetuned_accuracy": loop.accuracy(model, tuned, tuned_stats, data)})
        tqdm.write(f"{name:28s} {rows[-1]['pattern']:5s} pruned "
                   f"{100 * rows[-1]['pruned_accuracy']:.2f} %  fine-tuned "
                   f"{100 * rows[-1]['finetuned_accuracy']:.2f} %")
    return dense, rows


def markdown(result: dict) -> str:
    dense = result["dense_accuracy"]
    table = outputs.markdown_table(
        ["measure", "pattern", "sparsity", "pruned", "after fine-tuning", "vs dense"],
        [[r["measure"], r["pattern"], f"{100 * r['sparsity']:.1f} %",
          f"{100 * r['pruned_accuracy']:.2f} %", f"{100 * r['finetuned_accuracy']:.2f} %",
          f"{100 * (r['finetuned_accuracy'] - dense):+.2f}"] for r in result["rows"]])
    return (f"# oneshot: {result['model']} on {result['dataset']}\n\nDense: "
            f"{100 * dense:.2f} % after {result['dense_epochs']} epochs. Each row prunes "
            f"the same trained params once (hf.prune) and fine-tunes "
            f"{result['finetune_epochs']} epoch(s) with the masks fixed.\n\n{table}\n")


def plot(fig, result: dict) -> None:
    ax = fig.subplots()
    rows, dense = result["rows"], result["dense_accuracy"]
    names = list(dict.fromkeys(r["measure"] for r in rows))
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    width = 0.8 / len(patterns)
    for i, pattern in enumerate(patterns):
        mine = {r["measure"]: r for r in rows if r["pattern"] == pattern}
        xs = np.arange(len(names)) + i * width
        ax.bar(xs, [100 * (mine[n]["finetuned_accuracy"] - dense) for n in names], width,
               label=f"{pattern}, fine-tuned")
        ax.plot(xs, [100 * (mine[n]["pruned_accuracy"] - dense) for n in names], "k_",
                markersize=10)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel("test accuracy - dense (points)")
    ax.set_title(f"{result['model']}: one-shot pruning (bars: fine-tuned; ticks: pruned)",
                 fontsize=9)
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -20))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def main(argv=None) -> dict:
    args = parse_args(argv)
    dense, rows = measure(args)
    result = {"model": args.model, "dataset": args.dataset, "dense_epochs": args.dense_epochs,
              "finetune_epochs": args.finetune_epochs, "per_class": args.per_class,
              "seed": args.seed, "dense_accuracy": dense, "rows": rows,
              "environment": outputs.environment()}
    scaffold.write_results(args.out, "oneshot", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
