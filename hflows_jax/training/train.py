"""The reference recipe as one resumable run: dense training, pruning, regrowth.

Data flows one way, as in the Flax examples' ``train.py``:

    config -> open_run (data, method and model, phases; ``runs.py``) -> state (init,
    or restore onto a template from ``jax.eval_shape``) -> epochs -> outputs

``run(cfg)`` is what ``python -m experiments.cifar`` calls. Every epoch ends with an
orbax checkpoint, so rerunning the same command continues the same run: batch order and
augmentation depend only on (seed, epoch, step), and the checkpoint holds the rest.
"""

from __future__ import annotations

import dataclasses
import json
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
from hflows_jax.data import normalize, train_batches
from hflows_jax.flops import forward_macs
from hflows_jax.training import outputs, parallel, plots
from hflows_jax.structured.measured_landing import TOLERANCE
from hflows_jax.training.checkpoint import Checkpoints
from hflows_jax.training.config import RESUMABLE_CHANGES, Config
from hflows_jax.training.runs import (Inputs, OpenRun, Phase, latency_table_path, open_run,
                                      starting_variables)
from hflows_jax.training.state import TrainState
from hflows_jax.training.step import (make_eval_step, make_statistics_step, make_train_step,
                                      mean_statistics, reestimated_statistics)

EVAL_BATCH = 1000  # test images per evaluation batch
TARGET_TOLERANCE = 0.005  # a final sparsity further than this from the target is a miss


@dataclasses.dataclass(frozen=True)
class Setup(OpenRun):
    """The opened run, with what training it needs: fixed for the whole run."""

    # time.time() at the start of this process's run, less the seconds the run's earlier
    # processes took up to their last checkpoint: a resumed run's clock goes on.
    started: float = 0.0
    parallel: parallel.Pmap | parallel.ShardMap | None = None  # how steps run over devices
    test_set: Any = None  # the test set on the devices (device_test_set)
    warnings: tuple[str, ...] = ()  # what keeps the run from its target, known at start


def pruned_network(run: OpenRun, state: TrainState, phase: Phase) -> tuple:
    """``(model, variables, masks, groups)`` of a state of a pruning phase
    (``Method.pruned_network`` on that phase's model): what ``hf.export`` takes."""
    return run.method.pruned_network(phase.model, state.params, state.batch_stats,
                                     state.opt_state, run.inputs.data.image_shape)


def evaluated_network(run: OpenRun, state: TrainState, epoch: int) -> tuple:
    """``pruned_network`` with the BatchNorm statistics the loop evaluated epoch ``epoch``
    on (re-estimated over ``--bn_batches`` of its training batches; open ``run`` without a
    device axis): what ``experiments.export`` serves."""
    phase = run.phase_of(epoch)
    model, variables, masks, groups = pruned_network(run, state, phase)
    if phase.masked and run.cfg.run.bn_batches and jax.tree.leaves(variables["batch_stats"]):
        batches = statistics_batches(run.cfg, run.inputs, epoch)
        variables = {**variables,
                     "batch_stats": reestimated_statistics(model, variables, batches)}
    return model, variables, masks, groups


# --- state: init or restore ----------------------------------------------------------------

def new_state(tx: optax.GradientTransformation, params, batch_stats) -> TrainState:
    # One compiled program, not dozens of op-by-op dispatches (each compiles).
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, jax.jit(tx.init)(params))


def record(cfg: Config, epochs_done: int, history: list[dict]) -> dict:
    """The JSON side of a checkpoint."""
    config = {k: v for k, v in cfg.flags().items() if k not in RESUMABLE_CHANGES}
    return {"epochs_done": epochs_done, "seed": cfg.run.seed, "history": history,
            "config": config}


def check_same_run(cfg: Config, saved: dict) -> None:
    """Refuse a saved run of another config. A flag the saved run does not name came
    later; the run stands for its default (new flags default to the behaviour before them)."""
    mine, theirs = record(cfg, 0, [])["config"], saved.get("config", {})
    defaults = Config().flags()
    theirs = {k: theirs.get(k, defaults[k]) for k in mine}
    diff = {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{cfg.run.workdir} holds a run with another config ({changes}). "
                         "Use a new --workdir, or the same flags to resume.")


