"""The run plot: accuracy and sparsity over epochs, and per-layer sparsity at the end.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so the library never
sets a global backend.
"""

from __future__ import annotations

from hflows_jax.training import outputs


def plot_run(path: str, history: list[dict], layer_sparsity: dict[str, float], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    ax_acc, ax_layers = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
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
    outputs.write_figure(path, fig)
