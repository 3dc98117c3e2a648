"""Structured pruning: whole channels, so that the pruned network is a smaller dense one
(channel Hyperflows, DHP), or channels switched off per input (FTWT)."""

from hflows_jax.structured.channel_hyperflows import (
    ChannelHyperflowsState,
    channel_hyperflows,
    flops_fraction,
)
from hflows_jax.structured.channels import (ChannelGroups, FixedChannelsState, channel_groups,
                                           fixed_channels)
from hflows_jax.structured import dhp, ftwt, latency  # noqa: E402  (their pieces)
from hflows_jax.structured.latency import LatencyTable
from hflows_jax.structured.measured_landing import land_measured

__all__ = ["ChannelGroups", "ChannelHyperflowsState", "FixedChannelsState", "channel_groups",
           "channel_hyperflows", "dhp", "fixed_channels", "flops_fraction", "ftwt", "land_measured", "latency",
           "LatencyTable"]
