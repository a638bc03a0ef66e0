"""Plain (conditional) flow matching, the pretraining objective.

``L(theta) = E_{t ~ p(t), x0 ~ N(0, I), x1 ~ data} || v_theta(x_t, t) - (x1 - x0) ||^2`` with
``x_t = (1 - t) x0 + t x1`` (the minimiser is ``E[X1 - X0 | X_t = x]``,
the Taylor-approximation note (Liu, "DiffusionNFT as Taylor Approximation")).
"""

from __future__ import annotations

from torch import Tensor

from lightning_nft.paths import interpolate, velocity_target


def flow_matching_loss(velocity: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    """Per-sample squared error ``||v - (x1 - x0)||^2`` averaged over non-batch dims, shape ``(B,)``."""
    err = (velocity - velocity_target(x0, x1)) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def flow_matching_inputs(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """The network input ``x_t`` for the pair ``(x0, x1)`` at times ``t (B,)``."""
    return interpolate(x0, x1, t)
