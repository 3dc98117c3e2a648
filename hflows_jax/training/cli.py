"""The command line of the experiments: one flag per ``Config`` field, ``--name=value``.

Each experiment supplies its own defaults (a ``Config``) and docstring; errors a user
can fix are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hflows_jax import models
from hflows_jax.training.loop import DTYPES, Config, run
from hflows_jax.training.pruners import METHODS

HELP = {
    "model": "model name",
    "method": "pruner: hyperflows, or a baseline (magnitude, snip, grasp, random, rigl)",
    "distribution": "baselines: global, uniform or erk (default: the method's own)",
    "dataset": "cifar10, cifar100, mnist (tfds) or npz:PATH (local arrays)",
    "data_dir": "tfds data directory",
    "dense_epochs": "dense training first, when no --init_checkpoint is given",
    "init_checkpoint": "start from a trained dense model: a run's checkpoints/dense directory",
    "batch_size": "global batch size, split over all devices",
    "lr": "weight learning rate (SGD, momentum 0.9)",
    "presence_lr": "Adam learning rate of the presence scores",
    "regrowth_allowance": "expected relative density gain of the regrowth phase; the pruning "
                          "phase aims that much below the target density",
    "dense_only": "the dense baseline: train --dense_epochs, no pruning",
    "pressure_updates_per_epoch": "pressure-controller periods per epoch (the reference: 1); "
                                  "more help short runs land on the target",
    "augment": "random crop (pad 4) and horizontal flip; --augment=false to turn off",
    "width": "width multiplier of the model",
    "eval_every": "epochs between test evaluations",
    "log_every": "steps between progress-bar updates",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser(defaults: Config, prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        default = getattr(defaults, field.name)
        kwargs = {"default": default, "help": HELP.get(field.name)}
        if field.name == "model":
            kwargs["choices"] = sorted(models.MODELS)
        elif field.name == "method":
            kwargs["choices"] = list(METHODS)
        elif field.name == "dtype":
            kwargs["choices"] = sorted(DTYPES)
        elif isinstance(default, bool):
            kwargs.update(type=_bool, nargs="?", const=True)
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        p.add_argument(f"--{field.name}", **kwargs)
    return p


def parse(defaults: Config, prog: str, doc: str, argv=None) -> Config:
    return Config(**vars(parser(defaults, prog, doc).parse_args(argv)))


def main(defaults: Config, prog: str, doc: str, argv=None) -> dict:
    return run(parse(defaults, prog, doc, argv))


def command_line(defaults: Config, prog: str, doc: str) -> None:
    """``main`` for ``python -m``: errors a user can fix exit with one line, no traceback."""
    try:
        main(defaults, prog, doc)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
