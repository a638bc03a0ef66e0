"""Sample-quality metrics as torchmetrics ``Metric`` s (their ``cat`` states sync across ranks).

* :class:`DiversityMetric`: mean pairwise Euclidean distance between feature vectors,
  ``D = 2 / (n (n - 1)) sum_{i < j} || f_i - f_j ||`` over every sample seen (all ranks).
* :class:`FrechetDistanceMetric`: FID ``||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2})`` of
  generated features against a fixed reference set, computed with clean-fid's
  ``fid_from_feats`` on features from a custom extractor (the digit classifier's penultimate
  layer for the digits task: no Inception download).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """``2 / (n (n - 1)) sum_{i < j} || f_i - f_j ||`` for ``features (n, D)``, ``n >= 2``."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    d = torch.cdist(features.double(), features.double())
    return (d.sum() / (n * (n - 1))).to(features.dtype)


class DiversityMetric(Metric):
    """Mean pairwise distance of all features passed to :meth:`update` (``(B, D)`` each)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor) -> None:
        self.features.append(features.detach().reshape(features.shape[0], -1).float())

    def compute(self) -> Tensor:
        f = self.features if isinstance(self.features, Tensor) else torch.cat(self.features)
        return mean_pairwise_distance(f)


class FrechetDistanceMetric(Metric):
    """FID of the features passed to :meth:`update` against ``reference_features (M, D)``."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, reference_features: Optional[Tensor] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.reference_features = None if reference_features is None else reference_features.detach().cpu().double()

    def set_reference(self, reference_features: Tensor) -> None:
        self.reference_features = reference_features.detach().cpu().double()

    def update(self, features: Tensor) -> None:
        self.features.append(features.detach().reshape(features.shape[0], -1).float())

    def compute(self) -> Tensor:
        from cleanfid.fid import fid_from_feats

        if self.reference_features is None:
            raise RuntimeError("FrechetDistanceMetric needs reference features (set_reference)")
        f = self.features if isinstance(self.features, Tensor) else torch.cat(self.features)
        value = fid_from_feats(f.detach().cpu().double().numpy(), self.reference_features.numpy())
        return torch.tensor(float(np.real(value)))
