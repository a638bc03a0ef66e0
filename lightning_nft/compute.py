r"""Compute ledger: network evaluations of a run counted by kind, in one unit (forward-equivalents).

Methods differ in *where* they spend network evaluations (DiffusionNFT: ODE rollouts of the old policy and
a forward of the current and old policy per trained sample; Flow-GRPO: SDE rollouts and a forward +
backward per trained transition; Adjoint Matching: rollouts of the current policy, a vector-Jacobian
product of the reference per grid point and a forward + backward per trained time). The ledger counts
them at the policy-call boundary, :meth:`lightning_nft.policy.OnlineFineTuningMixin.velocity` /
``old_velocity`` / ``reference_velocity``, so no objective counts by hand.

**Unit.** One *evaluation* is one row (one sample) through the velocity network; a call on a ``(B, *S)``
batch counts ``B``. Classifier-free guidance calls the network on ``2B`` rows
(:func:`lightning_nft.guidance.guided_velocity`), so both passes count. A forward whose output carries
autograd history (``torch.is_grad_enabled()`` and ``out.requires_grad``) is assumed to be differentiated
once; its backward counts :data:`BACKWARD_COST` forward-equivalents (the usual estimate: the backward of
a layer is two matrix products per forward one, so forward + backward = 3 forward-equivalents). This
also covers vector-Jacobian products in ``x`` only (Adjoint Matching's adjoint), whose backward costs
about one forward less (no weight gradients): the ledger slightly over-counts them.

**Kinds.** ``<phase>/<role>`` for forwards and ``<phase>/backward`` for backwards, with ``phase``:

* ``rollout``: inside :meth:`~lightning_nft.policy.OnlineFineTuningMixin.collect_rollouts` (the sampler);
* ``train``: inside a training step (the objective's loss);
* ``other``: anything else (evaluation callbacks, ``predict``): reported, **not** in the training total.

``role`` is ``current``, ``old`` or ``reference``. ``images`` counts sampled rollouts (samples scored by the
reward during ``rollout``); evaluation samples are not counted.

Shapes: counts are Python ints; :meth:`ComputeLedger.summary` returns floats for logging.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

from torch import Tensor

BACKWARD_COST = 2.0
"""Forward-equivalents of one backward pass (forward + backward = ``1 + BACKWARD_COST`` = 3)."""

PHASES = ("rollout", "train", "other")
TRAINING_PHASES = ("rollout", "train")


class ComputeLedger:
    """Cumulative counts of network evaluations by kind, sampled images, and the current phase.

    >>> ledger = ComputeLedger()
    >>> with ledger.phase("rollout"):
    ...     ledger.record("old", rows=8, differentiated=False)
    >>> ledger.forward_equivalents()
    8.0
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.images = 0
        self.current_phase = "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator["ComputeLedger"]:
        """Count every evaluation made inside the block under ``name`` (``rollout``, ``train``, ``other``)."""
        if name not in PHASES:
            raise ValueError(f"unknown compute phase {name!r}; choose one of {PHASES}")
        previous, self.current_phase = self.current_phase, name
        try:
            yield self
        finally:
            self.current_phase = previous

    def record(self, role: str, rows: int, differentiated: bool) -> None:
        """One network call of policy ``role`` on ``rows`` samples; ``differentiated``: a backward follows."""
        self.counts[f"{self.current_phase}/{role}"] += int(rows)
        if differentiated:
            self.counts[f"{self.current_phase}/backward"] += int(rows)

    def record_output(self, role: str, out: Tensor) -> Tensor:
        """Record a call from its output ``(B, *S)`` (differentiated iff it carries autograd history); return it."""
        self.record(role, out.shape[0], differentiated=bool(out.requires_grad))
        return out

    def add_images(self, n: int) -> None:
        """``n`` sampled rollouts (images) scored by the reward."""
        self.images += int(n)

    def forwards(self, phases: tuple[str, ...] = TRAINING_PHASES) -> int:
        """Forward evaluations (rows) in ``phases``."""
        return sum(v for k, v in self.counts.items() if k.split("/")[0] in phases and not k.endswith("/backward"))

    def backwards(self, phases: tuple[str, ...] = TRAINING_PHASES) -> int:
        """Backward passes (rows) in ``phases``."""
        return sum(v for k, v in self.counts.items() if k.split("/")[0] in phases and k.endswith("/backward"))

    def forward_equivalents(self, phases: tuple[str, ...] = TRAINING_PHASES) -> float:
        """``forwards + BACKWARD_COST * backwards`` over ``phases`` (default: rollouts and training)."""
        return float(self.forwards(phases)) + BACKWARD_COST * float(self.backwards(phases))

    def summary(self) -> dict[str, float]:
        """Cumulative figures: ``forward_equivalents``, ``images``, ``forwards``, ``backwards`` and every kind."""
        out = {"forward_equivalents": self.forward_equivalents(), "images": float(self.images),
               "forwards": float(self.forwards()), "backwards": float(self.backwards())}
        out.update({k: float(v) for k, v in sorted(self.counts.items())})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in state.get("counts", {}).items()})
        self.images = int(state.get("images", 0))

    def __repr__(self) -> str:
        return f"ComputeLedger(forward_equivalents={self.forward_equivalents():.0f}, images={self.images})"
