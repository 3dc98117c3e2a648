"""Opening a run: config -> data -> method and model -> phases, with nothing trained yet.

``open_run(cfg)`` is the one way to assemble a run: ``train.run`` trains what it returns,
and the experiments that read a finished run (export, evidence) restore its checkpoints
onto ``OpenRun.template``. The phases depend on the params' structure only, so a run
opened from a fresh initialization restores any checkpoint of the same config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hflows_jax as hf
from hflows_jax import methods, models, recipe
from hflows_jax.data import (ArrayDataset, channel_stats, load_dataset, steps_per_epoch,
                             train_batches)
from hflows_jax.training import parallel
from hflows_jax.training.checkpoint import Checkpoints, checkpoint_dir
from hflows_jax.training.config import Config
from hflows_jax.training.state import TrainState
from hflows_jax.training.step import smoothed_cross_entropy

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A run's data: the dataset and its normalization."""

    data: ArrayDataset
    mean: np.ndarray
    std: np.ndarray
    steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of training with one model and one optimizer, checkpointed in its own
    directory."""

    name: str  # "dense", "pruning" or "finetune": the checkpoint directory
    epochs: range  # global epoch numbers (1-based)
    model: nn.Module
    tx: optax.GradientTransformation
    masked: bool  # the network runs on W * M
    learning_rates: Callable[[int], dict[str, float]]  # phase step -> {"lr": ..., ...}
    # opt_state -> {"sparsity", "pressure", "skipped_steps"} for the log
    readings: Callable[[Any], dict[str, float]]
    regrowth_from: int | None = None  # epochs from here on are logged as "regrowth"
    # The previous phase's last TrainState -> this phase's first; None: its params and
    # batch stats under a fresh ``tx.init``.
    start: Callable[[TrainState], TrainState] | None = None

    def label(self, epoch: int) -> str:
        return "regrowth" if self.regrowth_from and epoch >= self.regrowth_from else self.name


@dataclasses.dataclass(frozen=True)
class OpenRun:
    """A run's data, method, model (the method's, over ``--model``), fresh params and
    batch stats, and phases."""

    cfg: Config
    inputs: Inputs
    method: methods.Method
    model: nn.Module
    params: Any
    batch_stats: Any
    phases: tuple[Phase, ...]

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def phase_of(self, epoch: int) -> Phase:
        """The phase that trains epoch ``epoch``."""
        return next(p for p in self.phases if epoch in p.epochs)

    def checkpoints(self, phase: str) -> Checkpoints:
        """The phase's checkpoints in ``--workdir`` (close them when done)."""
        return Checkpoints(checkpoint_dir(self.cfg.run.workdir, phase),
                           max_to_keep=self.cfg.run.keep_checkpoints or None)

    def template(self, phase: str, params=None, batch_stats=None) -> TrainState:
        """The phase's state as shapes and dtypes, to restore onto (``tx.init`` traced, or
        the phase's ``start`` on the previous phase's template)."""
        names = [p.name for p in self.phases]
        start = self.phase(phase).start
        if start is not None:
            before = names[names.index(phase) - 1]
            return jax.eval_shape(start, self.template(before, params, batch_stats))
        return abstract_state(self.phase(phase).tx,
                              self.params if params is None else params,
                              self.batch_stats if batch_stats is None else batch_stats)


def open_run(cfg: Config, axis_name: str | None = "batch", dtype=None) -> OpenRun:
    """The run of ``cfg``; ``axis_name=None`` and ``dtype=jnp.float32`` give the model for
    analysis outside the device loop."""
    inputs = load_inputs(cfg)
    method = methods.get(cfg.method.name)
    model = method.model(build_model(cfg, inputs.data.num_classes, axis_name, dtype),
                         cfg.method.target_sparsity)
    params, batch_stats = init_variables(model, cfg.run.seed, inputs.data.image_shape)
    spe, shape = inputs.steps_per_epoch, inputs.data.image_shape
    dense = dense_phase(cfg, spe, model)
    phases = (dense,)
    if cfg.pruned:
        groups = functools.cache(lambda: hf.structured.channel_groups(  # built on first call
            *method.plain(model, params, batch_stats)[:2], shape))
        latency = None
        if cfg.method.target == "latency":
            latency = functools.cache(lambda: latency_table(
                cfg, *method.plain(model, params, batch_stats)[:2], shape))
        phases += pruning_phases(cfg, spe, method, model,
                                 scoring(cfg, inputs, method, batch_stats),
                                 first_epoch=len(dense.epochs) + 1, channel_groups=groups,
                                 latency=latency)
    return OpenRun(cfg, inputs, method, model, params, batch_stats, phases)


