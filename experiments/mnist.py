"""LeNet-300-100 on MNIST: dense training, then Hyperflows pruning and regrowth.

    python -m experiments.mnist --target_sparsity=0.98
    python -m experiments.mnist --dataset=npz:../shared/data/mnist.npz

The quick CPU experiment (about a minute on 2 cores): the CIFAR training stack with the
preset "mnist" (plain SGD, no augmentation, weight decay or label smoothing). Prints one
line per epoch and writes report.json, metrics.csv and run.png to --workdir.
"""

from hflows_jax.training import cli, presets

PROG = "python -m experiments.mnist"


def main(argv=None) -> dict:
    return cli.main(presets.MNIST, PROG, __doc__, argv)


if __name__ == "__main__":
    cli.command_line(presets.MNIST, PROG, __doc__)
