"""What every benchmark shares: its command line, its ``--quick`` rule, and its results.

- ``parser`` adds ``--out`` and ``--quick``; ``parse`` applies the quick defaults, and
  explicit flags always win over them.
- ``write_results`` writes NAME.json, NAME.md and NAME.png to ``--out`` (atomically) and
  prints the markdown.
- ``command_line`` runs a ``main`` with one-line errors instead of tracebacks
  (``cli.exit_on_user_errors``, as the training experiments do).
- ``read_report`` and ``open_pruning_run`` open a finished run for the tools that read
  one (evidence, export).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hflows_jax import methods
from hflows_jax.training import Config, cli, outputs, train
from hflows_jax.training.checkpoint import Checkpoints


def parser(prog: str, doc: str, out: str, quick_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="directory for the results")
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def parse(p: argparse.ArgumentParser, argv, quick: dict[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` replaces the defaults (not explicit flags)."""
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**quick)
    return p.parse_args(argv)


def write_results(out: str, name: str, result: dict, markdown: str,
                  plot: Callable[[Any], None]) -> None:
    """NAME.json, NAME.md and NAME.png in ``out``; ``plot(fig)`` draws on a new Figure."""
    from matplotlib.figure import Figure

    os.makedirs(out, exist_ok=True)
    outputs.write_json(os.path.join(out, f"{name}.json"), result)
    env = result["environment"]
    markdown += (f"\nRan on {env['machine']}, {env['cpu_count']} CPUs, devices "
                 f"{env['devices']}, {env['date']}.\n")
    outputs.atomic_write(os.path.join(out, f"{name}.md"), markdown)
    fig = Figure(figsize=(7, 4.5))
    plot(fig)
    fig.tight_layout()
    outputs.write_figure(os.path.join(out, f"{name}.png"), fig)
    print(markdown)


command_line = cli.exit_on_user_errors


def read_report(workdir: str) -> dict:
    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a finished run.")
    with open(path) as f:
        return json.load(f)


def open_pruning_run(cfg: Config):
    """A finished run's inputs, its linen model (float32, no device axis), its pruning
    checkpoints (close them when done) and the template to restore them onto."""
    inputs = train.load_inputs(cfg)
    method = methods.get(cfg.method.name)
    model = train.build_model(cfg, inputs.data.num_classes, method, axis_name=None,
                              dtype=jnp.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + inputs.data.image_shape))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    # At-initialization methods (SNIP, GraSP) trace their scores in tx.init.
    score = train.scoring(cfg, inputs, method, batch_stats)
    phase = train.pruning_phase(
        cfg, inputs.steps_per_epoch, method, score, first_epoch=1,
        channel_groups=train.channel_groups_of(model, method, params, batch_stats,
                                               inputs.data.image_shape))
    ckpt = Checkpoints(os.path.join(cfg.run.workdir, "checkpoints", "pruning"), None)
    return inputs, model, ckpt, train.abstract_state(phase.tx, params, batch_stats)
