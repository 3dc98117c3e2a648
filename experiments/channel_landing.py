"""Does channel Hyperflows land on its multiply-add target in a user's own loop, and
does it warn where it will not?

    python -m experiments.channel_landing --npz=../shared/data/mnist.npz --out=docs/results/channel_landing
    python -m experiments.channel_landing --quick --npz=... --out=/tmp/channel_landing

The Flax Linen MNIST example's CNN (``experiments/user_loops/linen_mnist_hf.py``) in its
own loop, ``hf.structured.channel_hyperflows`` chained before SGD with a pressure
controller over the first ``--schedule`` of ``--epochs`` (``trajectory``, the
reference's, floored at 0; ``pi``, ``log_density_pi`` with gains (0.25, 0.25) that may
pull back, as the training loop's channel method), at each controller, presence lr and
target of the grid; the budget lands where the schedule ends and the weights train on
(``--land=off``: no landing, the controller alone). Each run records the UserWarnings
raised (at ``tx.init``, and at the landing from inside ``jit``) and where it landed
(multiply-adds removed, test accuracy). Writes channel_landing.json, .md and .png.
"""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import scaffold

LANDED = 0.02  # within this of the target (fraction of multiply-adds): landed


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.channel_landing", __doc__,
                        "workdir/channel_landing", "two lrs, one target, 100 steps")
    p.add_argument("--npz", required=True, help="MNIST as .npz (x_train, y_train, ...)")
    p.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1", help="presence lrs")
    p.add_argument("--targets", default="0.5,0.8", help="fractions of multiply-adds removed")
    p.add_argument("--controllers", default="trajectory,pi", help="trajectory and/or pi")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="cut each run to this many steps")
    p.add_argument("--schedule", type=float, default=0.8,
                   help="fraction of the steps the pressure schedule spans; the rest train "
                        "the landed channels")
    p.add_argument("--land", default="on", choices=("on", "off"),
                   help="land the budget where the schedule ends (channel_hyperflows' land)")
    args = scaffold.parse(p, argv, {"lrs": "0.01,0.1", "targets": "0.5", "steps": 100})
    if not 0.0 < args.schedule <= 1.0:
        p.error(f"--schedule must lie in (0, 1], got {args.schedule}")
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.targets = [float(v) for v in args.targets.split(",")]
    args.controllers = args.controllers.split(",")
    if set(args.controllers) - {"trajectory", "pi"}:
        p.error("--controllers: trajectory and/or pi")
    return args


def run(images, labels, test, controller: str, target: float, lr: float, steps: int,
        schedule: int, land: bool, batch: int = 128) -> dict:
    import hflows_jax as hf
    from experiments.user_loops.linen_mnist_hf import CNN

    model = CNN()
    params = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
    groups = hf.structured.channel_groups(lambda p, x: model.apply({"params": p}, x),
                                          params, jnp.ones((2, 28, 28, 1)))
    every = max(1, schedule // 100)
    pressure = (hf.pressure.trajectory(target, schedule, every) if controller == "trajectory"
                else hf.pressure.log_density_pi(target, schedule, every, kp=0.25, ki=0.25,
                                                negative=True))
    pruner = hf.structured.channel_hyperflows(groups, pressure, land=land,
                                              presence_optimizer=optax.adam(lr))
    tx = optax.chain(pruner, optax.sgd(0.1, 0.9))

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(hf.apply_masks(params, state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    per_epoch = len(images) // batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(params)
        for i in range(steps):
            if i % per_epoch == 0:
                order = rng.permutation(len(images))
            take = order[(i % per_epoch) * batch:(i % per_epoch + 1) * batch]
            params, state = step(params, state, images[take], labels[take])
        jax.effects_barrier()  # the landing's warning, from inside jit
    kept = float(hf.structured.flops_fraction(groups, state))
    logits = model.apply({"params": hf.apply_masks(params, state)}, test[0])
    return {"controller": controller, "target": target, "presence_lr": lr, "steps": steps,
            "schedule_steps": schedule, "land": land, "removed": 1 - kept,
            "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == test[1])),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}


def markdown(result: dict) -> str:
    from hflows_jax.training import outputs

    rows = []
    for r in result["rows"]:
        warned = ", ".join(key for key in ("cannot reach", "overshoot", "cannot pull back",
                                           "landed at")
                           if any(key in w for w in r["warnings"]))
        miss = r["removed"] - r["target"]
        rows.append([r["controller"], f"{100 * r['target']:.0f} %", f"{r['presence_lr']:g}",
                     f"{r['schedule_steps']} of {r['steps']}",
                     f"{100 * r['removed']:.1f} %", f"{100 * miss:+.1f}",
                     f"{100 * r['test_accuracy']:.2f} %", warned or "none"])
    silent = [r for r in result["rows"] if not r["warnings"]]
    missed = [r for r in silent if abs(r["removed"] - r["target"]) > LANDED]
    verdict = (f"{len(silent)} runs raised no warning; "
               + (f"{len(missed)} of them missed by more than {100 * LANDED:.0f} points."
                  if missed else f"all landed within {100 * LANDED:.0f} points."))
    landing = ("The budget lands where the pressure schedule ends; the weights train on."
               if result["rows"] and result["rows"][0]["land"] else
               "No landing: the controller alone.")
    return ("# Channel Hyperflows in a user's loop: warnings and landing\n\n"
            f"`{result['command']}`\n\n{landing}\n\n"
            + outputs.markdown_table(["controller", "target removed", "presence lr",
                                      "schedule steps", "removed", "miss (points)",
                                      "test accuracy", "warnings"],
                                     rows)
            + f"\n{verdict}\n")


def plot(fig, result: dict) -> None:
    ax = fig.subplots()
    for controller, target in sorted({(r["controller"], r["target"]) for r in result["rows"]}):
        rows = sorted((r for r in result["rows"]
                       if (r["controller"], r["target"]) == (controller, target)),
                      key=lambda r: r["presence_lr"])
        line, = ax.plot([r["presence_lr"] for r in rows], [r["removed"] for r in rows],
                        "o-" if controller == "pi" else "s--",
                        label=f"{controller}, target {100 * target:.0f} %")
        ax.axhline(target, color=line.get_color(), ls=":", lw=0.8)
        for r in rows:
            if r["warnings"]:
                ax.plot(r["presence_lr"], r["removed"], "x", color="black", ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("presence lr (x: warned)")
    ax.set_ylabel("multiply-adds removed")
    ax.legend(fontsize=7)


def main(argv=None) -> dict:
    from tqdm import tqdm

    from hflows_jax.training import outputs

    args = parse_args(argv)
    data = np.load(args.npz)
    images = np.float32(data["x_train"][..., None]) / 255.0
    labels = np.int32(data["y_train"])
    test = (jnp.float32(data["x_test"][..., None]) / 255.0, jnp.int32(data["y_test"]))
    steps = args.steps or args.epochs * (len(images) // 128)
    grid = [(c, t, lr) for c in args.controllers for t in args.targets for lr in args.lrs]
    schedule = max(1, round(args.schedule * steps))
    rows = [run(images, labels, test, c, t, lr, steps, schedule, args.land == "on")
            for c, t, lr in tqdm(grid, desc="channel_landing", unit="run")]
    result = {"command": "python -m experiments.channel_landing " + " ".join(
        argv if argv is not None else sys.argv[1:]), "rows": rows,
        "environment": outputs.environment()}
    scaffold.write_results(args.out, "channel_landing", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
