"""The small text-to-image digits model that ships with the package, built from diffusers/transformers classes.

Three parts, saved under ``lightning_nft/assets/digits_t2i/`` in the libraries' own formats
(``config.json`` + safetensors per model, ``tokenizer.json``):

* a word-level **tokenizer** (``tokenizers.Tokenizer``, ``WordLevel`` model) over the words of the shipped
  prompt files, ``[BOS] words [EOS]`` padded with ``[PAD]`` to :data:`MAX_LENGTH` tokens; a word it
  does not know becomes ``[UNK]`` (with a warning);
* a CLIP-style **text encoder** (transformers ``CLIPTextModelWithProjection``, 2 layers, width 32; the
  pooled embedding is read at the ``[EOS]`` token), wrapped as :class:`DigitsPromptEncoder`, a prompt
  encoder ``list[str] -> {"encoder_hidden_states": (n, L, 32), "pooled_projections": (n, 32)}``;
* an SD3 **transformer** (diffusers ``SD3Transformer2DModel``: joint text-image attention, patch size 2
  on ``1 x 8 x 8`` images, 3 layers, width 32), wrapped as :class:`DigitsT2IVelocity`, a velocity field
  in our convention (``FlowTransformerVelocity``). The decode step is the identity: samples are the
  ``[-1, 1]`` pixels of the 8x8 digits.

Both networks are trained jointly from random initialisation by flow matching,
``E || v(x_t, t, enc(prompt)) - (x1 - x0) ||^2``, on the scikit-learn digits paired with the phrasings
of ``digits_train.jsonl`` ("a handwritten three", "the digit 3", "a 3", "the number three", "three"),
the prompt replaced by ``""`` with probability 0.1 so that the empty prompt is the unconditional branch
of classifier-free guidance (J. Ho and T. Salimans, "Classifier-Free Diffusion Guidance",
arXiv:2207.12598). ``digits_heldout.jsonl`` recombines the same words into phrasings never trained on
("the digit three", "a handwritten 3", "the number 3"). Regenerate the shipped files with::

    OMP_NUM_THREADS=1 lightning-nft fit --config configs/digits_t2i_pretrain.yaml

Load them with :func:`load_pretrained_digits_t2i` (no download).
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_nft.data.prompts import PromptConditions
from lightning_nft.diffusers_backbones import FlowTransformerVelocity

ASSET_DIR = "digits_t2i"
TRAIN_PROMPTS = "digits_train.jsonl"
HELDOUT_PROMPTS = "digits_heldout.jsonl"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
MAX_LENGTH = 8
TRANSFORMER_CONFIG = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=3,
                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                          caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8)
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                   num_attention_heads=2)
# the attention projections of SD3's joint blocks (image stream and text stream), for LoRA
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def digits_t2i_asset(name: str = "") -> str:
    """Path of a shipped file (or of the folder, ``name=""``) under ``lightning_nft/assets/digits_t2i``."""
    return str(resources.files("lightning_nft").joinpath("assets", ASSET_DIR, name))


def digit_prompt_file(split: str = "train") -> str:
    """The shipped prompt file of ``split`` (``"train"`` or ``"heldout"``)."""
    names = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS}
    if split not in names:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return digits_t2i_asset(names[split])


def build_word_tokenizer(words: Sequence[str], max_length: int = MAX_LENGTH):
    """A ``tokenizers.Tokenizer``: lower-case, split on whitespace/punctuation, one id per known word.

    Ids ``0-3`` are ``[PAD] [UNK] [BOS] [EOS]``; then the sorted distinct ``words``. Encodings are
    ``[BOS] w_1 ... w_m [EOS]`` padded with ``[PAD]`` (truncated) to ``max_length`` ids.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words} - set(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)])
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=PAD_ID, pad_token="[PAD]")
    return tok


def prompt_words(files: Sequence[str]) -> list[str]:
    """The distinct lower-case words of the prompts in ``files``."""
    from tokenizers import pre_tokenizers

    from lightning_nft.data.prompts import read_prompts

    split = pre_tokenizers.Whitespace()
    words = {w.lower() for f in files for r in read_prompts(f) for w, _ in split.pre_tokenize_str(r["prompt"])}
    return sorted(words)


