"""``DigitClassifierReward``: the (log-)probability of a target digit under the shipped classifier.

For images ``x (B, 1, 8, 8)`` (or flat ``(B, 64)``) in ``[-1, 1]`` and classifier logits ``f(x)``::

    mode "prob":      r(x) = softmax(f(clamp(x)))_target          in (0, 1)
    mode "log_prob":  r(x) = log_softmax(f(clamp(x)))_target      in (-inf, 0]

``clamp`` (on by default) maps the sample to the displayable range ``[-1, 1]`` first, so the reward
scores the picture a user sees and its gradient is zero on saturated pixels. The reward is
differentiable (``grad_x r`` by autograd, used by Adjoint Matching with ``log_prob``). The classifier
is frozen and stays in eval mode even when the owning module is put in train mode.

``target=None`` reads per-sample targets from ``cond`` (an int tensor ``(B,)`` of labels), for
class-conditional generation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_nft.rewards.base import Reward


class DigitClassifierReward(Reward):
    """Probability (``mode="prob"``) or log-probability (``"log_prob"``) of digit ``target``.

    Args:
        target: the digit to reward (0-9), or ``None`` to take labels from ``cond``.
        mode: ``"prob"`` or ``"log_prob"``.
        classifier: a module mapping ``(B, 1, 8, 8) -> logits (B, 10)``; default: the shipped one
            (:func:`lightning_nft.models.load_pretrained_digit_classifier`).
        clamp: clamp samples to ``[-1, 1]`` before classifying.
    """

    differentiable = True

    def __init__(
        self,
        target: Optional[int] = 0,
        mode: str = "prob",
        classifier: Optional[nn.Module] = None,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("prob", "log_prob"):
            raise ValueError(f"mode must be 'prob' or 'log_prob', got {mode!r}")
        if classifier is None:
            from lightning_nft.models.digit_classifier import load_pretrained_digit_classifier

            classifier = load_pretrained_digit_classifier()
        self.classifier = classifier
        self.classifier.requires_grad_(False)
        self.classifier.eval()
        self.target = None if target is None else int(target)
        self.mode = mode
        self.clamp = bool(clamp)

    def train(self, mode: bool = True) -> "DigitClassifierReward":
        super().train(mode)
        self.classifier.eval()  # frozen reward model: always eval
        return self

    def log_probs(self, samples: Tensor) -> Tensor:
        """``log softmax f(x)`` over the classes, ``(B, 10)``."""
        x = samples.reshape(samples.shape[0], 1, 8, 8)
        if self.clamp:
            x = x.clamp(-1.0, 1.0)
        logits = self.classifier(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax in at least single precision
        return torch.log_softmax(logits, dim=-1)

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        """Rewards ``(B,)`` of samples ``(B, 1, 8, 8)``."""
        logp = self.log_probs(samples)
        if self.target is not None:
            chosen = logp[:, self.target]
        else:
            if cond is None:
                raise ValueError("DigitClassifierReward(target=None) needs integer labels as cond")
            labels = torch.as_tensor(cond, device=logp.device).reshape(-1).long()
            chosen = logp.gather(1, labels[:, None])[:, 0]
        return chosen if self.mode == "log_prob" else chosen.exp()
