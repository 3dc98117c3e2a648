"""The pressure law and the neural pruning law, on LeNet-300-100 / MNIST or a BN conv net.

    python -m experiments.pressure_law --out=results/pressure_law
    python -m experiments.pressure_law --setting=cifar10_5k --out=results/pressure_law_cifar
    python -m experiments.pressure_law --quick --out=/tmp/pl

Settings: ``mnist`` (LeNet-300-100) and ``cifar10_5k`` (the narrow VGG-19 with BatchNorm
on the CIFAR-10 subset, batch 64, 10 dense epochs, then 20 epochs per pressure at the
presence lr of ``recipe.presence_regime``: the reference's regime). Explicit flags win.

1. Constant-pressure runs over pressures spanning two decades, each from the same dense
   start and trained until the density settles. Fits ``density = c * gamma^(-alpha)``
   and the generalized ``ln S = ln c - a0 ln gamma - a1 (ln gamma)^2`` (METHOD.md 6).
2. Along one run, the smallest non-zero |flow| among present weights against density,
   and its power-law fit: the paper's neural pruning law. (Weights feeding dead ReLU
   units have exactly zero flow; they would pin the minimum at 0.)

Writes pressure_law.json, pressure_law.md and pressure_law.png to --out.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from experiments import scaffold
from hflows_jax import data, masking, models, recipe
from hflows_jax.training import TrainState, make_train_step, outputs
from hflows_jax.training.step import smoothed_cross_entropy

QUICK = {"train_examples": 20000, "epochs": 8, "dense_epochs": 1}
SETTINGS = {
    "mnist": {},  # the flags' own defaults
    "cifar10_5k": dict(dataset="npz:../shared/data/cifar10_5k.npz", model="vgg19", width=0.125,
                       batch_size=64, dense_epochs=10, epochs=20,
                       presence_lr=recipe.presence_regime(20 * (5085 // 64))[0]),
}


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.pressure_law", __doc__, "workdir/pressure_law",
                        "20k images, 8 epochs: a few minutes")
    p.add_argument("--setting", default="mnist", choices=sorted(SETTINGS))
    p.add_argument("--dataset", default="npz:../shared/data/mnist.npz")
    p.add_argument("--model", default="lenet300")
    p.add_argument("--width", type=float, default=1.0)
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
    p.set_defaults(**SETTINGS[p.parse_known_args(argv)[0].setting])
    args = scaffold.parse(p, argv, QUICK)
    if not 0 < args.gamma_min < args.gamma_max or args.points < 3:
        p.error("need 0 < --gamma_min < --gamma_max and --points >= 3")
    if min(args.epochs, args.dense_epochs + 1, args.batch_size) < 1:
        p.error("need --epochs >= 1, --dense_epochs >= 0 and --batch_size >= 1")
    return args


def power_fit(x: np.ndarray, y: np.ndarray, degree: int = 1) -> tuple[np.ndarray, float]:
    """Polynomial fit of ln y on ln x, and its R^2 in log space."""
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:  # every x the same (e.g. nothing was pruned): no fit
        return np.full(degree + 1, np.nan), float("nan")
    coef = np.polyfit(lx, ly, degree)
    residual = ly - np.polyval(coef, lx)
    total = np.sum((ly - ly.mean()) ** 2)  # 0 when every y is the same: no R^2
    r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else float("nan")
    return coef, float(r2)


def load(args):
    """(train images, labels), (test images, labels), normalized, and the class count."""
    ds = data.load_dataset(args.dataset)
    n = args.train_examples or len(ds.x_train)
    mean, std = data.channel_stats(ds.x_train[:n])
    return ((data.normalize(ds.x_train[:n], mean, std), ds.y_train[:n]),
            (data.normalize(ds.x_test, mean, std), ds.y_test), ds.num_classes)


def train(step, state: TrainState, train_set, args, epochs: range):
    """Yields the state after each epoch; batch order is a function of (seed, epoch)."""
    x, y = train_set
    for epoch in epochs:
        for idx in data.epoch_order(len(x), args.batch_size, args.seed, epoch):
            state, _ = step(state, x[idx], y[idx])
        yield state


def apply(model, state: TrainState, params, images):
    """Logits in evaluation mode (BatchNorm on its running averages)."""
    return model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                       train=False)


@functools.partial(jax.jit, static_argnums=0)
def _flow_stats(model, state: TrainState, images, labels):
    def loss(w):
        return smoothed_cross_entropy(apply(model, state, w, images), labels, 0.0)

    grads = jax.grad(loss)(hf.apply_masks(state.params, state.opt_state))
    flows = hf.flows(state.params, grads, state.opt_state)
    present = masking.map_prunable(
        lambda m, f: jnp.where(m & (f != 0), jnp.abs(f), jnp.nan).ravel(),
        hf.masks(state.opt_state), flows)
    flat = jnp.concatenate(masking.prunable_leaves(present))
    return jnp.nanmin(flat), jnp.nanpercentile(flat, 1.0)


def present_flow_stats(model, state: TrainState, probe) -> tuple[float, float]:
    """(smallest, 1st percentile) of the non-zero |flow| of present weights on ``probe``."""
    return tuple(float(v) for v in _flow_stats(model, state, *probe))


def accuracy(model, state: TrainState, test_set, batch: int = 1000) -> float:
    final = hf.finalize(state.params, state.opt_state)
    logits = jnp.concatenate([apply(model, state, final, test_set[0][i:i + batch])
                              for i in range(0, len(test_set[0]), batch)])
    return float(jnp.mean(jnp.argmax(logits, -1) == test_set[1]))


def constant_pressure_run(model, dense: TrainState, gamma: float, args, train_set, test_set,
                          probe=None) -> tuple[dict, list[dict]]:
    """Train from the dense state under one pressure; with ``probe``, the flow statistics
    after every epoch (the neural pruning law)."""
    tx = optax.chain(hf.hyperflows(hf.pressure.constant(gamma),
                                   presence_optimizer=optax.adam(args.presence_lr),
                                   seed=args.seed),
                     optax.sgd(args.lr, momentum=0.9))
    step = jax.jit(make_train_step(model, tx, masked=True, axis_name=None))
    state = dense._replace(opt_state=tx.init(dense.params))
    densities, trajectory = [], []
    epochs = range(args.dense_epochs + 1, args.dense_epochs + args.epochs + 1)
    for state in train(step, state, train_set, args, epochs):
        densities.append(1.0 - float(hf.sparsity(state.opt_state)))
        if probe is not None:
            smallest, p1 = present_flow_stats(model, state, probe)
            trajectory.append({"epoch": len(densities), "density": densities[-1],
                               "min_flow": smallest, "p1_flow": p1})
    # With a single epoch there is no last change to judge settling by.
    change = (abs(densities[-1] - densities[-2]) / densities[-1] if len(densities) > 1
              else None)
    point = {"gamma": float(gamma), "density": densities[-1],
             "settled": change is not None and change < args.settle_tol, "last_change": change,
             "test_accuracy": accuracy(model, state, test_set), "densities": densities}
    return point, trajectory


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    train_set, test_set, num_classes = load(args)
    model = models.create(args.model, num_classes, args.width)
    variables = model.init(jax.random.key(args.seed), train_set[0][:1])
    params = variables["params"]
    dense_tx = optax.sgd(args.lr, momentum=0.9)
    dense = TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                       dense_tx.init(params))
    step = jax.jit(make_train_step(model, dense_tx, masked=False, axis_name=None))
    for dense in train(step, dense, train_set, args, range(1, args.dense_epochs + 1)):
        pass
    probe = (train_set[0][:2048], train_set[1][:2048])  # fixed batch for the flow statistics

    gammas = np.geomspace(args.gamma_min, args.gamma_max, args.points)
    middle = len(gammas) // 2
    points, trajectory = [], []
    for i, gamma in enumerate(tqdm(gammas, desc="pressures", file=sys.stderr)):
        point, probed = constant_pressure_run(model, dense, float(gamma), args, train_set,
                                              test_set, probe if i == middle else None)
        points.append(point)
        trajectory += probed
        change = "n/a" if point["last_change"] is None else f"{point['last_change']:.3%}"
        tqdm.write(f"gamma {gamma:8.4f}  density {point['density']:.4f}  "
                   f"change {change}  acc {point['test_accuracy']:.4f}", file=sys.stderr)
    result = fit(points, trajectory, float(gammas[middle]))
    result.update(runs=points, config=vars(args), environment=outputs.environment(),
                  wall_time_s=time.time() - started)
    scaffold.write_results(args.out, "pressure_law", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


def fit(points: list[dict], trajectory: list[dict], gamma: float) -> dict:
    """The pressure law (and its log-quadratic form) and the neural pruning law."""
    g = np.array([p["gamma"] for p in points])
    s = np.array([p["density"] for p in points])
    (slope, intercept), r2 = power_fit(g, s)
    (q2, q1, q0), r2_quad = power_fit(g, s, degree=2)
    td = np.array([t["density"] for t in trajectory])
    laws = {}
    for key in ("min_flow", "p1_flow"):
        if len(td) > 1:
            (f_slope, f_intercept), f_r2 = power_fit(td, np.array([t[key] for t in trajectory]))
            laws[key] = {"exponent": float(f_slope), "coefficient": float(np.exp(f_intercept)),
                         "r2": f_r2}
        else:  # one epoch: one point, no law
            laws[key] = {"exponent": None, "coefficient": None, "r2": None}
    return {
        "alpha": float(-slope), "c": float(np.exp(intercept)), "r2": r2,
        "points": [{"gamma": p["gamma"], "density": p["density"]} for p in points],
        "quadratic": {"ln_c": float(q0), "a0": float(-q1), "a1": float(-q2), "r2": r2_quad},
        "pruning_law": {"gamma": gamma, **laws["min_flow"], "percentile_1": laws["p1_flow"],
                        "points": trajectory},
    }


def _law_text(name: str, law: dict) -> str:
    if law["exponent"] is None:
        return f"{name}: n/a (one epoch)"
    return (f"{name} = {law['coefficient']:.4g} * density^{law['exponent']:.4f}, "
            f"R^2 = {law['r2']:.4f}")


def markdown(r: dict) -> str:
    rows = [[f"{p['gamma']:.4g}", f"{p['density']:.4f}", "yes" if p["settled"] else "no",
             f"{100 * p['test_accuracy']:.2f} %"] for p in r["runs"]]
    law = r["pruning_law"]
    c = r["config"]
    return (f"# pressure law ({c['model']} x{c['width']:g}, {c['dataset']})\n\n"
            f"density = {r['c']:.4g} * gamma^(-{r['alpha']:.4f}), R^2 = {r['r2']:.4f}\n\n"
            f"ln S = {r['quadratic']['ln_c']:.4f} - {r['quadratic']['a0']:.4f} ln gamma - "
            f"{r['quadratic']['a1']:.4f} (ln gamma)^2, R^2 = {r['quadratic']['r2']:.4f}\n\n"
            + outputs.markdown_table(["gamma", "final density", "settled", "test accuracy"],
                                     rows)
            + f"\nNeural pruning law (gamma = {law['gamma']:.4g}): "
            + _law_text("min |flow| of present weights", law) + "; "
            + _law_text("1st percentile of |flow|", law["percentile_1"])
            + f"\n\nWall time {r['wall_time_s']:.0f} s.\n")


def plot(fig, r: dict) -> None:
    fig.set_size_inches(12, 4.5)
    a, b = fig.subplots(1, 2)
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
    for key, fit, name in (("min_flow", law, "min"),
                           ("p1_flow", law["percentile_1"], "1st percentile")):
        line, = b.loglog(d, [p[key] for p in law["points"]], "o",
                         label=f"{name} (γ = {law['gamma']:.3g})")
        if fit["exponent"] is not None:
            dg = np.geomspace(d.min(), d.max(), 100)
            b.loglog(dg, fit["coefficient"] * dg ** fit["exponent"], color=line.get_color(),
                     label=f"fit: exponent {fit['exponent']:.3f}, R²={fit['r2']:.3f}")
    b.set_xlabel("density")
    b.set_ylabel("|flow| of present weights")
    b.set_title("neural pruning law")
    b.legend()


if __name__ == "__main__":
    scaffold.command_line(main)
