"""The command line of the training experiments: one ``--flag=value`` per config field.

An experiment supplies its default preset and docstring. ``--preset=NAME`` starts from
another named preset; explicit flags always win. Values are checked by
``Config.validate`` alone, and errors a user can fix are printed as one line, not a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import jax

from hflows_jax import methods, models
from hflows_jax.training import parallel, presets
from hflows_jax.training.config import DTYPES, FLAGS, Config
from hflows_jax.training.train import run

# One help line per flag; --help adds each flag's default (the chosen preset's). Where
# the default is unset (None), the line says what the run does then.
HELP = {
    # data
    "dataset": "cifar10, cifar100, mnist (tfds) or npz:PATH (local arrays x_train, "
               "y_train, x_test, y_test)",
    "data_dir": "tfds data directory; unset: tfds's default, ~/tensorflow_datasets",
    "batch_size": "global batch size, split over all devices",
    "augment": "random crop (pad 4) and horizontal flip; --augment=false to turn off",
    # model
    "model": f"model: {', '.join(sorted(models.MODELS))}",
    "width": "width multiplier of the model",
    "dtype": f"compute dtype: {', '.join(DTYPES)}",
    "kernel_init": "conv and dense kernel init: lecun_normal (Flax) or he_uniform (reference)",
    "train_bn_scale": "train BatchNorm scales; false keeps them at 1, as the reference does",
    "zero_init_residual": "ResNets: start each block's last BatchNorm scale at 0",
    # method
    "method": "pruner: {methods}",  # the registry as --help is built
    "target_sparsity": "fraction of prunable weights removed at the end (channel methods: "
                       "fraction of multiply-adds removed)",
    "distribution": "baselines: global, uniform, erk, or N:M such as 2:4 (snip, grasp, "
                    "importance); unset: the method's own",
    "presence_lr": "Adam learning rate of the presence scores; unset: from the number of "
                   "pruning steps (recipe.presence_regime)",
    "regrowth_allowance": "expected relative density gain of the regrowth phase; the pruning "
                          "phase aims that much below the target density",
    "pressure_updates_per_epoch": "pressure-controller periods per epoch; unset: about 100 "
                                  "over the pruning phase (recipe.presence_regime)",
    "controller": "pressure controller: trajectory (the reference's) or pi (PI on the "
                  "log-density error); unset: the method's own (hyperflows: trajectory, "
                  "hyperflows_channel: pi)",
    "measure": "importance: the score, a name of hf.importance.MEASURES; unset: magnitude",
    "rounds": "importance: pruning rounds, evenly spread over the pruning epochs, the "
              "density's inverse growing linearly (hf.prune_at); unset: 1",
    "round_to": "hyperflows_channel: every layer keeps a multiple of this many channels, "
                "so that the exported model runs the counts trained (8 suits XLA:CPU); "
                "unset: 1",
    "target": "hyperflows_channel: what --target_sparsity removes, flops (unset) or "
              "latency: the exported model's, as a table of its layers measured on this "
              "machine predicts it (hf.structured.latency)",
    "target_speedup": "--target=latency: the speed-up asked for; --target_sparsity becomes "
                      "1 - 1/speedup",
    "latency_batch": "--target=latency: the batch size the latency is measured at; unset: 1",
    "latency_table": "--target=latency: a table saved by an earlier run (its workdir's "
                     "latency_table.json); unset: measured at the run's start and saved there",
    # schedule
    "dense_epochs": "epochs of dense training first, when no --init_checkpoint is given",
    "init_checkpoint": "start from a trained dense model: a run's checkpoints/dense "
                       "directory; unset: train it (--dense_epochs)",
    "pruning_epochs": "epochs of the pruning phase (pressure on)",
    "regrowth_epochs": "epochs of the regrowth phase (no pressure) after pruning",
    "dense_only": "the dense baseline: train --dense_epochs, no pruning",
    "lr": "weight learning rate (SGD, momentum 0.9)",
    "weight_decay": "weight decay of the weights",
    "label_smoothing": "label smoothing of the cross-entropy",
    # run
    "seed": "initialization, batch order and augmentation",
    "workdir": "checkpoints, metrics.csv, report.json and run.png; rerun with it to resume",
    "eval_every": "epochs between test evaluations",
    "bn_batches": "training batches to re-estimate BatchNorm statistics on before each "
                  "evaluation while pruning (0: evaluate on the running statistics)",
    "log_every": "steps between progress-bar updates",
    "compilation_cache": "JAX's persistent compilation cache in ~/.cache/hflows_jax "
                         "(repeated and resumed runs start in seconds); false to turn off",
    "keep_checkpoints": "checkpoints kept per phase (0: every epoch's, for analysis)",
    "parallel": "pmap or shard_map: the same per-device step over a device mesh",
    "coordinator_address": "multi-process run started by hand: HOST:PORT of process 0 (with "
                           "--num_processes and --process_id; TPU pods and SLURM need none); "
                           "unset: JAX's own detection",
    "num_processes": "multi-process run: how many processes (one per host)",
    "process_id": "multi-process run: this process's index, 0 to --num_processes - 1",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _help(text: str, default: Any) -> str:
    """A flag's help line with its default, written as the flag takes it (true, not
    True); argparse %-formats help, so % is escaped."""
    if default is None:
        default = "unset"
    elif isinstance(default, bool):
        default = str(default).lower()
    return f"{text} (default: {default})".replace("%", "%%")


def parser(defaults: Config, prog: str, doc: str, add_help: bool = True
           ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=_help(
        f"start from a named preset: {', '.join(presets.PRESETS)}; explicit flags win; "
        "unset: this experiment's defaults, shown here", None))
    for flag, default in defaults.flags().items():
        kind = FLAGS[flag][2]
        text = HELP[flag]
        if flag == "method":  # the registry as it is now, not at import
            text = text.format(methods=", ".join(methods.REGISTRY))
        kwargs = {"default": default, "help": _help(text, default)}
        if kind is bool:
            kwargs.update(type=_bool, nargs="?", const=True)
        else:
            kwargs["type"] = kind
        p.add_argument(f"--{flag}", **kwargs)
    return p


def parse(defaults: Config, prog: str, doc: str, argv=None) -> Config:
    # First pass: only --preset, so that --help lists the chosen preset's defaults.
    known, _ = parser(defaults, prog, doc, add_help=False).parse_known_args(argv)
    if known.preset:
        defaults = presets.get(known.preset)
    flags = vars(parser(defaults, prog, doc).parse_args(argv))
    del flags["preset"]
    return defaults.replace(**flags).validate()


def configure(cfg: Config) -> None:
    """The process's JAX setup for ``cfg``, before anything touches a device, as Flax's
    ``main.py`` does: join a multi-process run (``parallel.initialize_distributed``), and
    JAX's persistent compilation cache in a user directory unless one is already set
    (e.g. by ``JAX_COMPILATION_CACHE_DIR``) or ``--compilation_cache=false``."""
    r = cfg.run
    parallel.initialize_distributed(r.coordinator_address, r.num_processes, r.process_id)
    jax.config.update("jax_enable_compilation_cache", r.compilation_cache)
    if r.compilation_cache and not jax.config.jax_compilation_cache_dir:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "hflows_jax", "jax"))


def main(defaults: Config, prog: str, doc: str, argv=None) -> dict:
    cfg = parse(defaults, prog, doc, argv)
    configure(cfg)
    return run(cfg)


def exit_on_user_errors(fn: Callable[[], Any]) -> None:
    """Run ``fn`` for ``python -m``: errors a user can fix exit with one line, no traceback;
    Ctrl-C says where the run stopped (``train.Interrupted``) and exits with 130, the
    shell's code for SIGINT."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(str(e) or "Interrupted.", file=sys.stderr, flush=True)
        sys.exit(130)


def command_line(defaults: Config, prog: str, doc: str) -> None:
    exit_on_user_errors(lambda: main(defaults, prog, doc))