class DigitsPromptEncoder(nn.Module):
    """Prompt encoder of the digits model: ``prompts (n) -> {"encoder_hidden_states": (n, L, D), "pooled_projections": (n, D')}``.

    Args:
        path: a folder holding ``tokenizer.json`` and ``text_encoder/`` (``None``: the shipped model).
        text_config: build a randomly initialised encoder with these ``CLIPTextConfig`` fields instead
            (pretraining); the tokenizer is then built from the shipped prompt files' words.
    """

    def __init__(self, path: Optional[str] = None, text_config: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        from tokenizers import Tokenizer
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if text_config is not None:
            self.tokenizer = build_word_tokenizer(prompt_words([digit_prompt_file("train"), digit_prompt_file("heldout")]))
            config = CLIPTextConfig(vocab_size=self.tokenizer.get_vocab_size(), max_position_embeddings=MAX_LENGTH,
                                    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                    **{**TEXT_CONFIG, **text_config})
            self.text_encoder = CLIPTextModelWithProjection(config)
        else:
            directory = path or digits_t2i_asset()
            self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(directory, "text_encoder"))
            self.eval()
        self._warned: set[str] = set()

    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        """``(n, MAX_LENGTH)`` int64 token ids; unknown words are ``[UNK]`` (warned once per word)."""
        prompts = list(prompts)
        encodings = self.tokenizer.encode_batch(prompts)
        unknown = {p[a:b] for p, e in zip(prompts, encodings) for (a, b), i in zip(e.offsets, e.ids) if i == UNK_ID}
        unknown -= self._warned
        if unknown:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"DigitsPromptEncoder: words outside the vocabulary become [UNK]: {sorted(unknown)}")
            self._warned |= unknown
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        ids = self.token_ids(prompts).to(self.text_encoder.device)
        out = self.text_encoder(input_ids=ids)
        return {"encoder_hidden_states": out.last_hidden_state, "pooled_projections": out.text_embeds}

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))


class DigitsT2IVelocity(FlowTransformerVelocity):
    """The digits model's SD3 transformer as a velocity field ``v(x (B, 1, 8, 8), t (B,), cond)``.

    ``cond`` is the dict of a prompt encoder (``encoder_hidden_states``, ``pooled_projections``).

    Args:
        path: a folder holding ``transformer/`` (``None``: the shipped model).
        transformer_config: build a randomly initialised ``SD3Transformer2DModel`` with these fields
            (over :data:`TRANSFORMER_CONFIG`) instead (pretraining).
    """

    def __init__(self, path: Optional[str] = None, transformer_config: Optional[dict[str, Any]] = None) -> None:
        from diffusers import SD3Transformer2DModel

        if transformer_config is not None:
            model = SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **transformer_config})
        else:
            model = SD3Transformer2DModel.from_pretrained(os.path.join(path or digits_t2i_asset(), "transformer"))
        super().__init__(model)
        if transformer_config is None:
            self.eval()

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(os.path.join(directory, "transformer"))


class DigitsT2IPretrainModel(nn.Module):
    """Velocity field and prompt encoder trained together: ``forward(x, t, prompts: list[str] | None)``.

    ``prompts=None`` means the empty prompt for every row (unconditional). ``save_pretrained(folder)``
    writes the layout :func:`load_pretrained_digits_t2i` reads.
    """

    def __init__(self, velocity: DigitsT2IVelocity, prompt_encoder: DigitsPromptEncoder) -> None:
        super().__init__()
        self.velocity = velocity
        self.prompt_encoder = prompt_encoder

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Sequence[str]] = None) -> Tensor:
        prompts = [""] * x.shape[0] if cond is None else list(cond)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} samples")
        return self.velocity(x, t, self.prompt_encoder(prompts))

    def save_pretrained(self, directory: str) -> None:
        self.velocity.save_pretrained(directory)
        self.prompt_encoder.save_pretrained(directory)


class DigitsPromptConditions(PromptConditions):
    """The digits model's prompts: the shipped training and held-out phrasings, encoded by the shipped encoder.

    A :class:`~lightning_nft.data.prompts.PromptConditions` (``(P, generator) -> Conditions``) whose
    records carry ``"digit"`` (read by :class:`~lightning_nft.rewards.DigitPromptAlignment`).

    Args:
        train_file, heldout_file: other prompt files (``None``: the shipped ones).
        negative_prompt: the unconditional branch of guidance (``""``, as the model was pretrained).
        path: another folder of the model (``None``: the shipped one) for the prompt encoder.
    """

    def __init__(self, train_file: Optional[str] = None, heldout_file: Optional[str] = None,
                 negative_prompt: str = "", path: Optional[str] = None) -> None:
        super().__init__(DigitsPromptEncoder(path), train_file or digit_prompt_file("train"),
                         heldout_file or digit_prompt_file("heldout"), required_fields=("digit",),
                         negative_prompt=negative_prompt)


def load_pretrained_digits_t2i(path: Optional[str] = None) -> tuple[DigitsT2IVelocity, DigitsPromptEncoder]:
    """The shipped (or ``path``'s) text-to-image digits model: ``(velocity, prompt_encoder)``, in eval mode."""
    return DigitsT2IVelocity(path), DigitsPromptEncoder(path)
