"""Conventions and conversions for rectified flow, in one place.

Time runs from noise to data (Adjoint Matching, arXiv:2409.08861; DiffusionNFT, arXiv:2509.16117)::

    x_t = (1 - t) x0 + t x1,    x0 ~ N(0, I),  x1 ~ data,  t in [0, 1]

and the velocity target is ``x1 - x0``. For a velocity ``v = E[X1 - X0 | X_t = x]`` the other
parameterisations follow from ``E[X_t | X_t = x] = x``:

* data prediction   ``x1_hat = x + (1 - t) v``
* noise prediction  ``x0_hat = x - t v``
* score             ``s = grad log p_t(x) = -E[X0 | x] / (1 - t) = (t v - x) / (1 - t)``

diffusers runs the other way: ``sigma = 1 - t``, ``timestep = 1000 sigma``, flow transformers
predict ``noise - data = -v``, and epsilon-prediction (VP) UNets predict the noise of
``x = sqrt(abar) x1 + sqrt(1 - abar) eps``. The adapter functions at the bottom convert once;
nothing past a backbone adapter knows about diffusers' direction.

Shapes: ``x`` is batch-first ``(B, *S)``; ``t`` is a float, a 0-d tensor or a ``(B,)`` tensor and
is broadcast with :func:`expand_like`.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

TimeLike = Union[float, Tensor]

DIFFUSERS_NUM_TRAIN_TIMESTEPS = 1000


def expand_like(t: TimeLike, x: Tensor) -> Tensor:
    """Return ``t`` shaped ``(B, 1, ..., 1)`` (or 0-d) so that it broadcasts against ``x`` of shape ``(B, *S)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: TimeLike) -> Tensor:
    """Rectified-flow interpolation ``x_t = (1 - t) x0 + t x1``."""
    t = expand_like(t, x0)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """Conditional velocity ``d x_t / dt = x1 - x0``."""
    return x1 - x0


def data_from_velocity(x: Tensor, t: TimeLike, v: Tensor) -> Tensor:
    """Data prediction ``x1_hat = x + (1 - t) v``."""
    return x + (1 - expand_like(t, x)) * v


def velocity_from_data(x: Tensor, t: TimeLike, x1_hat: Tensor) -> Tensor:
    """Inverse of :func:`data_from_velocity`: ``v = (x1_hat - x) / (1 - t)`` (needs ``t < 1``)."""
    return (x1_hat - x) / (1 - expand_like(t, x))


def noise_from_velocity(x: Tensor, t: TimeLike, v: Tensor) -> Tensor:
    """Noise prediction ``x0_hat = x - t v``."""
    return x - expand_like(t, x) * v


def velocity_from_noise(x: Tensor, t: TimeLike, x0_hat: Tensor) -> Tensor:
    """Inverse of :func:`noise_from_velocity`: ``v = (x - x0_hat) / t`` (needs ``t > 0``)."""
    return (x - x0_hat) / expand_like(t, x)


def score_from_velocity(x: Tensor, t: TimeLike, v: Tensor) -> Tensor:
    """Score of the marginal ``p_t``: ``s = (t v - x) / (1 - t)`` (needs ``t < 1``)."""
    t = expand_like(t, x)
    return (t * v - x) / (1 - t)


def velocity_from_score(x: Tensor, t: TimeLike, s: Tensor) -> Tensor:
    """Inverse of :func:`score_from_velocity`: ``v = (x + (1 - t) s) / t`` (needs ``t > 0``)."""
    t = expand_like(t, x)
    return (x + (1 - t) * s) / t


# ----------------------------------------------------------------------------------------------
# Adapters to diffusers' direction
# ----------------------------------------------------------------------------------------------


def sigma_from_time(t: TimeLike) -> Tensor:
    """diffusers' noise level ``sigma = 1 - t``."""
    return 1 - torch.as_tensor(t)


def time_from_sigma(sigma: TimeLike) -> Tensor:
    """Our time ``t = 1 - sigma``."""
    return 1 - torch.as_tensor(sigma)


def diffusers_timestep_from_time(t: TimeLike) -> Tensor:
    """The ``timestep`` argument of diffusers flow models: ``1000 * sigma = 1000 (1 - t)``."""
    return DIFFUSERS_NUM_TRAIN_TIMESTEPS * sigma_from_time(t)


def time_from_diffusers_timestep(timestep: TimeLike) -> Tensor:
    """Inverse of :func:`diffusers_timestep_from_time`."""
    return time_from_sigma(torch.as_tensor(timestep) / DIFFUSERS_NUM_TRAIN_TIMESTEPS)


def velocity_from_diffusers_flow(model_output: Tensor) -> Tensor:
    """diffusers flow transformers predict ``noise - data = -v``; return ``v``."""
    return -model_output


def diffusers_flow_from_velocity(v: Tensor) -> Tensor:
    """Inverse of :func:`velocity_from_diffusers_flow`."""
    return -v


def velocity_from_epsilon(x: Tensor, eps: Tensor, alpha_bar: TimeLike) -> Tensor:
    """Velocity of an epsilon-prediction VP model, in our convention.

    A VP model sees ``x = sqrt(abar) x1 + sqrt(1 - abar) eps``. Rescaling by
    ``c = sqrt(abar) + sqrt(1 - abar)`` gives the rectified-flow point ``y = x / c`` at time
    ``t = sqrt(abar) / c`` with ``x0 = eps``, so ``v = (y - eps) / t`` (noise prediction, above).
    The returned velocity is for the rescaled state ``y`` at time :func:`rf_time_from_alpha_bar`.
    """
    a = expand_like(torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device).sqrt(), x)
    b = (1 - a * a).clamp_min(0).sqrt()
    c = a + b
    y = x / c
    t = a / c
    return (y - eps) / t


def rf_time_from_alpha_bar(alpha_bar: TimeLike) -> Tensor:
    """Rectified-flow time of a VP noise level: ``t = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))``."""
    a = torch.as_tensor(alpha_bar).sqrt()
    return a / (a + (1 - a * a).clamp_min(0).sqrt())


def rf_state_from_vp(x: Tensor, alpha_bar: TimeLike) -> Tensor:
    """Rescale a VP state ``x`` to the rectified-flow state ``y = x / (sqrt(abar) + sqrt(1 - abar))``."""
    a = expand_like(torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device).sqrt(), x)
    return x / (a + (1 - a * a).clamp_min(0).sqrt())