def resume_point(phases: tuple[Phase, ...], ckpts: dict) -> tuple[int, int | None]:
    """(index of the latest phase with a checkpoint, its last saved epoch), else (0, None)."""
    found = [(i, epoch) for i, epoch in enumerate(ckpts[p.name].latest() for p in phases)
             if epoch is not None]
    return found[-1] if found else (0, None)


# --- epochs -----------------------------------------------------------------------------

def refreshes_statistics(setup: Setup, phase: Phase, state: TrainState) -> bool:
    """Whether this phase evaluates on re-estimated BatchNorm statistics: while masks
    change (pruning, regrowth), with BatchNorm in the model and ``--bn_batches`` set."""
    return phase.masked and setup.cfg.run.bn_batches > 0 and bool(
        jax.tree.leaves(state.batch_stats))


def compile_steps(setup: Setup, phase: Phase, placed: TrainState, statistics: bool) -> tuple:
    """The phase's train, eval and (with ``statistics``) BatchNorm statistics steps over
    the devices, compiled ahead of time, and the seconds that took (JAX's persistent
    compilation cache makes a repeated run's compile short)."""
    cfg, par, n = setup.cfg, setup.parallel, jax.local_device_count()
    started = time.time()
    train_step = par.compile(make_train_step(
        phase.model, phase.tx, phase.masked, cfg.schedule.label_smoothing,
        setup.method.loss_term), num_batch_args=2, donate_state=True)
    per_device = cfg.data.batch_size // jax.device_count()
    images = par.put_batch(np.zeros((n, per_device) + setup.inputs.data.image_shape,
                                    np.float32))
    labels = par.put_batch(np.zeros((n, per_device), np.int32))
    train_step = par.precompile(train_step, placed, images, labels)
    eval_step = par.precompile(par.compile(make_eval_step(phase.model, phase.masked),
                                           num_batch_args=3), placed, *setup.test_set)
    statistics_step = None
    if statistics:
        statistics_step = par.precompile(par.compile(
            make_statistics_step(phase.model, phase.masked), num_batch_args=1), placed, images)
    return train_step, eval_step, statistics_step, time.time() - started


def epoch_batches(cfg: Config, inputs: Inputs, epoch: int):
    """This process's (normalized images, labels) for every step of one epoch."""
    return train_batches(inputs.data.x_train, inputs.data.y_train, cfg.data.batch_size,
                         cfg.run.seed, epoch, inputs.mean, inputs.std, cfg.data.augment,
                         jax.process_index(), jax.process_count())


def statistics_batches(cfg: Config, inputs: Inputs, epoch: int):
    """The first ``--bn_batches`` training batches of an epoch's order (images only)."""
    for _, (images, _) in zip(range(cfg.run.bn_batches), epoch_batches(cfg, inputs, epoch)):
        yield images


def with_fresh_statistics(setup: Setup, statistics_step, placed: TrainState,
                          epoch: int) -> TrainState:
    """``placed`` with BatchNorm statistics re-estimated for its current masks: the mean
    over ``--bn_batches`` training batches of each batch's statistics, as an evaluation
    sees them. Training keeps its own running statistics."""
    par, n = setup.parallel, jax.local_device_count()
    stats = [statistics_step(placed, par.put_batch(parallel.split_for_devices(images, n)))
             for images in statistics_batches(setup.cfg, setup.inputs, epoch)]
    return placed._replace(batch_stats=mean_statistics(stats, placed.batch_stats))


