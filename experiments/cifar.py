"""The reference CIFAR recipe: dense training, Hyperflows pruning, regrowth.

    python -m experiments.cifar --model=vgg19
    python -m experiments.cifar --model=resnet20 --dataset=npz:../shared/data/cifar10_5k.npz

Defaults (preset "cifar") follow the reference (METHOD.md section 4): SGD lr 0.1,
momentum 0.9, weight decay 5e-4, label smoothing 0.1, batch 128, crop and flip; 100
pruning and 60 regrowth epochs after 160 dense ones. Every epoch ends with a checkpoint
in --workdir; rerun the same command to resume. Writes metrics.csv, report.json and
run.png there.
"""

from hflows_jax.training import cli, presets

PROG = "python -m experiments.cifar"


def main(argv=None) -> dict:
    return cli.main(presets.CIFAR, PROG, __doc__, argv)


if __name__ == "__main__":
    cli.command_line(presets.CIFAR, PROG, __doc__)
