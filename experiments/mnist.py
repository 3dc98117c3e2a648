"""LeNet-300-100 on MNIST: dense training, then Hyperflows pruning and regrowth.

    python -m experiments.mnist --target_sparsity=0.98
    python -m experiments.mnist --dataset=npz:../shared/data/mnist.npz

The quick CPU experiment (one to two minutes on 2 cores): the CIFAR training stack with
MNIST defaults (plain SGD, no augmentation, weight decay or label smoothing). Prints one
line per epoch and writes report.json, metrics.csv and run.png to --workdir.
"""

from hflows_jax.training import Config, cli

PROG = "python -m experiments.mnist"
DEFAULTS = Config(
    model="lenet300", dataset="mnist", target_sparsity=0.98,
    dense_epochs=5, pruning_epochs=40, regrowth_epochs=10, batch_size=128,
    lr=0.05, weight_decay=0.0, label_smoothing=0.0, augment=False,
    workdir="workdir/mnist",
)


def main(argv=None) -> dict:
    return cli.main(DEFAULTS, PROG, __doc__, argv)


if __name__ == "__main__":
    cli.command_line(DEFAULTS, PROG, __doc__)
