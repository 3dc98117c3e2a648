"""Structured pruning: whole channels, so that the pruned network is a smaller dense one."""

from hflows_jax.structured.channel_hyperflows import (
    ChannelHyperflowsState,
    channel_hyperflows,
    flops_fraction,
)
from hflows_jax.structured.channels import ChannelGroups, channel_groups
from hflows_jax.structured import dhp  # noqa: E402  (DHP's layers and proximal step)

__all__ = ["ChannelGroups", "ChannelHyperflowsState", "channel_groups", "channel_hyperflows",
           "dhp", "flops_fraction"]
