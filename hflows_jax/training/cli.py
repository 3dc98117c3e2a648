"""The command line of the training experiments: one ``--flag=value`` per config field.

An experiment supplies its default preset and docstring. ``--preset=NAME`` starts from
another named preset; explicit flags always win. Values are checked by
``Config.validate`` alone, and errors a user can fix are printed as one line, not a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from hflows_jax import methods, models
from hflows_jax.training import presets
from hflows_jax.training.config import DTYPES, FLAGS, Config
from hflows_jax.training.train import run

HELP = {
    "model": f"model: {', '.join(sorted(models.MODELS))}",
    "method": f"pruner: {', '.join(methods.REGISTRY)}",
    "distribution": "baselines: global, uniform or erk (default: the method's own)",
    "dataset": "cifar10, cifar100, mnist (tfds) or npz:PATH (local arrays)",
    "data_dir": "tfds data directory",
    "dtype": f"compute dtype: {', '.join(DTYPES)}",
    "dense_epochs": "dense training first, when no --init_checkpoint is given",
    "init_checkpoint": "start from a trained dense model: a run's checkpoints/dense directory",
    "batch_size": "global batch size, split over all devices",
    "lr": "weight learning rate (SGD, momentum 0.9)",
    "presence_lr": "Adam learning rate of the presence scores (default: from the number of "
                   "pruning steps, recipe.presence_regime)",
    "kernel_init": "conv and dense kernel init: lecun_normal (Flax) or he_uniform (reference)",
    "train_bn_scale": "train BatchNorm scales; false keeps them at 1, as the reference does",
    "zero_init_residual": "ResNets: start each block's last BatchNorm scale at 0",
    "regrowth_allowance": "expected relative density gain of the regrowth phase; the pruning "
                          "phase aims that much below the target density",
    "dense_only": "the dense baseline: train --dense_epochs, no pruning",
    "pressure_updates_per_epoch": "pressure-controller periods per epoch (default: about 100 "
                                  "over the pruning phase, recipe.presence_regime)",
    "controller": "pressure controller: trajectory (the reference's) or pi (PI on the "
                  "log-density error, hf.pressure.log_density_pi); default: the method's "
                  "(hyperflows: trajectory, hyperflows_channel: pi)",
    "augment": "random crop (pad 4) and horizontal flip; --augment=false to turn off",
    "width": "width multiplier of the model",
    "eval_every": "epochs between test evaluations",
    "log_every": "steps between progress-bar updates",
    "keep_checkpoints": "checkpoints kept per phase (0: every epoch's, for analysis)",
    "parallel": "pmap (default) or shard_map: the same per-device step over a device mesh",
    "coordinator_address": "multi-process run started by hand: HOST:PORT of process 0 (with "
                           "--num_processes and --process_id; TPU pods and SLURM need none)",
    "num_processes": "multi-process run: how many processes (one per host)",
    "process_id": "multi-process run: this process's index, 0 to --num_processes - 1",
    "compilation_cache": "JAX's persistent compilation cache in ~/.cache/hflows_jax "
                         "(repeated and resumed runs start in seconds); false to turn off",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser(defaults: Config, prog: str, doc: str, add_help: bool = True
           ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"start from a named preset: {', '.join(presets.PRESETS)}")
    for flag, default in defaults.flags().items():
        kind = FLAGS[flag][2]
        kwargs = {"default": default, "help": HELP.get(flag)}
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


def main(defaults: Config, prog: str, doc: str, argv=None) -> dict:
    return run(parse(defaults, prog, doc, argv))


def exit_on_user_errors(fn: Callable[[], Any]) -> None:
    """Run ``fn`` for ``python -m``: errors a user can fix exit with one line, no traceback."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def command_line(defaults: Config, prog: str, doc: str) -> None:
    exit_on_user_errors(lambda: main(defaults, prog, doc))
