"""Export a fine-tuned LoRA adapter in the format diffusers' ``pipeline.load_lora_weights`` reads.

The file is diffusers' own (``<PipelineClass>.save_lora_weights``): a safetensors state dict with keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (``unet.`` for SD1.5) and the adapter's peft
configuration as metadata. The metadata matters: a LoRA layer adds ``(alpha / r) B A x``, and without
``lora_alpha`` in it diffusers assumes ``alpha = r`` and the exported model is silently different.

peft's ``get_peft_model_state_dict`` needs a ``peft_config`` attribute, which a model adapted in place with
``inject_adapter_in_model`` (``lightning_nft.lora.add_lora``, two adapters ``default`` and ``old``) does
not have; the state dict is therefore read from the tuner layers here, for one adapter.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_nft.lora import TRAIN_ADAPTER, _tuner_layers

# family -> (diffusers pipeline class, name of the denoiser component)
EXPORT_TARGETS = {
    "sd3": ("StableDiffusion3Pipeline", "transformer"),
    "flux": ("FluxPipeline", "transformer"),
    "sd15": ("StableDiffusionPipeline", "unet"),
}


def denoiser_of(backbone: nn.Module) -> nn.Module:
    """The diffusers model inside one of our adapters (``backbone.model``), or ``backbone`` itself."""
    return getattr(backbone, "model", backbone)


def lora_state_dict(model: nn.Module, adapter: str = TRAIN_ADAPTER) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, peft_config_dict)`` of one LoRA adapter of ``model`` in peft's saved naming.

    Keys drop the adapter name (``blocks.0.attn.to_q.lora_A.default.weight`` ->
    ``blocks.0.attn.to_q.lora_A.weight``); tensors are detached CPU copies. The config lists the adapted
    modules by full name and carries ``r`` and ``lora_alpha`` (with per-module patterns when they differ).
    """
    from peft import LoraConfig

    tensors: dict[str, Tensor] = {}
    marker = f".{adapter}."
    for name, p in model.named_parameters():
        if ".lora_" in name and marker in name:
            tensors[name.replace(marker, ".")] = p.detach().to("cpu", copy=True).contiguous()
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter named {adapter!r}")
    modules = {id(m): n for n, m in model.named_modules()}
    ranks, alphas = {}, {}
    for layer in _tuner_layers(model):
        if adapter in getattr(layer, "r", {}):
            ranks[modules[id(layer)]] = int(layer.r[adapter])
            alphas[modules[id(layer)]] = float(layer.lora_alpha[adapter])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks),
                        rank_pattern={k: v for k, v in ranks.items() if v != r},
                        alpha_pattern={k: v for k, v in alphas.items() if v != alpha})
    meta = config.to_dict()
    meta["target_modules"] = sorted(ranks)  # a list (JSON), not peft's set
    return tensors, meta


def save_diffusers_lora(backbone: nn.Module, directory: str, family: str, adapter: str = TRAIN_ADAPTER,
                        weight_name: Optional[str] = None) -> str:
    """Write ``backbone``'s adapter ``adapter`` where ``<family pipeline>.load_lora_weights(directory)`` finds it.

    ``family``: ``"sd3"``, ``"flux"`` or ``"sd15"``. Returns the path of the written file.
    """
    import diffusers

    if family not in EXPORT_TARGETS:
        raise ValueError(f"no LoRA export for family {family!r}; choose one of {sorted(EXPORT_TARGETS)}")
    class_name, component = EXPORT_TARGETS[family]
    tensors, meta = lora_state_dict(denoiser_of(backbone), adapter)
    os.makedirs(directory, exist_ok=True)
    kwargs = {f"{component}_lora_layers": tensors, f"{component}_lora_adapter_metadata": meta}
    if weight_name is not None:
        kwargs["weight_name"] = weight_name
    getattr(diffusers, class_name).save_lora_weights(directory, **kwargs)
    return os.path.join(directory, weight_name or "pytorch_lora_weights.safetensors")


class ExportDiffusersLoRA(pl.Callback):
    """At the end of ``fit`` (rank 0), export the trained LoRA adapter for ``pipeline.load_lora_weights``.

    Args:
        directory: output folder.
        family: ``"sd3"``, ``"flux"`` or ``"sd15"`` (default: ``pl_module.pipeline_family``).
        attribute: the module attribute holding the backbone (default ``"backbone"``).
    """

    def __init__(self, directory: str, family: Optional[str] = None, attribute: str = "backbone") -> None:
        self.directory, self.family, self.attribute = directory, family, attribute

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        family = self.family or getattr(pl_module, "pipeline_family", None)
        if family is None:
            raise ValueError("ExportDiffusersLoRA needs family= ('sd3', 'flux', 'sd15'): the module names none")
        with torch.no_grad():
            path = save_diffusers_lora(getattr(pl_module, self.attribute), self.directory, family)
        print(f"exported the LoRA adapter for diffusers' load_lora_weights to {path}")
