"""Gaussian mixtures with exact rectified-flow quantities and exact exponential tilts.

This is the ground truth that the rest of the library is tested against. Conventions are the library's
(as in Q. Liu, "DiffusionNFT as Taylor Approximation", the Taylor-approximation note)::

    x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I),   x1 ~ p = sum_k pi_k N(m_k, s_k^2 I)  (in R^d)

Given the component ``k``, ``X_t ~ N(t m_k, var_k I)`` with ``var_k(t) = (1 - t)^2 + t^2 s_k^2``,
and ``(X_t, X1)`` is jointly Gaussian, so everything below is closed form:

* responsibilities   ``w_k(x, t) = pi_k N(x; t m_k, var_k I) / sum_j pi_j N(x; t m_j, var_j I)``
  (computed in log space with ``logsumexp``);
* per component      ``E[X1 | x, k] = m_k + t s_k^2 / var_k (x - t m_k)``,
  ``Cov(X1 | x, k) = s_k^2 (1 - t)^2 / var_k I``,
  ``E[X1 - X0 | x, k] = m_k + (t s_k^2 - (1 - t)) / var_k (x - t m_k)``
  (this form of the velocity is finite at ``t = 0`` and ``t = 1``);
* mixture            law of total expectation / covariance over ``w_k``;
  the velocity ``v(x, t) = E[X1 - X0 | X_t = x] = sum_k w_k E[X1 - X0 | x, k]``;
  the score ``grad log p_t(x) = sum_k w_k (-(x - t m_k) / var_k)``.

Exponential tilt by a linear reward ``r(x) = a . x`` stays a mixture with the same stds::

    pi_k N(x; m_k, s_k^2 I) exp(lam a . x)
        = pi_k exp(lam a . m_k + lam^2 s_k^2 |a|^2 / 2) N(x; m_k + lam s_k^2 a, s_k^2 I),

and the DiffusionNFT optimum for that reward (Taylor-approximation note, Theorem 1.1) is

    v*(x, t) = v(x, t) + (2 / beta) Cov(a . X1, X1 - X0 | X_t = x)
             = v(x, t) + (2 / beta) Cov(X1 | X_t = x) a / (1 - t),

because ``X1 - X0 = (X1 - x) / (1 - t)`` given ``X_t = x``. It equals the first-order Taylor step
``v + (2 / beta) d/d alpha v^alpha |_{alpha=0}`` of the tilted fields (Taylor-approximation note, Theorem 1.3).

Shapes: ``x`` is ``(B, d)``; ``t`` is a float, a 0-d tensor or a ``(B,)`` tensor in ``[0, 1]``.
Computations run in ``x``'s dtype and device (the buffers are cast), so float32 and float64 both
work; :class:`GaussianMixture` has buffers only, no trainable parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from lightning_nft.paths import TimeLike, expand_like

__all__ = [
    "GaussianMixture",
    "component_weights",
    "effective_tilt",
    "total_variation",
]

ArrayLike = Union[Sequence[Any], Tensor]


def _plain(value: Any) -> Any:
    """Turn nested sequences (lists, tuples, omegaconf ``ListConfig``) into nested python lists."""
    if isinstance(value, (Tensor, str, bytes, int, float)) or hasattr(value, "__array__"):
        return value
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


def _as_float_tensor(value: Any, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A detached floating tensor; python numbers become ``dtype`` (default: torch's default dtype)."""
    if isinstance(value, Tensor):
        out = value.detach().clone()
        if dtype is not None:
            return out.to(dtype)
        return out if out.is_floating_point() else out.to(torch.get_default_dtype())
    try:
        return torch.as_tensor(_plain(value), dtype=dtype or torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be numbers (a float, nested lists of floats or a tensor); got {value!r}") from err


class _Stats(NamedTuple):
    """Per-component quantities at ``(x, t)``; ``B' in {1, B}`` (a scalar ``t`` broadcasts)."""

    t: Tensor  # (B', 1)
    var: Tensor  # (B', K)   var_k = (1 - t)^2 + t^2 s_k^2
    diff: Tensor  # (B, K, d)  x - t m_k
    log_joint: Tensor  # (B, K)   log pi_k + log N(x; t m_k, var_k I)
    resp: Tensor  # (B, K)   w_k(x, t)
    means: Tensor  # (K, d)
    var1: Tensor  # (K,)     s_k^2


class GaussianMixture(nn.Module):
    """Isotropic Gaussian mixture ``p = sum_k pi_k N(m_k, s_k^2 I)`` in ``R^d`` with exact flow quantities.

    Usable as a velocity-field backbone: ``forward(x, t, cond=None)`` returns the exact rectified-flow
    velocity ``E[X1 - X0 | X_t = x]`` of the independent coupling ``N(0, I) x p`` (``cond`` is ignored).
    See the module docstring for the formulas.

    Args:
        weights: ``(K,)`` mixture weights, finite and non-negative with a positive sum; normalised to
            sum to one. (Zero weights are allowed so that extreme tilts, which may underflow, stay valid.)
        means: ``(K, d)`` component means (nested lists work: the class is built from YAML).
        stds: a positive float (shared by all components) or ``(K,)`` positive standard deviations.

    Buffers: ``weights (K,)`` (normalised), ``means (K, d)``, ``stds (K,)``. No parameters.
    """

    weights: Tensor
    means: Tensor
    stds: Tensor

    def __init__(
        self,
        weights: Union[Sequence[float], Tensor],
        means: Union[Sequence[Sequence[float]], Tensor],
        stds: Union[float, Sequence[float], Tensor],
    ) -> None:
        super().__init__()
        m = _as_float_tensor(means, "means")
        if m.dim() != 2 or m.shape[0] == 0 or m.shape[1] == 0:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1; got shape {tuple(m.shape)}")
        k, _ = m.shape
        w = _as_float_tensor(weights, "weights").to(dtype=m.dtype, device=m.device)
        if w.dim() != 1 or w.shape[0] != k:
            raise ValueError(f"weights must have shape (K,) = ({k},) to match means {tuple(m.shape)}; got {tuple(w.shape)}")
        s = _as_float_tensor(stds, "stds").to(dtype=m.dtype, device=m.device)
        if s.dim() == 0:
            s = s.expand(k).clone()
        if s.dim() != 1 or s.shape[0] != k:
            raise ValueError(f"stds must be a float or have shape (K,) = ({k},); got {tuple(s.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("means must be finite")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError(f"weights must be finite, non-negative and not all zero; got {w.tolist()}")
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"stds must be finite and positive; got {s.tolist()}")
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("means", m)
        self.register_buffer("stds", s)

    # ------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the data space."""
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return int(self.means.shape[0])

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, dim={self.dim}"

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, d) = (B, {self.dim}); got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")

    def _stats(self, x: Tensor, t: TimeLike) -> _Stats:
        self._check_x(x)
        tt = expand_like(t, x)  # 0-d or (B, 1)
        tt = tt.reshape(-1, 1)
        if bool(((tt < 0) | (tt > 1)).any()):
            raise ValueError("t must lie in [0, 1]")
        logpi = self.weights.to(x).log()  # (K,)  (-inf for zero weights)
        means = self.means.to(x)  # (K, d)
        var1 = self.stds.to(x) ** 2  # (K,)
        var = (1 - tt) ** 2 + tt**2 * var1  # (B', K)
        diff = x[:, None, :] - tt[:, :, None] * means  # (B, K, d)
        d = self.dim
        log_n = -0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        log_joint = logpi + log_n  # (B, K)
        resp = torch.softmax(log_joint, dim=-1)
        return _Stats(tt, var, diff, log_joint, resp, means, var1)

    @staticmethod
    def _component_means(st: _Stats) -> Tensor:
        """``E[X1 | x, k] = m_k + t s_k^2 / var_k (x - t m_k)``, shape (B, K, d)."""
        return st.means + (st.t * st.var1 / st.var)[..., None] * st.diff

    @staticmethod
    def _component_velocities(st: _Stats) -> Tensor:
        """``E[X1 - X0 | x, k] = m_k + (t s_k^2 - (1 - t)) / var_k (x - t m_k)``, shape (B, K, d)."""
        return st.means + ((st.t * st.var1 - (1 - st.t)) / st.var)[..., None] * st.diff

    # ------------------------------------------------------------------------------------------
    # exact flow quantities
    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: TimeLike, cond: Any = None) -> Tensor:
        """Exact velocity ``v(x, t) = E[X1 - X0 | X_t = x]``, ``(B, d)``; ``cond`` is ignored."""
        return self.velocity(x, t)

    def velocity(self, x: Tensor, t: TimeLike) -> Tensor:
        """``v(x, t) = sum_k w_k(x, t) [m_k + (t s_k^2 - (1 - t)) / var_k (x - t m_k)]``, ``(B, d)``.

        Finite on all of ``[0, 1]``: ``v(x, 0) = E[X1] - x`` and ``v(x, 1) = x`` (since ``E[X0] = 0``).
        """
        st = self._stats(x, t)
        return (st.resp[..., None] * self._component_velocities(st)).sum(1)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        """Score of the marginal: ``grad_x log p_t(x) = -sum_k w_k (x - t m_k) / var_k``, ``(B, d)``."""
        st = self._stats(x, t)
        return -(st.resp[..., None] * st.diff / st.var[..., None]).sum(1)

    def responsibilities(self, x: Tensor, t: TimeLike) -> Tensor:
        """Posterior component probabilities ``w_k(x, t) = P(k | X_t = x)``, ``(B, K)``."""
        return self._stats(x, t).resp

    def posterior_mean(self, x: Tensor, t: TimeLike) -> Tensor:
        """``E[X1 | X_t = x] = sum_k w_k (m_k + t s_k^2 / var_k (x - t m_k))``, ``(B, d)``."""
        st = self._stats(x, t)
        return (st.resp[..., None] * self._component_means(st)).sum(1)

    def posterior_cov(self, x: Tensor, t: TimeLike) -> Tensor:
        """``Cov(X1 | X_t = x)``, ``(B, d, d)``, by the law of total covariance:

        ``sum_k w_k s_k^2 (1 - t)^2 / var_k I + sum_k w_k (mu_k - mu)(mu_k - mu)^T`` with
        ``mu_k = E[X1 | x, k]`` and ``mu = sum_k w_k mu_k``.
        """
        st = self._stats(x, t)
        mu_k = self._component_means(st)  # (B, K, d)
        mu = (st.resp[..., None] * mu_k).sum(1)  # (B, d)
        dev = mu_k - mu[:, None, :]
        within = (st.resp * st.var1 * (1 - st.t) ** 2 / st.var).sum(-1)  # (B,)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        between = torch.einsum("bk,bki,bkj->bij", st.resp, dev, dev)
        return within[:, None, None] * eye + between

    def marginal_log_prob(self, x: Tensor, t: TimeLike) -> Tensor:
        """``log p_t(x) = logsumexp_k [log pi_k + log N(x; t m_k, var_k I)]``, ``(B,)``."""
        return torch.logsumexp(self._stats(x, t).log_joint, dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the mixture itself (the marginal at ``t = 1``), ``(B,)``."""
        return self.marginal_log_prob(x, 1.0)

    def classify(self, x: Tensor) -> Tensor:
        """Most probable component of each sample under the mixture (``t = 1``), ``(B,)`` long."""
        return self._stats(x, 1.0).log_joint.argmax(dim=-1)

    # ------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------

    def sample_with_labels(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and their component labels: ``x (n, d)``, ``labels (n,)`` long.

        ``labels ~ Categorical(pi)``, ``x = m_label + s_label * eps`` with ``eps ~ N(0, I)``; in the
        buffers' dtype and device (pass a ``generator`` on that device for reproducibility).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int; got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.means[labels] + self.stds[labels, None] * eps, labels

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``n`` samples, ``(n, d)`` (see :meth:`sample_with_labels`)."""
        return self.sample_with_labels(n, generator=generator)[0]

    # ------------------------------------------------------------------------------------------
    # reward tilts (linear reward r(x) = a . x)
    # ------------------------------------------------------------------------------------------

    def _check_direction(self, a: Any, ref: Tensor, batch: Optional[int] = None) -> Tensor:
        a = torch.as_tensor(_plain(a) if not isinstance(a, Tensor) else a, dtype=ref.dtype, device=ref.device)
        ok = a.dim() == 1 and a.shape[0] == self.dim
        if batch is not None:
            ok = ok or (a.dim() == 2 and a.shape == (batch, self.dim))
        if not ok:
            allowed = f"({self.dim},)" + ("" if batch is None else f" or ({batch}, {self.dim})")
            raise ValueError(f"reward direction a must have shape {allowed}; got {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("reward direction a must be finite")
        return a

    def tilt(self, a: Union[Sequence[float], Tensor], lam: float) -> GaussianMixture:
        """The exact tilt ``p(x) exp(lam a . x) / Z`` as a new mixture (same stds):

        ``pi'_k ∝ pi_k exp(lam a . m_k + lam^2 s_k^2 |a|^2 / 2)``, ``m'_k = m_k + lam s_k^2 a``.
        ``a`` has shape ``(d,)``; the weights are normalised in log space.
        """
        lam = float(lam)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite; got {lam}")
        a = self._check_direction(a, self.means)
        var1 = self.stds**2
        log_w = self.weights.log() + lam * (self.means @ a) + 0.5 * lam**2 * var1 * (a @ a)
        new_means = self.means + lam * var1[:, None] * a
        return GaussianMixture(torch.softmax(log_w, dim=0), new_means, self.stds.clone())

    def nft_optimum(self, x: Tensor, t: TimeLike, a: Union[Sequence[float], Tensor], beta: float) -> Tensor:
        """DiffusionNFT optimum for the linear reward ``r(x) = a . x`` (Taylor-approximation note, Theorem 1.1), ``(B, d)``:

        ``v*(x, t) = v(x, t) + (2 / beta) Cov(a . X1, X1 - X0 | X_t = x)
                   = v(x, t) + (2 / beta) Cov(X1 | X_t = x) a / (1 - t)``.

        Computed as ``v + (2 / beta) [sum_k w_k s_k^2 (1 - t) / var_k a + sum_k w_k (a . (mu_k - mu)) (u_k - v)]``
        with ``mu_k = E[X1 | x, k]``, ``u_k = E[X1 - X0 | x, k]`` (the same quantity, finite at ``t = 1``).
        ``a`` is ``(d,)`` or ``(B, d)``; ``beta > 0``.
        """
        beta = float(beta)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be positive and finite; got {beta}")
        st = self._stats(x, t)
        a = self._check_direction(a, x, batch=x.shape[0])
        a_b = a if a.dim() == 2 else a.expand_as(x)  # (B, d)
        mu_k = self._component_means(st)
        u_k = self._component_velocities(st)
        mu = (st.resp[..., None] * mu_k).sum(1)
        v = (st.resp[..., None] * u_k).sum(1)
        within = (st.resp * st.var1 * (1 - st.t) / st.var).sum(-1, keepdim=True) * a_b  # (B, d)
        proj = ((mu_k - mu[:, None, :]) * a_b[:, None, :]).sum(-1)  # (B, K)  a . (mu_k - mu)
        between = ((st.resp * proj)[..., None] * (u_k - v[:, None, :])).sum(1)
        return v + (2.0 / beta) * (within + between)


# ----------------------------------------------------------------------------------------------
# functions on weights
# ----------------------------------------------------------------------------------------------


def component_weights(mixture: GaussianMixture, x: Tensor) -> Tensor:
    """Fraction of the samples ``x (n, d)`` that :meth:`GaussianMixture.classify` assigns to each component, ``(K,)``."""
    labels = mixture.classify(x)
    if labels.numel() == 0:
        raise ValueError("component_weights needs at least one sample")
    counts = torch.bincount(labels, minlength=mixture.n_components)
    return counts.to(mixture.weights.dtype) / labels.numel()


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """Total-variation distance of two discrete distributions: ``0.5 sum_k |p_k - q_k|``."""
    p_t = _as_float_tensor(p, "p", torch.float64).cpu()
    q_t = _as_float_tensor(q, "q", torch.float64).cpu()
    if p_t.dim() != 1 or p_t.shape != q_t.shape:
        raise ValueError(f"p and q must be 1-D of the same length; got {tuple(p_t.shape)} and {tuple(q_t.shape)}")
    return float(0.5 * (p_t - q_t).abs().sum())


def effective_tilt(base: GaussianMixture, weights_hat: ArrayLike, a: Union[Sequence[float], Tensor]) -> float:
    """The achieved tilt: least-squares slope (with intercept) of ``log(w'_k / w_k)`` against ``a . m_k``.

    For the exact tilt of a mixture with equal stds, ``log(w'_k / w_k) = lam a . m_k + const``
    (see :meth:`GaussianMixture.tilt`), so this returns ``lam`` exactly; for measured weights
    ``weights_hat`` (e.g. :func:`component_weights` of fine-tuned samples) it is the tilt the weights
    correspond to. ``weights_hat`` must be positive (it is renormalised; the slope ignores constants)
    and the ``a . m_k`` must not all be equal.
    """
    w_hat = _as_float_tensor(weights_hat, "weights_hat", torch.float64).cpu()
    k = base.n_components
    if w_hat.dim() != 1 or w_hat.shape[0] != k:
        raise ValueError(f"weights_hat must have shape (K,) = ({k},); got {tuple(w_hat.shape)}")
    if not bool(torch.isfinite(w_hat).all()) or bool((w_hat <= 0).any()):
        raise ValueError(f"weights_hat must be finite and positive (log-ratios are taken); got {w_hat.tolist()}")
    w = base.weights.detach().to(dtype=torch.float64, device="cpu")
    if bool((w <= 0).any()):
        raise ValueError("the base mixture has zero weights; the log-ratio is undefined")
    a_t = base._check_direction(a, base.means.detach().to(dtype=torch.float64, device="cpu"))
    z = base.means.detach().to(dtype=torch.float64, device="cpu") @ a_t  # (K,)
    y = torch.log(w_hat / w_hat.sum()) - torch.log(w)
    zc = z - z.mean()
    denom = (zc * zc).sum()
    if not bool(denom > 1e-12 * (1 + (z * z).sum())):
        raise ValueError("effective_tilt needs components with different a . m_k")
    return float((zc * (y - y.mean())).sum() / denom)