def latency_table_path(cfg: Config) -> str:
    return cfg.method.latency_table or os.path.join(cfg.run.workdir, "latency_table.json")


def latency_table(cfg: Config, model: nn.Module, params: PyTree, shape: tuple):
    """The run's table of measured latency (``--target=latency``): ``--latency_table``, or
    its workdir's, or measured here now and saved there, so that a resumed run steers by
    the table it started with."""
    path, batch = latency_table_path(cfg), cfg.method.latency_batch or 1

    def measured():
        if not os.path.exists(path):
            print(f"measuring the latency of {cfg.model.name}'s layers at batch {batch} "
                  "(hf.structured.latency.measure)", flush=True)
            table = hf.structured.latency.measure(model, params, shape, batch=batch)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            table.save(path)
    parallel.primary_first(measured)
    table = hf.structured.LatencyTable.load(path)
    if table.batch != batch:
        raise ValueError(f"{path} was measured at batch {table.batch}, not at "
                         f"--latency_batch={batch}.")
    return table


def load_inputs(cfg: Config) -> Inputs:
    data = parallel.primary_first(lambda: load_dataset(cfg.data.dataset, cfg.data.data_dir))
    if len(data.x_train) < cfg.data.batch_size:
        raise ValueError(f"--batch_size={cfg.data.batch_size} exceeds the "
                         f"{len(data.x_train)} training images.")
    mean, std = channel_stats(data.x_train)
    return Inputs(data, mean, std, steps_per_epoch(len(data.x_train), cfg.data.batch_size))


def build_model(cfg: Config, num_classes: int, axis_name: str | None = "batch",
                dtype=None) -> nn.Module:
    """The plain ``--model``."""
    m = cfg.model
    return models.create(m.name, num_classes, m.width, dtype or jnp.dtype(m.dtype),
                         axis_name=axis_name, kernel_init=m.kernel_init,
                         train_bn_scale=m.train_bn_scale,
                         zero_init_residual=m.zero_init_residual)


def init_variables(model: nn.Module, seed: int, image_shape: tuple) -> tuple[Any, Any]:
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(seed), jnp.zeros((1,) + image_shape, jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})


def starting_variables(run: OpenRun) -> tuple[Any, Any]:
    """The params and batch stats training starts from: ``initial_variables``, as the
    method calibrates them (``Method.calibrate``) on the first training batches, those
    its scores see (``sample_batches``)."""
    return run.method.calibrate(run.model, initial_variables(run),
                                sample_batches(run.cfg, run.inputs))


def initial_variables(run: OpenRun) -> tuple[Any, Any]:
    """The fresh params and batch stats, or those of ``--init_checkpoint`` (a dense run of
    the plain ``--model``), which the method's model takes over by layer name
    (``Method.take_over``)."""
    cfg, image_shape = run.cfg, run.inputs.data.image_shape
    if not cfg.schedule.init_checkpoint:
        return run.params, run.batch_stats
    ckpt = Checkpoints(cfg.schedule.init_checkpoint)
    epoch = ckpt.latest()
    if epoch is None:
        raise FileNotFoundError(f"--init_checkpoint={cfg.schedule.init_checkpoint} holds no "
                                "checkpoint (pass a run's checkpoints/dense directory).")
    plain = build_model(cfg, run.inputs.data.num_classes)
    params, batch_stats = jax.eval_shape(lambda: init_variables(plain, cfg.run.seed, image_shape))
    state, _ = ckpt.restore(epoch, {"params": params, "batch_stats": batch_stats}, part=True)
    ckpt.close()
    return run.method.take_over((run.params, run.batch_stats),
                                (state["params"], state["batch_stats"]))


