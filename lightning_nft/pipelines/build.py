"""Build :class:`~lightning_nft.pipelines.common.PipelineParts` from any supported diffusers pipeline."""

from __future__ import annotations

from typing import Any, Optional

from lightning_nft.pipelines.common import PipelineParts, load_diffusers_pipeline
from lightning_nft.pipelines.flux import build_flux
from lightning_nft.pipelines.sd3 import build_sd3
from lightning_nft.pipelines.sd15 import build_sd15

BUILDERS = {"sd3": build_sd3, "flux": build_flux, "sd15": build_sd15}


def build_pipeline(source: Any, family: Optional[str] = None, dtype: Any = None, **kwargs: Any) -> PipelineParts:
    """:class:`PipelineParts` for ``source`` (pipeline object, folder or hub id); family detected from its class.

    ``family`` (``"sd3"``, ``"flux"``, ``"sd15"``), when given, must agree with the detected one.
    Other keyword arguments go to the family's builder (``build_sd3`` / ``build_flux`` / ``build_sd15``).
    """
    if family is not None and family not in BUILDERS:
        raise ValueError(f"unsupported family {family!r}; choose one of {sorted(BUILDERS)}")
    pipe, detected, description = load_diffusers_pipeline(source, dtype)
    if family is not None and family != detected:
        raise ValueError(f"{description} is a {type(pipe).__name__} ({detected}), not a {family} pipeline")
    parts = BUILDERS[detected](pipe, **kwargs)
    parts.source = description
    return parts
