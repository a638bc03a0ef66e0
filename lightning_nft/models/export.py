"""Saving and loading small models as safetensors, and a callback that exports after ``fit``.

A file holds the module's ``state_dict`` (float tensors, contiguous) and string metadata; the
architecture's constructor arguments go in ``metadata["config"]`` as JSON so a loader can rebuild
the module without pickles. The shape of one sample the module was trained on goes in
``metadata["sample_shape"]`` (JSON list) when known, and a loaded module gets it back as its
``sample_shape`` attribute, so that a fine-tuning run on another shape is refused at start-up
(``lightning_nft.startup_checks``). Package data is read through :mod:`importlib.resources`.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from importlib import resources
from typing import Any, Dict, Optional, Sequence, Tuple, Type, TypeVar

import lightning.pytorch as pl
from torch import Tensor, nn
from typing_extensions import override

M = TypeVar("M", bound=nn.Module)


SAMPLE_SHAPE_KEY = "sample_shape"


def save_module_safetensors(module: nn.Module, path: str, metadata: Optional[Dict[str, Any]] = None,
                            sample_shape: Optional[Sequence[int]] = None) -> str:
    """Write ``module.state_dict()`` to ``path``; ``module.config()`` (if defined) goes to ``metadata["config"]``,
    ``sample_shape`` (default: ``module.sample_shape`` if set) to ``metadata["sample_shape"]``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if hasattr(module, "config") and callable(module.config):
        meta["config"] = json.dumps(module.config())
    meta.setdefault("class", type(module).__name__)
    sample_shape = sample_shape if sample_shape is not None else getattr(module, SAMPLE_SHAPE_KEY, None)
    if sample_shape is not None:
        meta[SAMPLE_SHAPE_KEY] = json.dumps([int(s) for s in sample_shape])
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, path, metadata=meta)
    os.chmod(path, 0o644)  # safetensors writes 0600; package data must be world-readable
    return path


def read_safetensors(path: Optional[str] = None, asset: Optional[str] = None) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read ``(tensors, metadata)`` from a file ``path`` or from package data ``lightning_nft/assets/<asset>``."""
    from safetensors import safe_open

    if path is None and asset is None:
        raise ValueError("give a path or an asset name")
    source = resources.files("lightning_nft").joinpath("assets", asset) if path is None else path
    with resources.as_file(source) if path is None else nullcontext(path) as file:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    return tensors, metadata


def config_from_metadata(metadata: Dict[str, str]) -> Dict[str, Any]:
    return json.loads(metadata["config"]) if "config" in metadata else {}


def load_module_safetensors(cls: Type[M], path: Optional[str] = None, asset: Optional[str] = None,
                            device: Optional[Any] = None, freeze: bool = False) -> M:
    """Rebuild ``cls(**metadata config)`` from a file or package asset, load its weights, return it in eval mode.

    ``freeze=True`` also turns off ``requires_grad``; ``device`` moves it. A recorded sample shape becomes
    the module's ``sample_shape`` attribute.
    """
    tensors, metadata = read_safetensors(path=path, asset=None if path else asset)
    net = cls(**config_from_metadata(metadata))
    net.load_state_dict(tensors)
    if SAMPLE_SHAPE_KEY in metadata:
        net.sample_shape = tuple(json.loads(metadata[SAMPLE_SHAPE_KEY]))
    net.eval()
    if freeze:
        net.requires_grad_(False)
    return net.to(device) if device is not None else net


class ExportSafetensors(pl.Callback):
    """At the end of ``fit``, write ``getattr(pl_module, attribute)`` as safetensors to ``path`` (rank 0 only).

    ``attribute`` is a dotted path to a submodule (``"net"``, ``"backbone"``, ``"policy.backbone"``);
    an empty string exports the whole LightningModule. A module with a ``save_pretrained(folder)``
    method (diffusers/transformers models, the text-to-image digits model) is written with it, and
    ``path`` is then a folder; its files are made world-readable (they may become package data).
    """

    def __init__(self, path: str, attribute: str = "net") -> None:
        super().__init__()
        self.path = path
        self.attribute = attribute

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        module: nn.Module = pl_module
        for name in filter(None, self.attribute.split(".")):
            module = getattr(module, name)
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(self.path)
            for root, _, files in os.walk(self.path):
                for name in files:
                    os.chmod(os.path.join(root, name), 0o644)
        else:
            save_module_safetensors(module, self.path, metadata={"epochs": trainer.current_epoch,
                                                                 "steps": trainer.global_step},
                                    sample_shape=getattr(pl_module, SAMPLE_SHAPE_KEY, None))
        print(f"exported {type(module).__name__} weights to {self.path}")