def scoring(cfg: Config, inputs: Inputs, method: methods.Method, batch_stats,
            num_batches: int = 4) -> methods.Scoring:
    """A loss and a few training batches for the scores of at-initialization methods,
    BatchNorm in training mode (batch statistics, as at initialization there are no
    others); and the loss for scores during training, BatchNorm in eval mode on the
    statistics the train step hands over. Neither needs a device axis.
    """
    model = method.model(build_model(cfg, inputs.data.num_classes, None, jnp.float32),
                         cfg.method.target_sparsity)

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch[0],
                                train=True, mutable=["batch_stats"])
        return smoothed_cross_entropy(logits, batch[1], cfg.schedule.label_smoothing)

    def eval_loss_fn(params, batch, batch_stats):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, batch[0],
                             train=False)
        return smoothed_cross_entropy(logits, batch[1], cfg.schedule.label_smoothing)

    return methods.Scoring(loss_fn, sample_batches(cfg, inputs, num_batches), eval_loss_fn)


def sample_batches(cfg: Config, inputs: Inputs, num_batches: int = 4) -> list:
    """The first ``num_batches`` (normalized images, labels) of epoch 0, unaugmented."""
    batches = train_batches(inputs.data.x_train, inputs.data.y_train, cfg.data.batch_size,
                            cfg.run.seed, 0, inputs.mean, inputs.std, augment=False)
    return [b for _, b in zip(range(num_batches), batches)]


def dense_phase(cfg: Config, spe: int, model: nn.Module) -> Phase:
    s = cfg.schedule
    epochs = 0 if s.init_checkpoint else s.dense_epochs
    lr = optax.cosine_decay_schedule(s.lr, max(epochs * spe, 1))
    tx = optax.chain(optax.add_decayed_weights(s.weight_decay), optax.sgd(lr, momentum=0.9))
    return Phase("dense", range(1, epochs + 1), model, tx, masked=False,
                 learning_rates=lambda step: {"lr": float(lr(step))},
                 readings=methods.no_readings)


def pruning_phases(cfg: Config, spe: int, method: methods.Method, model: nn.Module,
                   score: methods.Scoring, first_epoch: int,
                   channel_groups: Callable[[], Any],
                   latency: Callable[[], Any] | None = None) -> tuple[Phase, ...]:
    """The pruning phase, its regrowth epochs in it; or, where the method retrains
    another network in them (``Method.retraining``), the pruning epochs, then that."""
    s, p = cfg.schedule, cfg.method
    pruning_steps, regrowth_steps = s.pruning_epochs * spe, s.regrowth_epochs * spe
    weight_lr = recipe.weight_learning_rate(s.lr, pruning_steps, regrowth_steps)
    lr, period = methods.presence_settings(cfg, spe)
    budget = methods.Budget(
        target_sparsity=p.target_sparsity, pruning_steps=pruning_steps,
        regrowth_steps=regrowth_steps, steps_per_epoch=spe,
        controller_period=period, controller=p.controller or method.controller,
        presence_lr=recipe.presence_learning_rate(lr, pruning_steps, regrowth_steps),
        weight_lr=weight_lr, regrowth_allowance=p.regrowth_allowance,
        distribution=method.distribution(p.distribution), seed=cfg.run.seed, scoring=score,
        channel_groups=channel_groups, model=cfg.model.name, measure=p.measure,
        rounds=p.rounds, round_to=p.round_to, latency=latency)
    tx = method.optimizer(budget, optax.add_decayed_weights(s.weight_decay),
                          optax.sgd(weight_lr, momentum=0.9))
    regrowth_from = first_epoch + s.pruning_epochs
    regrowth = range(regrowth_from, regrowth_from + s.regrowth_epochs)
    pruning = Phase("pruning", range(first_epoch, regrowth.stop), model, tx,
                    masked=method.masked,
                    learning_rates=lambda step: method.learning_rates(budget, step),
                    readings=method.readings, regrowth_from=regrowth_from)
    retraining = method.retraining(budget, model)
    if retraining is None:
        return (pruning,)
    return (dataclasses.replace(pruning, epochs=range(first_epoch, regrowth_from)),
            Phase("finetune", regrowth, retraining.model, retraining.tx, masked=True,
                  learning_rates=retraining.learning_rates, readings=method.readings,
                  start=retraining.start))


def abstract_state(tx: optax.GradientTransformation, params, batch_stats) -> TrainState:
    """The state's shapes and dtypes, for a restore: ``tx.init`` is traced, never run."""
    return jax.eval_shape(lambda p, b: TrainState(jnp.zeros((), jnp.int32), p, b, tx.init(p)),
                          params, batch_stats)
