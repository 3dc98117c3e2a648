"""What every benchmark shares: its command line, its ``--quick`` rule, and its results.

- ``parser`` adds ``--out`` and ``--quick``; ``parse`` applies the quick defaults, and
  explicit flags always win over them.
- ``write_results`` writes NAME.json, NAME.md and NAME.png to ``--out`` (atomically) and
  prints the markdown.
- ``command_line`` runs a ``main`` with the JAX setup of the command line and one-line
  errors instead of tracebacks, as the training experiments do (``cli``).
- ``read_report`` reads a finished run's report; ``hflows_jax.training.open_run`` opens
  the run itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import jax

from hflows_jax.training import Config, cli, outputs


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


def step_times(runs: dict, batch: tuple, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per train step of each run (name -> ``[state, step]``, the state updated in
    place), their steps interleaved so that all see the same machine state, one wait per
    step, after ``warmup`` untimed rounds."""
    times = {k: [] for k in runs}
    for i in range(warmup + steps):
        for key, r in runs.items():
            started = time.perf_counter()
            r[0], _ = r[1](r[0], *batch)
            jax.block_until_ready(r[0])
            if i >= warmup:
                times[key].append(time.perf_counter() - started)
    return times


def command_line(main: Callable[[], Any]) -> None:
    """``main()`` for ``python -m``, with the JAX setup of a default run (the compilation
    cache: ``cli.configure``) and one-line errors (``cli.exit_on_user_errors``)."""
    cli.configure(Config())
    cli.exit_on_user_errors(main)


def read_report(workdir: str) -> dict:
    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a finished run.")
    with open(path) as f:
        return json.load(f)