def device_test_set(inputs: Inputs, par: parallel.Pmap | parallel.ShardMap,
                    max_batch: int = EVAL_BATCH):
    """The normalized test set on the devices, ``(devices, batches, per_device, ...)``,
    padded with zero-weight images, so evaluation is one program. Each process holds the
    rows of its own devices."""
    num_devices, local = jax.device_count(), jax.local_device_count()
    images = normalize(inputs.data.x_test, inputs.mean, inputs.std)
    count = len(images)
    # As few batches as max_batch allows, as even as the device count allows: on one
    # device 1017 images make 2 batches of 509, not 1000 + 17 (and 983 of padding).
    batches = -(-count // max_batch)
    batch_size = -(-count // (batches * num_devices)) * num_devices
    padded = batches * batch_size

    def layout(a):
        a = np.concatenate([a, np.zeros((padded - count,) + a.shape[1:], a.dtype)])
        a = a.reshape((batches, num_devices, batch_size // num_devices) + a.shape[1:])
        return np.swapaxes(a, 0, 1)

    valid = np.ones(count, np.float32)
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return par.put_resident(*(layout(a)[mine] for a in (images, inputs.data.y_test, valid)))


def train_epoch(setup: Setup, train_step, placed: TrainState, epoch: int, label: str):
    """One epoch of steps; returns the new state, mean loss and accuracy, and seconds."""
    cfg, inputs, par, n = setup.cfg, setup.inputs, setup.parallel, jax.local_device_count()
    spe = inputs.steps_per_epoch
    started = time.time()
    sums = {"loss": 0.0, "accuracy": 0.0}
    batches = epoch_batches(cfg, inputs, epoch)
    pending = []
    # A context, so that an interrupted epoch clears its bar too.
    with tqdm(batches, total=spe, desc=f"{label} {epoch}", leave=False, file=sys.stderr,
              disable=None if parallel.is_primary() else True) as bar:
        for step, (images, labels) in enumerate(bar, 1):
            placed, metrics = train_step(
                placed, par.put_batch(parallel.split_for_devices(images, n)),
                par.put_batch(parallel.split_for_devices(labels, n)))
            pending.append(metrics)
            if step % cfg.run.log_every == 0 or step == spe:
                for m in pending:
                    for k in sums:
                        sums[k] += par.scalar(m[k])
                pending = []
                bar.set_postfix(loss=f"{sums['loss'] / step:.4f}")
    means = {"loss": sums["loss"] / spe, "train_accuracy": sums["accuracy"] / spe}
    return placed, means, time.time() - started


def train_phase(setup: Setup, phase: Phase, state: TrainState, first: int, history: list,
                ckpt: Checkpoints) -> tuple[TrainState, list]:
    """Epochs ``first..`` of a phase; returns the state and the history. The first epoch
    row of the phase in this process carries the compile time of its steps."""
    cfg, par = setup.cfg, setup.parallel
    placed = par.put_state(state)
    fresh = refreshes_statistics(setup, phase, state)
    train_step, eval_step, statistics_step, compile_s = compile_steps(setup, phase, placed,
                                                                      fresh)
    skipped = phase.readings(state.opt_state)["skipped_steps"]
    for epoch in range(first, phase.epochs[-1] + 1):
        placed, means, seconds = train_epoch(setup, train_step, placed, epoch,
                                             phase.label(epoch))
        state = par.get_state(placed)
        landed = land_on_measured(setup, phase, state)
        if landed is not state:
            state, placed = landed, par.put_state(landed)
        evaluate = epoch % cfg.run.eval_every == 0 or epoch == phase.epochs[-1]
        readings = phase.readings(state.opt_state)
        started = time.time()
        test_accuracy = running = None
        if evaluate:
            evaluated = (with_fresh_statistics(setup, statistics_step, placed, epoch)
                         if fresh else placed)
            test_accuracy = accuracy(setup, eval_step, evaluated)
            if fresh and epoch == phase.epochs[-1]:  # the running statistics, for the report
                running = accuracy(setup, eval_step, placed)
        row = {"phase": phase.label(epoch), "epoch": epoch, **means,
               "test_accuracy": test_accuracy,
               "test_accuracy_running_stats": running,
               "sparsity": readings["sparsity"], "pressure": readings["pressure"],
               **phase.learning_rates(int(state.step)),
               "skipped_steps": readings["skipped_steps"] - skipped,
               "compile_s": compile_s if epoch == first else 0.0,
               "train_s": seconds,
               "eval_s": time.time() - started,
               "images_per_s": setup.inputs.steps_per_epoch * cfg.data.batch_size / seconds,
               "time_s": time.time() - setup.started}
        skipped = readings["skipped_steps"]
        history = history + [row]
        ckpt.save(epoch, state, record(cfg, epoch, history))  # every process takes part
        if parallel.is_primary():
            log(row)
            outputs.write_csv(os.path.join(cfg.run.workdir, "metrics.csv"), history)
    return state, history


def accuracy(setup: Setup, eval_step, placed: TrainState) -> float:
    correct, count = eval_step(placed, *setup.test_set)
    return setup.parallel.scalar(correct) / setup.parallel.scalar(count)


def log(row: dict) -> None:
    test = "  n/a " if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
    lrs = "  ".join(f"{k} {row[k]:.3g}" for k in ("lr", "presence_lr") if k in row)
    skipped = f"  skipped {row['skipped_steps']}" if row["skipped_steps"] else ""
    compiled = f"  compile {row['compile_s']:.1f}s" if row["compile_s"] else ""
    print(f"{row['phase']:>8} epoch {row['epoch']:3d}  loss {row['loss']:.4f}  "
          f"train_acc {row['train_accuracy']:.4f}  test_acc {test}  "
          f"sparsity {row['sparsity']:.4f}  pressure {row['pressure']:.4g}  {lrs}  "
          f"{row['images_per_s']:.0f} img/s{compiled}{skipped}  [{row['time_s']:.0f}s]",
          flush=True)


# --- outputs ----------------------------------------------------------------------------

def missed_target(cfg: Config, sparsity: float) -> float | None:
    """Final minus target sparsity when they are further apart than TARGET_TOLERANCE."""
    missed_by = sparsity - cfg.method.target_sparsity
    return missed_by if abs(missed_by) > TARGET_TOLERANCE else None


def missed_target_message(cfg: Config, removed: float, what: str) -> str:
    """The warning for a run that ended away from its target, in plain words."""
    target = cfg.method.target_sparsity
    if removed == 0.0:
        return f"the run pruned nothing: 0.00% {what} for a {target:.2%} target."
    side = "above" if removed > target else "below"
    return (f"the run ended at {removed:.2%} {what}, {100 * abs(removed - target):.2f} "
            f"points {side} the {target:.2%} target.")


def latency_removed(cfg: Config, groups, opt_state) -> float:
    """The fraction of the exported model's latency the run's table predicts removed."""
    table = hf.structured.LatencyTable.load(latency_table_path(cfg))
    return 1.0 - float(table.fraction(groups.live_counts(hf.channel_masks(opt_state))))


def landing_path(cfg: Config) -> str:
    return os.path.join(cfg.run.workdir, "landing.json")


def land_on_measured(setup: Setup, phase: Phase, state: TrainState) -> TrainState:
    """``--target=latency``: at the epoch end where the channel budget landed on the
    table's prediction (``recipe.measured_land_step``), the cut moved onto the exported
    model's measured speed-up here
    (``hf.structured.land_measured``), once: its readings go to the workdir's
    landing.json, which a resumed run finds and leaves the state be."""
    cfg = setup.cfg
    if (cfg.method.target != "latency" or not phase.masked
            or os.path.exists(landing_path(cfg))):
        return state
    spe = setup.inputs.steps_per_epoch
    land_step = hf.recipe.measured_land_step(cfg.schedule.pruning_epochs * spe,
                                             cfg.schedule.regrowth_epochs * spe, spe)
    pruner = hf.masking.find_pruner_state(state.opt_state)
    if int(pruner.count) < land_step:  # the update that counts land_step lands
        return state
    if jax.process_count() > 1:  # each process would time its own cut: they would differ
        outputs.write_json(landing_path(cfg), {"readings": [], "measured": False})
        return state
    model, variables, _, groups = pruned_network(setup, state, phase)
    table = hf.structured.LatencyTable.load(latency_table_path(cfg))
    example = np.zeros((2,) + setup.inputs.data.image_shape, np.float32)
    landed, readings = hf.structured.land_measured(
        pruner, groups, lambda p, x: model.apply({**variables, "params": p}, x, train=False),
        state.params, example, cfg.method.target_speedup, table,  # unmasked: dense is dense
        round_to=cfg.method.round_to or 1)
    outputs.write_json(landing_path(cfg), {"readings": readings, "measured": True})
    if parallel.is_primary():
        print("landing on the measured speed-up (batch {}): {}".format(table.batch, ", ".join(
            f"{r['predicted']:.2f}x predicted -> {r['measured']:.2f}x measured"
            for r in readings)), flush=True)
    return state._replace(opt_state=hf.masking.replace_pruner_state(state.opt_state, landed))


def landing_warnings(cfg: Config, landing: dict) -> list[str]:
    """What keeps a latency run's exported model from its speed-up, measured."""
    if not landing["measured"]:
        return ["the landing was not measured (several processes, or the run ended before "
                "its land step): the speed-up is the latency table's prediction."]
    best = min(landing["readings"], key=lambda r: abs(r["measured"] / cfg.method.target_speedup
                                                       - 1))
    if abs(best["measured"] / cfg.method.target_speedup - 1) <= TOLERANCE:
        return []
    return [f"the exported model measured {best['measured']:.2f}x for the "
            f"{cfg.method.target_speedup:g}x asked (best of {len(landing['readings'])} "
            "cuts timed at the landing): no cut came nearer on this machine."]


def final_network(setup: Setup, phase: Phase, state: TrainState) -> tuple:
    """``(model, variables, masks, groups)`` the run ended with (``state``, of its last
    ``phase``): the pruned network, or the dense one of a ``--dense_only`` run."""
    if setup.cfg.pruned:
        return pruned_network(setup, state, phase)
    return phase.model, {"params": state.params, "batch_stats": state.batch_stats}, None, None


def finish(setup: Setup, phase: Phase, state: TrainState, history: list) -> dict:
    """report.json, run.png and the last line of the log."""
    cfg, data, method = setup.cfg, setup.inputs.data, setup.method
    network = final_network(setup, phase, state)
    model, variables, masks, _ = network
    macs_dense, macs_sparse = forward_macs(model, variables["params"], data.image_shape,
                                           masks)
    params_total = sum(int(p.size) for p in jax.tree.leaves(variables["params"]))
    pruned = sum(int(m.size - m.sum()) for m in jax.tree.leaves(masks))
    train_s = sum(r["train_s"] for r in history)
    images = len(history) * setup.inputs.steps_per_epoch * cfg.data.batch_size
    sparsity = phase.readings(state.opt_state)["sparsity"]
    layer_sparsity = method.layer_sparsity(state.opt_state) if cfg.pruned else {}
    removed, what = sparsity, "sparsity"  # what --target_sparsity counts
    if cfg.pruned:
        removed, what = method.removed(network, state.opt_state, lambda: normalize(
            data.x_test, setup.inputs.mean, setup.inputs.std))
        if cfg.method.target == "latency":
            removed, what = latency_removed(cfg, network[3], state.opt_state), \
                "of the predicted latency removed"
    missed_by = missed_target(cfg, removed) if cfg.pruned else None
    warnings = list(setup.warnings)
    if missed_by is not None:
        warnings.append(missed_target_message(cfg, removed, what))
    landing = None
    if cfg.pruned and cfg.method.target == "latency":
        landing = {"readings": [], "measured": False}
        if os.path.exists(landing_path(cfg)):
            with open(landing_path(cfg)) as f:
                landing = json.load(f)
        warnings.extend(landing_warnings(cfg, landing))
    result = {
        "test_accuracy": [r for r in history if r["test_accuracy"] is not None][-1][
            "test_accuracy"],
        # with --bn_batches: the last phase's final accuracy on the running statistics
        "test_accuracy_running_stats": history[-1].get("test_accuracy_running_stats"),
        "sparsity": sparsity,
        # what target_sparsity counts: weights, flops or latency
        "target": cfg.method.target or method.target,
        "target_removed": removed,  # the fraction of it removed (weights: the sparsity)
        "target_missed_by": missed_by,  # final - target when over 0.5 points apart, else None
        "measured_landing": landing,  # --target=latency: the cuts timed (land_on_measured)
        "warnings": warnings,
        "layer_sparsity": layer_sparsity,
        "params_total": params_total,
        "params_remaining": params_total - pruned,
        "flops_dense": macs_dense,
        "flops_sparse": macs_sparse,
        "skipped_steps": sum(r["skipped_steps"] for r in history),
        "compile_s": sum(r["compile_s"] for r in history),  # over every process of the run
        "images_per_s": images / train_s,  # steady training, compile and evaluation excluded
        "wall_time_s": time.time() - setup.started,
        "devices": [str(d) for d in jax.devices()],  # of every process
        "processes": jax.process_count(),
        "config": cfg.flags(),
        "environment": outputs.environment(),  # commit, command, data hashes, machine
        "history": history,
    }
    if not parallel.is_primary():
        return result
    outputs.write_json(os.path.join(cfg.run.workdir, "report.json"), result)
    plots.plot_run(os.path.join(cfg.run.workdir, "run.png"), history, layer_sparsity,
                   f"{cfg.model.name} on {data.name}, target {cfg.method.target_sparsity:.1%}")
    print(f"test_accuracy {result['test_accuracy']:.4f}  sparsity {result['sparsity']:.4f}  "
          f"params {result['params_remaining']}/{params_total}  "
          f"MACs {macs_sparse}/{macs_dense}"
          + (f"  {what} {removed:.4f}" if method.target != "weights" else "")
          + f"  -> {cfg.run.workdir}", flush=True)
    for warning in warnings:
        print(f"WARNING: {warning}", flush=True)
    return result


# --- the run ----------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the epochs; the message says where the checkpoints leave off."""


def last_epoch(cfg: Config) -> int:
    s = cfg.schedule
    dense = 0 if s.init_checkpoint else s.dense_epochs
    return dense + (0 if s.dense_only else s.pruning_epochs + s.regrowth_epochs)


def finished_report(cfg: Config) -> dict | None:
    """The report of this run when ``--workdir`` holds it finished, else None: a rerun
    of a finished run leaves its outputs alone. A report of another config is refused."""
    path = os.path.join(cfg.run.workdir, "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    check_same_run(cfg, report)
    return report if report["history"][-1]["epoch"] == last_epoch(cfg) else None


def interrupted(cfg: Config, ckpts: dict) -> Interrupted:
    """Where an interrupted run stopped, and how to go on."""
    saved = [(ckpt.latest(), ckpt.directory) for ckpt in ckpts.values()
             if ckpt.latest() is not None]
    if not saved:
        return Interrupted(f"Interrupted before the first epoch ended; nothing is saved in "
                           f"{cfg.run.workdir}. Rerun the same command to start again.")
    epoch, directory = max(saved)
    return Interrupted(f"Interrupted after epoch {epoch} of {last_epoch(cfg)} (checkpoint in "
                       f"{directory}). Rerun the same command to resume from there.")


def check_devices(cfg: Config) -> None:
    devices = jax.device_count()
    if cfg.data.batch_size % devices:
        raise ValueError(f"--batch_size={cfg.data.batch_size} is not divisible by the "
                         f"{devices} devices; use a multiple of {devices}.")


def describe_devices(cfg: Config) -> str:
    """The run's first log line: what it runs on."""
    return (f"{jax.default_backend()}: {jax.device_count()} devices "
            f"({jax.devices()[0].device_kind}) in {jax.process_count()} process(es), "
            f"{jax.local_device_count()} here (process {jax.process_index()}); "
            f"--parallel={cfg.run.parallel}")


def run(cfg: Config) -> dict:
    """Train the run of ``cfg`` (or resume it) and write its outputs. The process's JAX
    setup (a multi-process run, the compilation cache) is the caller's: ``cli.configure``."""
    cfg = cfg.validate()
    r = cfg.run
    if r.num_processes and not jax.distributed.is_initialized():
        raise ValueError("--num_processes needs jax.distributed initialized first: call "
                         "hflows_jax.training.cli.configure(cfg) before run(cfg), as the "
                         "command line does.")
    check_devices(cfg)
    primary = parallel.is_primary()
    report = finished_report(cfg)
    if report is not None:
        if primary:
            print(f"The run in {r.workdir} is finished (epoch {last_epoch(cfg)}); its outputs "
                  "stay as they are. Use a new --workdir to run it again.", flush=True)
        return report
    started = time.time()
    if primary:
        print(describe_devices(cfg), flush=True)
        os.makedirs(r.workdir, exist_ok=True)
    setup = training_setup(open_run(cfg), started)
    for warning in setup.warnings if primary else ():
        print(f"WARNING: {warning}", flush=True)
    ckpts = {p.name: setup.checkpoints(p.name) for p in setup.phases}
    try:
        setup, state, history = run_phases(setup, setup.phases, ckpts,
                                           lambda: starting_variables(setup))
    except KeyboardInterrupt as e:
        raise interrupted(cfg, ckpts) from e
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    return finish(setup, setup.phase_of(history[-1]["epoch"]), state, history)


def training_setup(opened: OpenRun, started: float) -> Setup:
    """``opened`` with its devices, its test set on them, and its start warnings."""
    cfg, par = opened.cfg, parallel.backend(opened.cfg.run.parallel)
    warnings = (opened.method.start_warnings(cfg, opened.inputs.steps_per_epoch)
                if cfg.pruned else [])
    fields = {f.name: getattr(opened, f.name) for f in dataclasses.fields(OpenRun)}
    return Setup(**fields, started=started, parallel=par,
                 test_set=device_test_set(opened.inputs, par), warnings=tuple(warnings))


def phase_start(phase: Phase, previous: TrainState | None, starting: Callable) -> TrainState:
    """A phase's first state: its ``start`` of the previous phase's last state; else that
    state's params and batch stats (for the run's first phase, ``starting()``'s) under a
    fresh ``tx.init``."""
    if previous is not None and phase.start is not None:
        return jax.jit(phase.start)(previous)
    params, batch_stats = (starting() if previous is None
                           else (previous.params, previous.batch_stats))
    return new_state(phase.tx, params, batch_stats)


def run_phases(setup: Setup, phases: tuple[Phase, ...], ckpts: dict, starting: Callable):
    """Train every phase from where the checkpoints leave off; each phase starts from the
    weights the previous one ended with (``phase_start``), the first from ``starting()``
    (``runs.starting_variables``: loaded and calibrated only when no checkpoint is
    restored). Returns the setup (on a resumed run, its clock set back by the earlier
    processes' seconds), the last state and the history."""
    start, restored = resume_point(phases, ckpts)
    state, history = None, []
    for i, phase in enumerate(phases[start:], start):
        if not phase.epochs:
            continue
        first = phase.epochs[0]
        if i == start and restored is not None:
            state, saved = ckpts[phase.name].restore(restored, setup.template(phase.name))
            check_same_run(setup.cfg, saved)
            history, first = saved["history"], restored + 1
            setup = dataclasses.replace(setup, started=setup.started - history[-1]["time_s"])
            if parallel.is_primary() and restored == last_epoch(setup.cfg):
                print(f"All {restored} epochs are in {ckpts[phase.name].directory}; writing "
                      "the outputs.", flush=True)
            elif parallel.is_primary():
                print(f"Resuming {phase.name} after epoch {restored} from "
                      f"{ckpts[phase.name].directory}", flush=True)
        else:
            state = phase_start(phase, state, starting)
        if first <= phase.epochs[-1]:  # a finished phase is not compiled again
            state, history = train_phase(setup, phase, state, first, history,
                                         ckpts[phase.name])
    return setup, state, history
