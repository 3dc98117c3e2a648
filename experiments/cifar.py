"""The reference CIFAR recipe: dense training, Hyperflows pruning, regrowth.

    python -m experiments.cifar --model=vgg19
    python -m experiments.cifar --model=resnet20 --dataset=npz:../shared/data/cifar10_5k.npz

Every epoch ends with a checkpoint in --workdir; rerun the same command to resume.
Writes metrics.csv, report.json and run.png there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hflows_jax import models
from hflows_jax.training import Config, run
from hflows_jax.training.loop import DTYPES


def parse_args(argv=None) -> Config:
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m experiments.cifar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.model, choices=sorted(models.MODELS))
    p.add_argument("--dataset", default=defaults.dataset,
                   help="cifar10, cifar100, mnist (tfds) or npz:PATH")
    p.add_argument("--data_dir", default=None, help="tfds data directory")
    p.add_argument("--target_sparsity", type=float, default=defaults.target_sparsity)
    p.add_argument("--dense_epochs", type=int, default=defaults.dense_epochs,
                   help="dense training first, when no --init_checkpoint is given")
    p.add_argument("--init_checkpoint", default=None,
                   help="start from a trained dense model: a run's checkpoints/dense directory")
    p.add_argument("--pruning_epochs", type=int, default=defaults.pruning_epochs)
    p.add_argument("--regrowth_epochs", type=int, default=defaults.regrowth_epochs)
    p.add_argument("--batch_size", type=int, default=defaults.batch_size,
                   help="global batch size, split over all devices")
    p.add_argument("--lr", type=float, default=defaults.lr, help="weight learning rate (SGD)")
    p.add_argument("--presence_lr", type=float, default=defaults.presence_lr,
                   help="Adam learning rate of the presence scores")
    p.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    p.add_argument("--label_smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument("--regrowth_allowance", type=float, default=defaults.regrowth_allowance,
                   help="expected relative density gain of the regrowth phase")
    p.add_argument("--dense_only", action="store_true",
                   help="the dense baseline: train --dense_epochs, no pruning")
    p.add_argument("--width", type=float, default=defaults.width, help="width multiplier")
    p.add_argument("--no_augment", dest="augment", action="store_false",
                   help="no random crop and flip")
    p.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workdir", default=defaults.workdir)
    p.add_argument("--eval_every", type=int, default=defaults.eval_every, help="epochs")
    p.add_argument("--log_every", type=int, default=defaults.log_every,
                   help="steps between progress-bar updates")
    return Config(**vars(p.parse_args(argv)))


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
