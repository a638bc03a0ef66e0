"""lightning_nft: reward fine-tuning of flow-matching and diffusion models on PyTorch Lightning.

Conventions (``paths``): time runs from noise (``t = 0``) to data (``t = 1``),
``x_t = (1 - t) x0 + t x1``, velocity target ``x1 - x0``.
"""

__version__ = "0.1.0"
