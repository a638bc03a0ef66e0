"""Reference image sets for metrics (a callable returning ``(N, *S)`` images)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from lightning_nft.data.digits import load_digit_images


class ReferenceSet:
    """A fixed set of real samples for metrics: ``reference() -> (N, *S)``. Subclass and implement ``__call__``."""

    def __call__(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class DigitsReference(ReferenceSet):
    """The real 8x8 digits (optionally of one class) in ``[-1, 1]``, shape ``(N, 1, 8, 8)``."""

    def __init__(self, label: Optional[Union[int, Sequence[int]]] = None, split: str = "all") -> None:
        self.label, self.split = label, split

    def __call__(self) -> Tensor:
        return load_digit_images(self.label, split=self.split)[0]
