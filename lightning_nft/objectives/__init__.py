"""Objectives: pure loss functions on tensors (no Lightning inside) and small wiring classes."""

from lightning_nft.objectives.flow_matching import flow_matching_inputs, flow_matching_loss

__all__ = ["flow_matching_loss", "flow_matching_inputs"]
