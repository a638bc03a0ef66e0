"""LoRA through peft: the trainable adapter, the old-policy adapter, and the adapter-free reference.

With LoRA the reference policy is free (the base weights with adapters disabled) and the old
policy is a second adapter of the same shape. peft's public
``set_adapter`` also flips ``requires_grad``; to evaluate another adapter inside a training step
without touching what is trainable we switch each tuner layer's active adapter for the duration of
one forward pass only.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

TRAIN_ADAPTER = "default"
OLD_ADAPTER = "old"


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def check_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming every entry of ``target_modules`` that matches no module of ``model``.

    peft's rule: a module named ``a.b.c`` matches a target ``c``, ``b.c`` or ``a.b.c`` (whole dotted
    suffix). peft itself only complains when *no* target matches; a misspelt entry beside good ones
    would otherwise be silently ignored.
    """
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a list of module names, got the string {target_modules!r}")
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
        raise ValueError(f"LoRA target module(s) {missing} match no module of {type(model).__name__} "
                         f"(module names end in e.g. {leaves[:12]})")


def add_lora(model: nn.Module, target_modules: Sequence[str], rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, init_lora_weights: bool | str = True,
             adapter_dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Inject two LoRA adapters (``default`` trainable, ``old`` frozen and equal to it) into ``model``.

    Returns the same model (modified in place) with only the ``default`` adapter trainable. The
    adapters' parameters are kept in ``adapter_dtype`` (float32 by default) whatever the base weights'
    dtype: bf16 base weights with fp32 trainable LoRA parameters, the pattern of diffusers'
    ``cast_training_params`` (peft casts each LoRA branch's input to the adapter's dtype and the
    result back). Every target must match a module (:func:`check_lora_targets`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    check_lora_targets(model, target_modules)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     init_lora_weights=init_lora_weights)
    model = inject_adapter_in_model(cfg, model, adapter_name=TRAIN_ADAPTER)
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        model = inject_adapter_in_model(cfg, model, adapter_name=OLD_ADAPTER)
    for layer in _tuner_layers(model):
        layer.set_adapter(TRAIN_ADAPTER)  # active + trainable: default only
    for name, p in model.named_parameters():
        p.requires_grad_(f".{TRAIN_ADAPTER}." in name)
        if adapter_dtype is not None and ".lora_" in name and p.dtype != adapter_dtype:
            p.data = p.data.to(adapter_dtype)
    for old, cur in zip(*adapter_parameter_pairs(model)):
        old.data.copy_(cur.data)
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft tuner layers."""
    try:
        return bool(_tuner_layers(model))
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False


def adapter_parameter_pairs(model: nn.Module, src: str = TRAIN_ADAPTER, dst: str = OLD_ADAPTER):
    """``(dst_params, src_params)``: matching parameters of two adapters, by name."""
    params = dict(model.named_parameters())
    dst_list, src_list = [], []
    for name, p in params.items():
        if f".{src}." in name:
            twin = name.replace(f".{src}.", f".{dst}.")
            if twin not in params:
                raise KeyError(f"adapter {dst!r} has no parameter matching {name}")
            dst_list.append(params[twin])
            src_list.append(p)
    return dst_list, src_list


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Evaluate ``model`` with adapter ``name`` active (``requires_grad`` untouched)."""
    layers = _tuner_layers(model)
    saved = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = [name]
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer._active_adapter = s


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` as its base weights (all adapters off; ``requires_grad`` untouched)."""
    layers = _tuner_layers(model)
    saved = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer._disable_adapters = s
