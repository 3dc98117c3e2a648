"""Where Hyperflows stands on a BatchNorm net, read from a finished run's checkpoints.

    python -m experiments.evidence --run=HF_RUN --erk_run=ERK_RUN --out=DIR

HF_RUN is a Hyperflows run (``experiments.cifar`` or a compare run) trained with
``--keep_checkpoints=0``, so every epoch's checkpoint is there; ERK_RUN a random-ERK
run at the same target (e.g. compare's ``random_s0.95_seed0``). Writes evidence.json,
evidence.md and evidence.png to --out:

- per-layer sparsity of Hyperflows beside ERK's;
- flows per filter at the end of pruning: for each layer, the median over its output
  units of |sum of the unit's flows| / (sum of their magnitudes), over its present
  weights. A BatchNorm after a conv makes the output invariant to the scale of each
  filter, so W . dL/dW = 0 per filter: this ratio is ~0, and the flows of a filter's
  weights only move presence between them. Without BatchNorm (the last dense layer) it
  is not;
- presence-score histograms at several epochs of the pruning phase.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

import hflows_jax as hf
from experiments import scaffold
from hflows_jax import methods
from hflows_jax.training import Config, open_run, outputs
from hflows_jax.training.runs import scoring


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.evidence", __doc__, "workdir/evidence",
                        "flows from 1 batch instead of 4")
    p.add_argument("--run", required=True, help="a Hyperflows run's workdir")
    p.add_argument("--erk_run", required=True, help="a random-ERK run's workdir")
    p.add_argument("--batches", type=int, default=4, help="batches the flows average over")
    return scaffold.parse(p, argv, {"batches": 1})


def pruning_states(cfg: Config):
    """The run's data and ``[(epoch, state)]`` for every pruning checkpoint."""
    run = open_run(cfg, axis_name=None, dtype=jnp.float32)
    ckpt, template = run.checkpoints("pruning"), run.template("pruning")
    try:
        return run.inputs, [(e, ckpt.restore(e, template)[0]) for e in ckpt.epochs()]
    finally:
        ckpt.close()


def filter_balance(state, cfg: Config, inputs, num_batches: int) -> dict[str, float]:
    """Per layer: the median over output units of |sum of flows| / sum |flows|."""
    weights = hf.apply_masks(state.params, state.opt_state)
    # The training loss on the first training batches, BatchNorm on batch statistics.
    score = scoring(cfg, inputs, methods.get(cfg.method.name), state.batch_stats,
                    num_batches)
    grad = jax.jit(jax.grad(score.loss_fn))
    grads = [grad(weights, batch) for batch in score.batches]
    mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    flows = hf.flows(weights, mean_grad, state.opt_state)
    masks = hf.masks(state.opt_state)
    out = {}
    for (path, f), m in zip(jax.tree.flatten_with_path(flows)[0], jax.tree.leaves(masks)):
        f = np.asarray(f * m).reshape(-1, f.shape[-1])  # (fan-in, output units)
        mass = np.abs(f).sum(0)
        alive = mass > 0
        if alive.any():
            out[jax.tree_util.keystr(path, simple=True, separator="/")] = float(np.median(
                np.abs(f.sum(0))[alive] / mass[alive]))
    return out


def presence_histograms(states, bins: np.ndarray, picks: int = 5) -> dict[int, list[int]]:
    chosen = states[:: max(1, len(states) // picks)][:picks] + states[-1:]
    hists = {}
    for epoch, state in dict(chosen).items():
        t = np.concatenate([np.ravel(x) for x in
                            jax.tree.leaves(hf.find_pruner_state(state.opt_state).presence)])
        hists[epoch] = np.histogram(np.clip(t, bins[0], bins[-1]), bins)[0].tolist()
    return hists


def in_network_order(layers: dict) -> dict:
    """Conv_2 before Conv_10: numbers in names compared as numbers."""
    key = lambda name: [int(t) if t.isdigit() else t  # noqa: E731
                        for t in re.split(r"(\d+)", name)]
    return {k: layers[k] for k in sorted(layers, key=key)}


def markdown(result: dict) -> str:
    erk = result["erk_layer_sparsity"]
    balance = result["filter_balance"]
    rows = [[k, f"{100 * v:.1f} %", f"{100 * erk[k]:.1f} %",
             f"{balance[k]:.4f}" if k in balance else "no weights left"]
            for k, v in result["layer_sparsity"].items()]
    table = outputs.markdown_table(
        ["layer", "Hyperflows sparsity", "random-ERK sparsity",
         "flow balance (median |sum of a unit's flows| / sum of |flows|)"], rows)
    return (f"# evidence: {result['run']}\n\nHyperflows {100 * result['accuracy']:.2f} % at "
            f"{100 * result['sparsity']:.2f} %; random-ERK {100 * result['erk_accuracy']:.2f} %"
            f" at {100 * result['erk_sparsity']:.2f} %.\n\n{table}\n")


def plot(fig, result: dict) -> None:
    a, b, c = fig.subplots(1, 3)
    names = list(result["layer_sparsity"])
    x = np.arange(len(names))
    a.bar(x - 0.2, [100 * result["layer_sparsity"][k] for k in names], 0.4, label="Hyperflows")
    a.bar(x + 0.2, [100 * result["erk_layer_sparsity"][k] for k in names], 0.4,
          label="random-ERK")
    a.set_xticks(x, [k.split("/")[0] for k in names], rotation=90, fontsize=6)
    a.set_ylabel("sparsity (%)")
    a.legend(fontsize=7)
    balance = result["filter_balance"]
    b.bar(range(len(balance)), list(balance.values()))
    b.set_xticks(range(len(balance)), [k.split("/")[0] for k in balance], rotation=90,
                 fontsize=6)
    b.set_ylabel("|sum of a unit's flows| / sum |flows|")
    centers = np.convolve(result["bins"], [0.5, 0.5], "valid")
    for epoch, counts in result["presence_histograms"].items():
        c.plot(centers, counts, label=f"epoch {epoch}")
    c.set_yscale("log")
    c.axvline(0, color="black", lw=0.8)
    c.set_xlabel("presence score T (kept: T >= 0)", fontsize=8)
    c.legend(fontsize=7)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report, erk = scaffold.read_report(args.run), scaffold.read_report(args.erk_run)
    cfg = Config().replace(**{**report["config"], "workdir": args.run})
    inputs, states = pruning_states(cfg)
    if len(states) < 2:
        raise FileNotFoundError(f"{args.run} kept {len(states)} pruning checkpoint(s): "
                                "train it with --keep_checkpoints=0.")
    pruning_end = states[0][0] + cfg.schedule.pruning_epochs - 1
    end = [s for e, s in states if e <= pruning_end][-1]
    bins = np.linspace(-0.5, 0.5, 41)
    result = {
        "run": args.run, "erk_run": args.erk_run,
        "accuracy": report["test_accuracy"], "sparsity": report["sparsity"],
        "erk_accuracy": erk["test_accuracy"], "erk_sparsity": erk["sparsity"],
        "layer_sparsity": in_network_order(report["layer_sparsity"]),
        "erk_layer_sparsity": erk["layer_sparsity"],
        "filter_balance": in_network_order(
            filter_balance(end, cfg, inputs, args.batches)),
        "bins": bins.tolist(),
        "presence_histograms": presence_histograms(states, bins),
        "environment": outputs.environment(),
    }
    scaffold.write_results(args.out, "evidence", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
