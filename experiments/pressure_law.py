"""The pressure law and the neural pruning law, measured on LeNet-300-100 / MNIST.

    python -m experiments.pressure_law --out=results/pressure_law
    python -m experiments.pressure_law --quick --out=/tmp/pl

1. Constant-pressure runs over pressures spanning two decades, each from the same dense
   start and trained until the density settles. Fits ``density = c * gamma^(-alpha)``
   and the generalized ``ln S = ln c - a0 ln gamma - a1 (ln gamma)^2`` (METHOD.md 6).
2. Along one run, the smallest non-zero |flow| among present weights against density,
   and its power-law fit: the paper's neural pruning law. (Weights feeding dead ReLU
   units have exactly zero flow; they would pin the minimum at 0.)

Writes pressure_law.json, pressure_law.md and pressure_law.png to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from hflows_jax import data, masking, models
from hflows_jax.training import report
from hflows_jax.training.step import smoothed_cross_entropy

STE = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.pressure_law", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="npz:../shared/data/mnist.npz")
    p.add_argument("--gamma_min", type=float, default=0.1)
    p.add_argument("--gamma_max", type=float, default=10.0)
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--dense_epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30, help="epochs per constant-pressure run")
    p.add_argument("--train_examples", type=int, default=None,
                   help="use the first N training images (default: all)")
    p.add_argument("--settle_tol", type=float, default=0.02,
                   help="settled when the density moved less than this (relative) in the "
                        "last epoch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--presence_lr", type=float, default=1e-2,
                   help="larger than the recipe's 1e-3, so that each run settles sooner")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20k images, 8 epochs: a few minutes")
    p.add_argument("--out", default="workdir/pressure_law")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # explicit flags still win
        p.set_defaults(train_examples=20000, epochs=8, dense_epochs=1)
    args = p.parse_args(argv)
    if not 0 < args.gamma_min < args.gamma_max or args.points < 3:
        p.error("need 0 < --gamma_min < --gamma_max and --points >= 3")
    return args


def power_fit(x: np.ndarray, y: np.ndarray, degree: int = 1) -> tuple[np.ndarray, float]:
    """Polynomial fit of ln y on ln x, and its R^2 in log space."""
    lx, ly = np.log(x), np.log(y)
    coef = np.polyfit(lx, ly, degree)
    residual = ly - np.polyval(coef, lx)
    r2 = 1.0 - np.sum(residual ** 2) / np.sum((ly - ly.mean()) ** 2)
    return coef, float(r2)


class Trainer:
    """A jitted LeNet-300-100 loop shared by every constant-pressure run."""

    def __init__(self, args):
        ds = data.load_dataset(args.dataset)
        n = args.train_examples or len(ds.x_train)
        self.mean, self.std = data.channel_stats(ds.x_train[:n])
        self.x = data.normalize(ds.x_train[:n], self.mean, self.std)
        self.y = ds.y_train[:n]
        self.x_test = data.normalize(ds.x_test, self.mean, self.std)
        self.y_test = ds.y_test
        self.args = args
        self.model = models.create("lenet300", ds.num_classes)
        self.probe = (self.x[:2048], self.y[:2048])  # fixed batch for the flow statistics

    def loss(self, params, x, y):
        return smoothed_cross_entropy(self.model.apply({"params": params}, x), y, 0.0)

    def make_step(self, tx, pruned):
        @jax.jit
        def step(params, opt_state, x, y):
            weights = hf.apply_masks(params, opt_state) if pruned else params
            grads = jax.grad(self.loss)(weights, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return step

    def epochs(self, step, params, opt_state, count, seed_offset=0):
        for _ in range(count):
            order = data.epoch_order(len(self.x), self.args.batch_size, self.args.seed,
                                     seed_offset)
            seed_offset += 1
            for idx in order:
                params, opt_state = step(params, opt_state, self.x[idx], self.y[idx])
            yield params, opt_state

    def present_flow_stats(self, params, opt_state) -> tuple[float, float]:
        """(smallest, 1st percentile) of the non-zero |flow| of present weights."""
        @jax.jit
        def stat(params, opt_state):
            grads = jax.grad(self.loss)(hf.apply_masks(params, opt_state), *self.probe)
            flows = masking.map_prunable(
                lambda m, w, g: jnp.where(m & (w * g != 0), jnp.abs(STE * w * g), jnp.nan
                                          ).ravel(), hf.masks(opt_state), params, grads)
            flat = jnp.concatenate(masking.prunable_leaves(flows))
            return jnp.nanmin(flat), jnp.nanpercentile(flat, 1.0)
        return tuple(float(v) for v in stat(params, opt_state))

    def accuracy(self, params, opt_state) -> float:
        logits = self.model.apply({"params": hf.finalize(params, opt_state)}, self.x_test)
        return float(jnp.mean(jnp.argmax(logits, -1) == self.y_test))


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    trainer = Trainer(args)
    params = trainer.model.init(jax.random.key(args.seed), trainer.x[:1])["params"]
    dense_tx = optax.sgd(args.lr, momentum=0.9)
    step = trainer.make_step(dense_tx, pruned=False)
    for params, _ in trainer.epochs(step, params, dense_tx.init(params), args.dense_epochs):
        pass
    dense_params = params

    gammas = np.geomspace(args.gamma_min, args.gamma_max, args.points)
    points, trajectory = [], []
    middle = len(gammas) // 2
    for i, gamma in enumerate(tqdm(gammas, desc="pressures", file=sys.stderr)):
        tx = optax.chain(hf.hyperflows(hf.pressure.constant(float(gamma)),
                                       presence_optimizer=optax.adam(args.presence_lr),
                                       seed=args.seed),
                         optax.sgd(args.lr, momentum=0.9))
        step = trainer.make_step(tx, pruned=True)
        densities = []
        params, opt_state = dense_params, tx.init(dense_params)
        for e, (params, opt_state) in enumerate(
                trainer.epochs(step, params, opt_state, args.epochs, seed_offset=1000), 1):
            densities.append(1.0 - float(hf.sparsity(opt_state)))
            if i == middle:
                smallest, p1 = trainer.present_flow_stats(params, opt_state)
                trajectory.append({"epoch": e, "density": densities[-1], "min_flow": smallest,
                                   "p1_flow": p1})
        change = abs(densities[-1] - densities[-2]) / densities[-1]
        points.append({"gamma": float(gamma), "density": densities[-1],
                       "settled": bool(change < args.settle_tol), "last_change": change,
                       "test_accuracy": trainer.accuracy(params, opt_state),
                       "densities": densities})
        tqdm.write(f"gamma {gamma:8.4f}  density {densities[-1]:.4f}  "
                   f"change {change:.3%}  acc {points[-1]['test_accuracy']:.4f}",
                   file=sys.stderr)

    g = np.array([p["gamma"] for p in points])
    s = np.array([p["density"] for p in points])
    (slope, intercept), r2 = power_fit(g, s)
    (q2, q1, q0), r2_quad = power_fit(g, s, degree=2)
    td = np.array([t["density"] for t in trajectory])
    laws = {}
    for key in ("min_flow", "p1_flow"):
        (f_slope, f_intercept), f_r2 = power_fit(td, np.array([t[key] for t in trajectory]))
        laws[key] = {"exponent": float(f_slope), "coefficient": float(np.exp(f_intercept)),
                     "r2": f_r2}
    result = {
        "alpha": float(-slope), "c": float(np.exp(intercept)), "r2": r2,
        "points": [{"gamma": p["gamma"], "density": p["density"]} for p in points],
        "quadratic": {"ln_c": float(q0), "a0": float(-q1), "a1": float(-q2), "r2": r2_quad},
        "runs": points,
        "pruning_law": {"gamma": float(gammas[middle]), **laws["min_flow"],
                        "percentile_1": laws["p1_flow"], "points": trajectory},
        "config": vars(args), "environment": report.environment(),
        "wall_time_s": time.time() - started,
    }
    report.write_json(os.path.join(args.out, "pressure_law.json"), result)
    write_markdown(args.out, result)
    plot(os.path.join(args.out, "pressure_law.png"), result)
    print(open(os.path.join(args.out, "pressure_law.md")).read())
    return result


def write_markdown(out: str, r: dict) -> None:
    rows = [[f"{p['gamma']:.4g}", f"{p['density']:.4f}", "yes" if p["settled"] else "no",
             f"{100 * p['test_accuracy']:.2f} %"] for p in r["runs"]]
    law = r["pruning_law"]
    env = r["environment"]
    text = (f"# pressure law (LeNet-300-100, MNIST)\n\n"
            f"density = {r['c']:.4g} * gamma^(-{r['alpha']:.4f}), R^2 = {r['r2']:.4f}\n\n"
            f"ln S = {r['quadratic']['ln_c']:.4f} - {r['quadratic']['a0']:.4f} ln gamma - "
            f"{r['quadratic']['a1']:.4f} (ln gamma)^2, R^2 = {r['quadratic']['r2']:.4f}\n\n"
            + report.markdown_table(["gamma", "final density", "settled", "test accuracy"],
                                    rows)
            + f"\nNeural pruning law (gamma = {law['gamma']:.4g}): min |flow| of present "
              f"weights = {law['coefficient']:.4g} * density^{law['exponent']:.4f}, "
              f"R^2 = {law['r2']:.4f}; 1st percentile of |flow| = "
              f"{law['percentile_1']['coefficient']:.4g} * density^"
              f"{law['percentile_1']['exponent']:.4f}, R^2 = {law['percentile_1']['r2']:.4f}"
              f"\n\nRan on {env['machine']}, {env['cpu_count']} CPUs, "
              f"{env['date']}, in {r['wall_time_s']:.0f} s.\n")
    report.atomic_write(os.path.join(out, "pressure_law.md"), text)


def plot(path: str, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    g = np.array([p["gamma"] for p in r["points"]])
    s = np.array([p["density"] for p in r["points"]])
    grid = np.geomspace(g.min(), g.max(), 100)
    q = r["quadratic"]
    a.loglog(g, s, "o", label="runs")
    a.loglog(grid, r["c"] * grid ** -r["alpha"],
             label=f"c·γ^-α, α={r['alpha']:.3f}, R²={r['r2']:.3f}")
    a.loglog(grid, np.exp(q["ln_c"] - q["a0"] * np.log(grid) - q["a1"] * np.log(grid) ** 2),
             "--", label=f"log-quadratic, R²={q['r2']:.3f}")
    a.set_xlabel("pressure γ")
    a.set_ylabel("final density")
    a.set_title("pressure law")
    a.legend()
    law = r["pruning_law"]
    d = np.array([p["density"] for p in law["points"]])
    f = np.array([p["min_flow"] for p in law["points"]])
    p1 = np.array([p["p1_flow"] for p in law["points"]])
    dg = np.geomspace(d.min(), d.max(), 100)
    for ys, fit, name in ((f, law, "min"), (p1, law["percentile_1"], "1st percentile")):
        line, = b.loglog(d, ys, "o", label=f"{name} (γ = {law['gamma']:.3g})")
        b.loglog(dg, fit["coefficient"] * dg ** fit["exponent"], color=line.get_color(),
                 label=f"fit: exponent {fit['exponent']:.3f}, R²={fit['r2']:.3f}")
    b.set_xlabel("density")
    b.set_ylabel("|flow| of present weights")
    b.set_title("neural pruning law")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
