"""The Flax Linen MNIST example and the NNX MNIST tutorial with Hyperflows in: how many
lines a user changes, what one short run reaches, and whether the library warns.

    PYTHONPATH=. python -m experiments.user_loops.run [--npz ../shared/data/mnist.npz]

For each framework: the diff between the plain script and its Hyperflows version (added
or changed lines, the module docstring left out), a run of the Hyperflows version with
its settings (no warning expected), and the same version with a schedule too short for
its target (a warning expected at init); ``--plain`` also runs the plain scripts. The
numbers go to docs/journal.md by hand.
"""

import argparse
import difflib
import json
import pathlib
import time
import warnings

from experiments.user_loops import linen_mnist, linen_mnist_hf, nnx_mnist, nnx_mnist_hf

HERE = pathlib.Path(__file__).parent


def changed_lines(plain: str, pruned: str) -> int:
    """Lines added or changed from ``plain`` to ``pruned``, module docstrings left out."""
    def body(name):
        text = (HERE / name).read_text()
        return text[text.index('"""', 3) + 3:].splitlines()
    diff = difflib.unified_diff(body(plain), body(pruned), lineterm="", n=0)
    return sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))


def run(module, config, npz):
    """The run's results and the UserWarnings it raised."""
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = module.train_and_evaluate(config, npz)
    result["seconds"] = round(time.time() - start)
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--npz", default=str(HERE.parents[2] / "shared" / "data" / "mnist.npz"))
    parser.add_argument("--which", default="linen,nnx")
    parser.add_argument("--plain", action="store_true", help="also run the plain scripts")
    args = parser.parse_args()
    out = {}
    if "linen" in args.which:
        good = linen_mnist_hf.default_config()
        short = linen_mnist_hf.default_config()
        short.presence_lr = 1e-3  # travels 0.468 in 468 steps; 0.47 needed for 90 %
        out["linen"] = {"changed_lines": changed_lines("linen_mnist.py", "linen_mnist_hf.py"),
                        "good": run(linen_mnist_hf, good, args.npz),
                        "short": run(linen_mnist_hf, short, args.npz)}
        if args.plain:
            out["linen"]["plain"] = run(linen_mnist, linen_mnist.default_config(), args.npz)
    if "nnx" in args.which:
        good = nnx_mnist_hf.default_config()
        short = nnx_mnist_hf.default_config()
        short.train_steps, short.eval_every = 100, 99  # no presence lr in the regime fits
        out["nnx"] = {"changed_lines": changed_lines("nnx_mnist.py", "nnx_mnist_hf.py"),
                      "good": run(nnx_mnist_hf, good, args.npz),
                      "short": run(nnx_mnist_hf, short, args.npz)}
        if args.plain:
            out["nnx"]["plain"] = run(nnx_mnist, nnx_mnist.default_config(), args.npz)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
