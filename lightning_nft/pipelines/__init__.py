"""diffusers text-to-image pipelines (SD3/SD3.5, FLUX.1, SD1.5) taken apart for reward fine-tuning.

:func:`build_pipeline` accepts a pipeline object, a local folder or a hub id, detects the family from
the pipeline class and returns :class:`~lightning_nft.pipelines.common.PipelineParts` (backbone in our
convention, prompt encoder, decode step, latent shape, the family's time grid, default LoRA targets).
"""

from __future__ import annotations

from lightning_nft.pipelines.build import BUILDERS, build_pipeline
from lightning_nft.pipelines.common import PipelineParts
from lightning_nft.pipelines.flux import build_flux
from lightning_nft.pipelines.module import PipelineFineTuningModule
from lightning_nft.pipelines.sd3 import build_sd3
from lightning_nft.pipelines.sd15 import build_sd15

__all__ = ["BUILDERS", "PipelineParts", "PipelineFineTuningModule", "build_pipeline", "build_sd3", "build_flux",
           "build_sd15"]
