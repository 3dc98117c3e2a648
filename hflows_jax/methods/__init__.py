"""Pruning methods as objects, one file each, by ``--method`` name.

A method subclasses ``Method`` (``base.py``) and overrides what differs from the
defaults; adding one is a new file here, its test, and one line below.
"""

from __future__ import annotations

from hflows_jax.methods.base import (CONTROLLERS, Budget, ChannelMethod, Method,
                                     PressureMethod, Retraining, Scoring, no_readings,
                                     presence_settings, pressure_controller)
from hflows_jax.methods.dhp import DHP, DHPReach
from hflows_jax.methods.ftwt import FTWT
from hflows_jax.methods.grasp import GraSP
from hflows_jax.methods.hyperflows import Hyperflows
from hflows_jax.methods.hyperflows_channel import HyperflowsChannel
from hflows_jax.methods.importance import Importance
from hflows_jax.methods.magnitude import Magnitude
from hflows_jax.methods.random import Random
from hflows_jax.methods.rigl import RigL
from hflows_jax.methods.snip import SNIP
from hflows_jax.methods.ste_magnitude import SteMagnitude

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` a ``--method`` choice (and a row of the comparisons)."""
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}: use one of {list(REGISTRY)}.")
    return REGISTRY[name]


for _method in (Hyperflows, HyperflowsChannel, DHP, DHPReach, FTWT, Magnitude, SNIP, GraSP,
                Random, RigL, SteMagnitude, Importance):
    register(_method())

__all__ = ["CONTROLLERS", "REGISTRY", "Budget", "ChannelMethod", "Method", "PressureMethod",
           "Retraining", "Scoring", "get", "no_readings", "presence_settings",
           "pressure_controller", "register"]
