"""A latency budget landed on the exported model's measured speed-up, not the table's.

``channel_hyperflows(target="latency")`` lands where its ``LatencyTable`` predicts the
requested speed-up. The table sums layers timed alone, fitted to uniform cuts; a trained
cut is not uniform, and its exported model ran slower than predicted (narrow VGG-19,
asked for 2x: 1.98x predicted, 1.59x measured; docs/results/latency_budget). So, once the
budget has landed, ``land_measured`` times the exported model against the dense one, here,
and moves the cut (every score shifted by one amount, as the landing does) until the
measured speed-up is within ``tolerance`` of the target: each next cut aims at the table
fraction that the readings so far, read as a line, say measures the target.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hflows_jax import compact
from hflows_jax.structured.channel_hyperflows import (ChannelHyperflowsState, kept_channels,
                                                      landing_shift)
from hflows_jax.structured.channels import ChannelGroups
from hflows_jax.structured.latency import LatencyTable

PyTree = Any
TOLERANCE = 0.05  # a measured speed-up within this (relative) of the target has landed


def land_measured(state: ChannelHyperflowsState, groups: ChannelGroups,
                  fn: Callable[[PyTree, jax.Array], Any], params: PyTree, example: Any,
                  target_speedup: float, table: LatencyTable, *, tolerance: float = TOLERANCE,
                  rounds: int = 4, min_channels: int = 4, round_to: int = 1,
                  speedup: Callable[[compact.Compact, compact.Compact], float] | None = None,
                  ) -> tuple[ChannelHyperflowsState, list[dict]]:
    """``state`` (landed) with its cut moved until the exported model of ``fn(params, x)``
    (``params`` unmasked)
    under it runs ``target_speedup`` times faster than the dense export (every channel
    kept) at ``table.batch``, within ``tolerance`` (relative), in at most ``rounds`` more
    cuts; the closest cut measured if none is. Returns the state and one reading per cut
    measured (``predicted`` by the table, ``measured``, ``kept_fraction`` of the table).
    ``min_channels`` and ``round_to`` as the state's ``channel_hyperflows`` took them.
    ``speedup(dense, pruned)``: how a cut is read; by default the two exported models
    timed here, interleaved, at ``table.batch`` (``timed_speedup``)."""
    if not target_speedup > 1:
        raise ValueError(f"target_speedup must be > 1, got {target_speedup!r}.")
    example = jnp.asarray(example)
    every = jax.tree.map(lambda m: None if m is None else np.ones(np.shape(m), bool),
                         groups.expand({g: jnp.ones(n, bool) for g, n in groups.sizes.items()},
                                       params), is_leaf=lambda m: m is None)
    dense = compact.export(fn, params, every, example, bcsr=False)
    if dense.macs < dense.dense_macs:  # zeroed channels left the "dense" model
        raise ValueError("land_measured needs the unmasked params (hf.finalize'd ones hold "
                         "zeros, which the dense export drops: the speed-ups would be read "
                         "against a pruned model).")
    speedup = speedup or functools.partial(timed_speedup, batch=table.batch)

    def table_fraction(kept) -> jax.Array:  # of the dense model's latency, as predicted
        return table.fraction(groups.live_counts(kept))

    def reading(presence) -> dict:
        kept = kept_channels(presence, min_channels, round_to)
        pruned = compact.export(fn, params, groups.expand(kept, params), example, bcsr=False)
        f = float(table_fraction(kept))
        return {"presence": presence, "kept": kept, "kept_fraction": f,
                "predicted": 1.0 / f, "measured": float(speedup(dense, pruned))}

    def miss(r) -> float:
        return abs(r["measured"] / target_speedup - 1.0)

    readings = [reading(state.presence)]
    while miss(readings[-1]) > tolerance and len(readings) <= rounds:
        tau = landing_shift(state.presence, table_fraction, _next_goal(readings, target_speedup),
                            min_channels, round_to)
        readings.append(reading({g: t - tau for g, t in state.presence.items()}))
    best = min(readings, key=miss)
    landed = state._replace(presence=best["presence"], kept=best["kept"],
                            masks=groups.expand(best["kept"], params))
    return landed, [{k: v for k, v in r.items() if k not in ("presence", "kept")}
                    for r in readings]


def timed_speedup(dense: compact.Compact, pruned: compact.Compact, batch: int,
                  repeats: int = 30) -> float:
    """Dense over pruned median milliseconds, interleaved, on ``batch`` random inputs."""
    x = jnp.asarray(np.random.default_rng(0).normal(
        size=(batch,) + tuple(dense.example.shape[1:])), dense.example.dtype)
    ms = compact.median_ms({"dense": lambda: dense(x), "pruned": lambda: pruned(x)},
                           repeats, warmup=3)
    return ms["dense"] / ms["pruned"]


def _next_goal(readings: list[dict], target_speedup: float) -> float:
    """The table's kept fraction to cut at next: where the line through the last two
    readings (measured latency fraction against the table's) measures ``1 / target``;
    from one reading, the table's fraction scaled by how far the measurement was off."""
    want, last = 1.0 / target_speedup, readings[-1]
    goal = last["kept_fraction"] * last["measured"] * want
    if len(readings) > 1:
        prev = readings[-2]
        df = last["kept_fraction"] - prev["kept_fraction"]
        dm = 1.0 / last["measured"] - 1.0 / prev["measured"]
        if abs(df) > 1e-9 and dm / df > 0:  # measured latency grows with the table's
            goal = last["kept_fraction"] + (want - 1.0 / last["measured"]) * df / dm
    return float(np.clip(goal, 0.01, 1.0))
