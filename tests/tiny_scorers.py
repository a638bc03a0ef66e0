"""Tiny randomly initialised scorer models (transformers CLIP, open_clip, aesthetic head) saved to a folder.

Tests load them back by path, like a user loads a released model; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_clip(folder: Path, image_size: int = 32, crop: int = 32, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` (character-level tokenizer) in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=crop, patch_size=8),
        projection_dim=8,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": crop, "width": crop}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_open_clip(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny open_clip CLIP (``open_clip_config.json`` + safetensors weights) in ``folder``."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 8,
           "vision_cfg": {"image_size": image_size, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def save_tiny_aesthetic_head(path: Path, input_dim: int = 8, seed: int = 0) -> Path:
    """A random aesthetic MLP state dict (the released key layout) saved with ``torch.save``."""
    from lightning_nft.rewards.aesthetic import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(input_dim).state_dict(), str(path))
    return path
