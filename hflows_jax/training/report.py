"""What a run leaves behind: metrics CSV, report.json, plots, and FLOP counts."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, out.getvalue())


def forward_macs(model: nn.Module, variables: dict, image_shape: tuple, masks: Any = None
                 ) -> tuple[int, int]:
    """Multiply-adds of one forward pass of one image: (dense, with ``masks``).

    Every conv or dense kernel costs (its entries) x (its output positions); under a mask,
    only its present entries count. Output positions are read off the layer outputs.
    """
    def is_layer(module, method_name):
        return isinstance(module, (nn.Conv, nn.Dense)) and method_name == "__call__"

    capture = jax.jit(functools.partial(model.apply, train=False,
                                        capture_intermediates=is_layer,
                                        mutable=["intermediates"]))
    _, state = capture(variables, jnp.zeros((1,) + tuple(image_shape)))
    positions = {}
    for path, out in jax.tree.leaves_with_path(state["intermediates"]):
        layer = keystr(path[:-2], simple=True, separator="/")  # drop '__call__' and tuple index
        positions[layer] = int(np.prod(out.shape[1:-1]))
    kernels = dict(_kernels(variables["params"]))
    mask_of = dict(_kernels(masks)) if masks is not None else {}
    dense = sparse = 0
    for layer, kernel in kernels.items():
        per_position = int(kernel.size)
        present = int(np.sum(mask_of[layer])) if mask_of.get(layer) is not None else per_position
        dense += per_position * positions[layer]
        sparse += present * positions[layer]
    return dense, sparse


def _kernels(tree):
    for path, leaf in jax.tree.leaves_with_path(tree, is_leaf=lambda x: x is None):
        if path and getattr(path[-1], "key", None) == "kernel":
            yield keystr(path[:-1], simple=True, separator="/"), leaf


def plot_run(path: str, history: list[dict], layer_sparsity: dict[str, float], title: str):
    """Accuracy and sparsity over epochs, and the final per-layer sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_layers) = plt.subplots(1, 2, figsize=(13, 4.5),
                                            gridspec_kw={"width_ratios": [1.2, 1]})
    epochs = [r["epoch"] for r in history]
    for key, style in (("train_accuracy", "--"), ("test_accuracy", "-")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), style, color="tab:blue", label=key.replace("_", " "))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy", color="tab:blue")
    ax_acc.set_ylim(0, 1)
    ax_sp = ax_acc.twinx()
    ax_sp.plot(epochs, [r["sparsity"] for r in history], color="tab:red", label="sparsity")
    ax_sp.set_ylabel("sparsity", color="tab:red")
    ax_sp.set_ylim(0, 1)
    for r0, r1 in zip(history, history[1:]):
        if r0["phase"] != r1["phase"]:
            ax_acc.axvline(r0["epoch"] + 0.5, color="gray", lw=0.8, ls=":")
    ax_acc.legend(loc="lower left")
    ax_acc.set_title(title)
    names = list(layer_sparsity)
    ax_layers.barh(range(len(names)), [layer_sparsity[n] for n in names], color="tab:red")
    ax_layers.set_yticks(range(len(names)), names, fontsize=max(4, 9 - len(names) // 12))
    ax_layers.invert_yaxis()
    ax_layers.set_xlim(0, 1)
    ax_layers.set_xlabel("fraction pruned")
    ax_layers.set_title("per-layer sparsity at the end")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def environment() -> dict:
    """Where a benchmark ran: machine, devices, versions and date."""
    import datetime
    import platform

    import flax
    import optax

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
