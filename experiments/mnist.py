"""LeNet-300-100 on MNIST: dense training, then Hyperflows pruning and regrowth.

    python -m experiments.mnist --target_sparsity=0.98
    python -m experiments.mnist --dataset=npz:../shared/data/mnist.npz

Prints one line per epoch and writes ``--workdir/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from hflows_jax import models, recipe
from hflows_jax.data import load_dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist (tfds) or npz:PATH")
    p.add_argument("--data_dir", default=None, help="tfds data directory")
    p.add_argument("--model", default="lenet300", choices=sorted(models.MODELS))
    p.add_argument("--target_sparsity", type=float, default=0.98)
    p.add_argument("--dense_epochs", type=int, default=5)
    p.add_argument("--pruning_epochs", type=int, default=40)
    p.add_argument("--regrowth_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="weight learning rate (SGD)")
    p.add_argument("--presence_lr", type=float, default=1e-3, help="Adam lr of the scores T")
    p.add_argument("--regrowth_allowance", type=float, default=0.15,
                   help="expected relative density gain of the regrowth phase; the pruning "
                        "phase aims that much below the target density")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="workdir/mnist")
    args = p.parse_args(argv)
    if not 0.0 < args.target_sparsity < 1.0:
        p.error(f"--target_sparsity must lie in (0, 1), got {args.target_sparsity}")
    for name in ("dense_epochs", "regrowth_epochs"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.pruning_epochs < 1 or args.batch_size < 1:
        p.error("--pruning_epochs and --batch_size must be >= 1")
    return args


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_steps(model, tx, pruned: bool):
    """Jitted (train_step, accuracy) for a model whose params may be masked by ``tx``."""

    def effective(params, opt_state):
        return hf.apply_masks(params, opt_state) if pruned else params

    @jax.jit
    def train_step(params, opt_state, images, labels):
        def loss_fn(w):
            return cross_entropy(model.apply({"params": w}, images, train=True), labels)

        loss, grads = jax.value_and_grad(loss_fn)(effective(params, opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def correct(params, opt_state, images, labels):
        logits = model.apply({"params": effective(params, opt_state)}, images, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    return train_step, correct


def accuracy(correct, params, opt_state, x, y, batch_size=2000) -> float:
    hits = sum(int(correct(params, opt_state, x[i:i + batch_size], y[i:i + batch_size]))
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def run_epoch(train_step, params, opt_state, x, y, batch_size, rng, desc):
    order = rng.permutation(len(x))
    steps = len(x) // batch_size
    losses = []
    for i in tqdm(range(steps), desc=desc, leave=False, file=sys.stderr,
                  disable=not sys.stderr.isatty()):
        idx = order[i * batch_size:(i + 1) * batch_size]
        params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
        losses.append(loss)
    return params, opt_state, float(jnp.mean(jnp.stack(losses)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load_dataset(args.dataset, args.data_dir)
    mean = data.x_train.mean(axis=(0, 1, 2)) / 255.0
    std = data.x_train.std(axis=(0, 1, 2)) / 255.0
    x_train, x_test = normalize(data.x_train, mean, std), normalize(data.x_test, mean, std)
    y_train, y_test = data.y_train, data.y_test
    steps_per_epoch = len(x_train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch_size={args.batch_size} exceeds the {len(x_train)} "
                         "training images.")

    model = models.create(args.model, data.num_classes)
    params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
    rng = np.random.default_rng(args.seed)
    start = time.time()
    history = []

    def log(phase, epoch, loss, params, opt_state, pruned):
        acc = accuracy(correct, params, opt_state, x_test, y_test)
        row = {"phase": phase, "epoch": epoch, "loss": loss, "test_accuracy": acc,
               "sparsity": float(hf.sparsity(opt_state)) if pruned else 0.0,
               "pressure": float(hf.pressure_value(opt_state)) if pruned else 0.0,
               "time_s": time.time() - start}
        history.append(row)
        print(f"{phase:>8} epoch {epoch:3d}  loss {loss:.4f}  test_acc {acc:.4f}  "
              f"sparsity {row['sparsity']:.4f}  pressure {row['pressure']:.4g}  "
              f"[{row['time_s']:.0f}s]", flush=True)

    # Phase 1: dense training.
    dense_tx = optax.sgd(args.lr, momentum=0.9)
    opt_state = dense_tx.init(params)
    train_step, correct = make_steps(model, dense_tx, pruned=False)
    for epoch in range(1, args.dense_epochs + 1):
        params, opt_state, loss = run_epoch(train_step, params, opt_state, x_train, y_train,
                                            args.batch_size, rng, f"dense {epoch}")
        log("dense", epoch, loss, params, opt_state, pruned=False)

    # Phases 2 and 3: pruning under the trajectory controller, then regrowth at pressure 0.
    pruning_steps = args.pruning_epochs * steps_per_epoch
    regrowth_steps = args.regrowth_epochs * steps_per_epoch
    tx = optax.chain(
        hf.hyperflows(
            pressure=hf.pressure.trajectory(
                recipe.pruning_phase_sparsity(args.target_sparsity, args.regrowth_allowance),
                pruning_steps, update_every=steps_per_epoch),
            presence_optimizer=optax.adam(recipe.presence_learning_rate(
                args.presence_lr, pruning_steps, steps_per_epoch)),
            seed=args.seed,
        ),
        optax.sgd(recipe.weight_learning_rate(args.lr, pruning_steps, regrowth_steps),
                  momentum=0.9),
    )
    opt_state = tx.init(params)
    train_step, correct = make_steps(model, tx, pruned=True)
    phases = [("pruning", args.pruning_epochs), ("regrowth", args.regrowth_epochs)]
    for phase, epochs in phases:
        for epoch in range(1, epochs + 1):
            params, opt_state, loss = run_epoch(train_step, params, opt_state, x_train,
                                                y_train, args.batch_size, rng, f"{phase} {epoch}")
            log(phase, epoch, loss, params, opt_state, pruned=True)

    final = hf.finalize(params, opt_state)
    mask_leaves = [m for m in jax.tree.leaves(hf.masks(opt_state)) if m is not None]
    params_total = sum(int(p.size) for p in jax.tree.leaves(params))
    pruned_entries = sum(int(m.size - m.sum()) for m in mask_leaves)
    report = {
        "test_accuracy": accuracy(correct, final, opt_state, x_test, y_test),
        "sparsity": float(hf.sparsity(opt_state)),
        "layer_sparsity": {k: float(v) for k, v in hf.layer_sparsity(opt_state).items()},
        "params_total": params_total,
        "params_remaining": params_total - pruned_entries,
        "wall_time_s": time.time() - start,
        "history": history,
        "config": vars(args),
    }
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"test_accuracy {report['test_accuracy']:.4f}  sparsity {report['sparsity']:.4f}  "
          f"params {report['params_remaining']}/{params_total}  -> {path}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
