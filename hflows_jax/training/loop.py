"""The reference recipe as one resumable run: dense training, pruning, regrowth.

``run(Config(...))`` is what ``python -m experiments.cifar`` calls. Every epoch ends with
an orbax checkpoint, so rerunning the same command continues the same run: batch order
and augmentation depend only on (seed, epoch, step), and the checkpoint holds the rest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hflows_jax as hf
from hflows_jax import models, recipe
from hflows_jax.data import (ArrayDataset, channel_stats, load_dataset, normalize,
                             steps_per_epoch, train_batches)
from hflows_jax.training import parallel, report
from hflows_jax.training.checkpoint import Checkpoints
from hflows_jax.training.state import TrainState
from hflows_jax.training.pruners import METHODS, make_pruner
from hflows_jax.training.step import make_eval_step, make_train_step, smoothed_cross_entropy

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Config fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {"workdir", "eval_every", "log_every", "data_dir"}


@dataclasses.dataclass
class Config:
    model: str = "vgg19"
    dataset: str = "cifar10"
    data_dir: str | None = None
    method: str = "hyperflows"  # or a baseline: magnitude, snip, grasp, random, rigl
    distribution: str | None = None  # baselines: global, uniform or erk (None: the method's)
    target_sparsity: float = 0.98
    dense_epochs: int = 160
    init_checkpoint: str | None = None
    pruning_epochs: int = 100
    regrowth_epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    presence_lr: float = 1e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    regrowth_allowance: float = 0.15
    pressure_updates_per_epoch: int = 1  # controller periods per epoch (reference: 1)
    dense_only: bool = False  # the dense baseline: --dense_epochs of training, no pruning
    augment: bool = True
    width: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    workdir: str = "workdir/cifar"
    eval_every: int = 1
    log_every: int = 50

    def validate(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"--target_sparsity must lie in (0, 1), got {self.target_sparsity}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: use one of {list(METHODS)}.")
        if self.model not in models.MODELS:
            raise ValueError(f"Unknown model {self.model!r}: known models are "
                             f"{sorted(models.MODELS)}.")
        if self.dense_only and (self.dense_epochs < 1 or self.init_checkpoint):
            raise ValueError("--dense_only trains --dense_epochs (>= 1) from scratch.")
        if min(self.dense_epochs, self.regrowth_epochs) < 0 or self.pruning_epochs < 1:
            raise ValueError("--dense_epochs and --regrowth_epochs must be >= 0, "
                             "--pruning_epochs >= 1.")
        if min(self.batch_size, self.eval_every, self.log_every,
               self.pressure_updates_per_epoch) < 1:
            raise ValueError("--batch_size, --eval_every, --log_every and "
                             "--pressure_updates_per_epoch must be >= 1.")
        devices = jax.device_count()
        if self.batch_size % devices:
            raise ValueError(f"--batch_size={self.batch_size} is not divisible by the "
                             f"{devices} devices; use a multiple of {devices}.")
        recipe.pruning_phase_sparsity(self.target_sparsity, self.regrowth_allowance)


@dataclasses.dataclass
class Phase:
    """One stretch of training with one optimizer, checkpointed in its own directory."""

    name: str
    epochs: list[int]  # global epoch numbers (1-based) this phase covers
    tx: optax.GradientTransformation
    pruned: bool
    learning_rates: Callable[[int], dict[str, float]]  # step -> {"lr": ..., "presence_lr": ...}


class Run:
    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self.data: ArrayDataset = load_dataset(cfg.dataset, cfg.data_dir)
        if len(self.data.x_train) < cfg.batch_size:
            raise ValueError(f"--batch_size={cfg.batch_size} exceeds the "
                             f"{len(self.data.x_train)} training images.")
        self.mean, self.std = channel_stats(self.data.x_train)
        self.x_test = normalize(self.data.x_test, self.mean, self.std)
        self.num_devices = jax.local_device_count()
        self.steps_per_epoch = steps_per_epoch(len(self.data.x_train), cfg.batch_size)
        self.model = models.create(cfg.model, self.data.num_classes, cfg.width,
                                   DTYPES[cfg.dtype], axis_name="batch")
        self.history: list[dict] = []
        self.start_time = time.time()
        os.makedirs(cfg.workdir, exist_ok=True)

    # --- set-up ---------------------------------------------------------------------------

    def initial_weights(self) -> tuple[Any, Any]:
        variables = jax.jit(self.model.init, static_argnames="train")(
            jax.random.key(self.cfg.seed),
            jnp.zeros((1,) + self.data.image_shape, jnp.float32), train=False)
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        if self.cfg.init_checkpoint:
            params, batch_stats = self.load_init_checkpoint(params, batch_stats)
        return params, batch_stats

    def load_init_checkpoint(self, params, batch_stats):
        """Params and batch stats from the last epoch of a dense checkpoint directory."""
        ckpt = Checkpoints(self.cfg.init_checkpoint)
        epoch = ckpt.latest()
        if epoch is None:
            raise FileNotFoundError(f"--init_checkpoint={self.cfg.init_checkpoint} holds no "
                                    "checkpoint (pass a run's checkpoints/dense directory).")
        tx = self.dense_tx(self.cfg.dense_epochs)
        like = TrainState(jnp.zeros((), jnp.int32), params, batch_stats,
                          jax.eval_shape(tx.init, params))
        state, _ = ckpt.restore(epoch, like)
        ckpt.close()
        return state.params, state.batch_stats

    def dense_learning_rate(self, epochs: int) -> optax.Schedule:
        return optax.cosine_decay_schedule(self.cfg.lr, max(epochs * self.steps_per_epoch, 1))

    def dense_tx(self, epochs: int) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.cfg.weight_decay),
                           optax.sgd(self.dense_learning_rate(epochs), momentum=0.9))

    def phases(self) -> list[Phase]:
        cfg, spe = self.cfg, self.steps_per_epoch
        dense_epochs = 0 if cfg.init_checkpoint else cfg.dense_epochs
        dense_lr = self.dense_learning_rate(dense_epochs)
        dense = Phase("dense", list(range(1, dense_epochs + 1)), self.dense_tx(dense_epochs),
                      False, lambda s: {"lr": float(dense_lr(s))})
        if cfg.dense_only:
            return [dense]
        pruning_steps, regrowth_steps = cfg.pruning_epochs * spe, cfg.regrowth_epochs * spe
        weight_lr = recipe.weight_learning_rate(cfg.lr, pruning_steps, regrowth_steps)
        presence_lr = recipe.presence_learning_rate(cfg.presence_lr, pruning_steps, spe)
        pruner = make_pruner(cfg.method, cfg.target_sparsity, pruning_steps, spe, presence_lr,
                             cfg.regrowth_allowance, cfg.seed, cfg.distribution,
                             scoring=self.scoring,
                             controller_period=max(1, spe // cfg.pressure_updates_per_epoch))
        prune_tx = optax.chain(
            pruner,
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(weight_lr, momentum=0.9),
        )
        self.regrowth_from = dense_epochs + cfg.pruning_epochs + 1
        last = dense_epochs + cfg.pruning_epochs + cfg.regrowth_epochs
        return [
            dense,
            Phase("pruning", list(range(dense_epochs + 1, last + 1)), prune_tx, True,
                  lambda s: {"lr": float(weight_lr(s))} | (
                      {"presence_lr": float(presence_lr(s))} if cfg.method == "hyperflows"
                      else {})),
        ]

    def scoring(self, num_batches: int = 4) -> tuple[Callable, list]:
        """A loss and a few training batches for the one-shot scores of SNIP and GraSP.

        BatchNorm runs in training mode (batch statistics), so no running averages and
        no device axis are needed.
        """
        model = models.create(self.cfg.model, self.data.num_classes, self.cfg.width)
        _, batch_stats = self.initial_weights()

        def loss_fn(params, batch):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch[0],
                                    train=True, mutable=["batch_stats"])
            return smoothed_cross_entropy(logits, batch[1], self.cfg.label_smoothing)

        batches = train_batches(self.data.x_train, self.data.y_train, self.cfg.batch_size,
                                self.cfg.seed, 0, self.mean, self.std, augment=False)
        return loss_fn, [b for _, b in zip(range(num_batches), batches)]

    def record(self, epoch: int) -> dict:
        config = {k: v for k, v in dataclasses.asdict(self.cfg).items()
                  if k not in RESUMABLE_CHANGES}
        return {"epochs_done": epoch, "seed": self.cfg.seed, "history": self.history,
                "config": config}

    def check_same_run(self, record: dict) -> None:
        mine = self.record(0)["config"]
        theirs = record.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{self.cfg.workdir} holds a run with another config ({changes}). "
                             "Use a new --workdir, or the same flags to resume.")

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        params, batch_stats = self.initial_weights()
        phases = self.phases()
        ckpts = {p.name: Checkpoints(os.path.join(self.cfg.workdir, "checkpoints", p.name))
                 for p in phases}
        # Resume from the furthest checkpoint of the latest phase that has one.
        start_phase, restored = 0, None
        for i, phase in enumerate(phases):
            if ckpts[phase.name].latest() is not None:
                start_phase, restored = i, ckpts[phase.name].latest()
        state = None
        for i, phase in enumerate(phases):
            if i < start_phase or not phase.epochs:
                continue
            if state is not None:  # a new phase starts from the weights of the last one
                params, batch_stats = state.params, state.batch_stats
            # One compiled program, not dozens of op-by-op dispatches (each compiles).
            state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats,
                               jax.jit(phase.tx.init)(params))
            first = phase.epochs[0]
            if i == start_phase and restored is not None:
                state, record = ckpts[phase.name].restore(restored, state)
                self.check_same_run(record)
                self.history = record["history"]
                first = restored + 1
                print(f"Resuming {phase.name} after epoch {restored} from "
                      f"{ckpts[phase.name].directory}", flush=True)
            state = self.train_phase(phase, state, first, ckpts[phase.name])
        for ckpt in ckpts.values():
            ckpt.close()
        return self.finish(state, phases[-1])

    def train_phase(self, phase: Phase, state: TrainState, first: int,
                    ckpt: Checkpoints) -> TrainState:
        cfg, n = self.cfg, self.num_devices
        train_step = parallel.pmapped(make_train_step(self.model, phase.tx, phase.pruned,
                                                      cfg.label_smoothing), donate_state=True)
        eval_step = parallel.pmapped(make_eval_step(self.model, phase.pruned))
        replicated = parallel.replicate(state, n)
        for epoch in range(first, phase.epochs[-1] + 1):
            started = time.time()
            sums = {"loss": 0.0, "accuracy": 0.0}
            batches = train_batches(self.data.x_train, self.data.y_train, cfg.batch_size,
                                    cfg.seed, epoch, self.mean, self.std, cfg.augment,
                                    jax.process_index(), jax.process_count())
            bar = tqdm(batches, total=self.steps_per_epoch, desc=f"{phase.name} {epoch}",
                       leave=False, file=sys.stderr, disable=None)
            pending = []
            for step, (images, labels) in enumerate(bar, 1):
                replicated, metrics = train_step(replicated,
                                                 parallel.split_for_devices(images, n),
                                                 parallel.split_for_devices(labels, n))
                pending.append(metrics)
                if step % cfg.log_every == 0 or step == self.steps_per_epoch:
                    for m in jax.device_get(pending):
                        for k in sums:
                            sums[k] += float(m[k][0])
                    pending = []
                    bar.set_postfix(loss=f"{sums['loss'] / step:.4f}")
            bar.close()
            seconds = time.time() - started
            state = parallel.unreplicate(replicated)
            label = "regrowth" if phase.pruned and epoch >= self.regrowth_from else phase.name
            row = {"phase": label, "epoch": epoch,
                   "loss": sums["loss"] / self.steps_per_epoch,
                   "train_accuracy": sums["accuracy"] / self.steps_per_epoch}
            is_last = epoch == phase.epochs[-1]
            row["test_accuracy"] = (self.evaluate(eval_step, replicated)
                                    if epoch % cfg.eval_every == 0 or is_last else None)
            row["sparsity"] = float(hf.sparsity(state.opt_state)) if phase.pruned else 0.0
            with_pressure = phase.pruned and cfg.method == "hyperflows"
            row["pressure"] = float(hf.pressure_value(state.opt_state)) if with_pressure else 0.0
            row.update(phase.learning_rates(int(state.step)))
            row["images_per_s"] = self.steps_per_epoch * cfg.batch_size / seconds
            row["time_s"] = time.time() - self.start_time
            self.history.append(row)
            self.log(row)
            ckpt.save(epoch, state, self.record(epoch))
            report.write_csv(os.path.join(cfg.workdir, "metrics.csv"), self.history)
        return state

    def evaluate(self, eval_step, replicated, batch_size: int = 1000) -> float:
        n = self.num_devices
        batch_size = max(n, batch_size // n * n)
        correct = count = 0
        for start in range(0, len(self.x_test), batch_size):
            images = self.x_test[start:start + batch_size]
            labels = self.data.y_test[start:start + batch_size]
            pad = (-len(images)) % n
            valid = np.concatenate([np.ones(len(images), np.float32), np.zeros(pad, np.float32)])
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            c, k = eval_step(replicated, *(parallel.split_for_devices(a, n)
                                           for a in (images, labels, valid)))
            correct += float(c[0])
            count += float(k[0])
        return correct / count

    def log(self, row: dict) -> None:
        test = "  n/a " if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
        lrs = "  ".join(f"{k} {row[k]:.3g}" for k in ("lr", "presence_lr") if k in row)
        print(f"{row['phase']:>8} epoch {row['epoch']:3d}  loss {row['loss']:.4f}  "
              f"train_acc {row['train_accuracy']:.4f}  test_acc {test}  "
              f"sparsity {row['sparsity']:.4f}  pressure {row['pressure']:.4g}  {lrs}  "
              f"{row['images_per_s']:.0f} img/s  [{row['time_s']:.0f}s]", flush=True)

    def finish(self, state: TrainState, phase: Phase) -> dict:
        cfg = self.cfg
        if phase.pruned:
            final, masks = hf.finalize(state.params, state.opt_state), hf.masks(state.opt_state)
            layer_sparsity = {k: float(v) for k, v in hf.layer_sparsity(state.opt_state).items()}
        else:
            final, masks, layer_sparsity = state.params, None, {}
        variables = {"params": final, "batch_stats": state.batch_stats}
        flops_dense, flops_sparse = report.forward_macs(self.model, variables,
                                                        self.data.image_shape, masks)
        params_total = sum(int(p.size) for p in jax.tree.leaves(state.params))
        pruned = sum(int(m.size - m.sum()) for m in jax.tree.leaves(masks))
        test_rows = [r for r in self.history if r["test_accuracy"] is not None]
        result = {
            "test_accuracy": test_rows[-1]["test_accuracy"],
            "sparsity": float(hf.sparsity(state.opt_state)) if phase.pruned else 0.0,
            "layer_sparsity": layer_sparsity,
            "params_total": params_total,
            "params_remaining": params_total - pruned,
            "flops_dense": flops_dense,
            "flops_sparse": flops_sparse,
            "wall_time_s": time.time() - self.start_time,
            "devices": [str(d) for d in jax.local_devices()],
            "config": dataclasses.asdict(cfg),
            "history": self.history,
        }
        report.write_json(os.path.join(cfg.workdir, "report.json"), result)
        report.plot_run(os.path.join(cfg.workdir, "run.png"), self.history, layer_sparsity,
                        f"{cfg.model} on {self.data.name}, target {cfg.target_sparsity:.1%}")
        print(f"test_accuracy {result['test_accuracy']:.4f}  sparsity {result['sparsity']:.4f}  "
              f"params {result['params_remaining']}/{params_total}  "
              f"MACs {flops_sparse}/{flops_dense}  -> {cfg.workdir}", flush=True)
        return result


def run(cfg: Config) -> dict:
    return Run(cfg).run()
