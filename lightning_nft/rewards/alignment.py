"""Prompt alignment for the text-to-image digits: the classifier's probability of the digit the prompt names.

For decoded images ``x (B, 1, 8, 8)`` in ``[-1, 1]`` with conditions whose metadata name a digit
``d_i`` (field ``"digit"`` of the prompt file, e.g. ``{"prompt": "a handwritten three", "digit": 3}``)::

    mode "prob":      r(x_i, c_i) = softmax(f(clamp(x_i)))_{d_i}
    mode "log_prob":  r(x_i, c_i) = log_softmax(f(clamp(x_i)))_{d_i}

with ``f`` the shipped digit classifier (:class:`~lightning_nft.rewards.DigitClassifierReward`, whose
maths this reuses with per-row targets). The reward reads only the metadata, never the text: the
prompt file says which digit a phrasing means.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_nft.conditions import Conditions, metadata_of
from lightning_nft.rewards.classifier import DigitClassifierReward


class DigitPromptAlignment(DigitClassifierReward):
    """``r(x, c)``: (log-)probability under the digit classifier of the digit in ``c``'s metadata ``field``.

    Args:
        field: the metadata field holding the digit (an int 0-9).
        mode, classifier, clamp: as :class:`~lightning_nft.rewards.DigitClassifierReward`.
    """

    def __init__(self, field: str = "digit", mode: str = "prob", classifier: Optional[nn.Module] = None,
                 clamp: bool = True) -> None:
        super().__init__(target=None, mode=mode, classifier=classifier, clamp=clamp)
        self.field = field

    def digits(self, cond: Any, n: int) -> Tensor:
        """The ``(n,)`` digits named by ``cond``'s metadata; errors name the field, the row and the value."""
        name = type(self).__name__
        if not isinstance(cond, Conditions):
            raise TypeError(f"{name} reads the metadata field {self.field!r} of a Conditions, got "
                            f"{type(cond).__name__}")
        metadata_of(cond, n)  # raises when the row counts disagree
        values = cond.values(self.field, source=name)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 9:
                raise ValueError(f"{name}: metadata field {self.field!r} of row {i} must be a digit 0-9, got {v!r} "
                                 f"(prompt {cond.metadata[i].get('prompt')!r})")
        return torch.tensor(values, dtype=torch.long)

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        return super().forward(samples, self.digits(cond, samples.shape[0]).to(samples.device))
