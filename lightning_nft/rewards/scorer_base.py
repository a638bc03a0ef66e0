"""Common ground of learned image scorers (CLIP score, PickScore, HPS, aesthetic): frozen, eval, prompts.

A learned scorer is a pretrained network that never trains: its parameters do not require grad and
it stays in eval mode (no dropout) even when the owning ``LightningModule`` switches to train mode.
It still moves with the module (it is a submodule), so it runs on the module's device and dtype;
images are cast to the scorer's parameter dtype before scoring.

Prompts come from the condition metadata (``lightning_nft.conditions``): ``cond.values("prompt")``
for a :class:`~lightning_nft.conditions.Conditions`, or one fixed ``prompt`` for every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_nft.conditions import Conditions
from lightning_nft.rewards.base import Reward


class FrozenScorer(Reward):
    """A :class:`Reward` whose network submodules are frozen and always in eval mode.

    Args:
        prompt: a fixed prompt for every image (unconditional models); ``None`` reads the metadata
            field ``prompt_key`` of the conditions.
        prompt_key: the metadata field holding each image's prompt.
    """

    differentiable = True

    def __init__(self, prompt: Optional[str] = None, prompt_key: str = "prompt") -> None:
        super().__init__()
        self.prompt = prompt
        self.prompt_key = prompt_key

    def freeze(self) -> None:
        """Freeze every parameter and switch to eval mode (call at the end of ``__init__``)."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenScorer":
        return super().train(False)  # a frozen scorer never uses dropout / batch statistics

    @property
    def scorer_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prompts(self, cond: Any, n: int) -> list[str]:
        """The prompt of each of the ``n`` images (a ``KeyError`` naming the field when missing)."""
        if self.prompt is not None:
            return [self.prompt] * n
        if not isinstance(cond, Conditions):
            raise ValueError(
                f"{type(self).__name__} needs prompts: pass Conditions whose metadata has the field "
                f"{self.prompt_key!r}, or set prompt=... for a fixed prompt (got cond of type {type(cond).__name__})"
            )
        prompts = cond.values(self.prompt_key, source=type(self).__name__)
        if len(prompts) != n:
            raise ValueError(f"{type(self).__name__}: {len(prompts)} prompts for {n} images")
        return [str(p) for p in prompts]


def unique_rows(items: list[str]) -> tuple[list[str], Tensor]:
    """Distinct items in first-seen order and the index of each item among them (``(n,)`` long).

    A round has ``K`` images per prompt; text features are computed once per distinct prompt.
    """
    order: dict[str, int] = {}
    index = [order.setdefault(p, len(order)) for p in items]
    return list(order), torch.tensor(index, dtype=torch.long)


def at_least_float32(scores: Tensor) -> Tensor:
    """Scores in float32, or float64 when the scorer runs in float64 (half precision is promoted)."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def normalized(features: Tensor) -> Tensor:
    """``f / ||f||`` along the last dimension."""
    return features / features.norm(dim=-1, keepdim=True)


def as_features(output: Any) -> Tensor:
    """A features tensor from a transformers ``get_*_features`` call (a tensor, or an output with ``pooler_output``)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot read features from {type(output).__name__}")
    return pooled


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a torch state-dict file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def resolve_weights_file(path: str, repo: Optional[str] = None) -> str:
    """``path`` itself, or, when ``repo`` (a hub id) is named in the config, the hub file ``path`` of ``repo``."""
    if repo is None:
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo, filename=path)
