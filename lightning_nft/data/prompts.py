"""Prompt sources for text-to-image fine-tuning: prompt files, per-round sampling, an embedding cache.

A text-to-image round is "``K`` samples for each of ``P`` prompts". This module gives

* :func:`read_prompts`: a ``.txt`` file (one prompt per non-blank line) or a ``.jsonl`` file (one JSON
  object per line with a ``"prompt"`` string and any metadata fields, e.g. ``{"prompt": "a 7",
  "digit": 7}``) -> a list of records (dicts). Every record gets ``"prompt_id"`` (its 0-based index
  in the file) unless the file sets one. Errors name the file, the line and the field;
* :func:`sample_prompt_indices`: the round's ``P`` prompt indices drawn with a ``torch.Generator``.
  ``OnlineRollout`` seeds that generator by ``(seed, rank, round)``, so the draw is deterministic per
  rank and round (ranks differ, a resumed run repeats);
* :class:`PromptEmbeddingCache`: encodes each distinct prompt once with a *prompt encoder* and keeps the
  rows (on the CPU by default, so the text encoder need not stay on the accelerator);
* :class:`PromptConditions`: the module's ``conditions`` callable ``(P, generator) ->``
  :class:`~lightning_nft.conditions.Conditions` over a training prompt file, with a held-out file for
  evaluation and the negative-prompt rows that classifier-free guidance needs.

A **prompt encoder** is any callable ``encoder(prompts: list[str]) -> dict[str, Tensor]`` whose
tensors have one row per prompt, ``(n, ...)``: the keyword tensors the backbone takes, e.g.
``{"encoder_hidden_states": (n, L, D), "pooled_projections": (n, D')}`` for SD3.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_nft.conditions import Conditions

PromptEncoder = Callable[[list[str]], dict[str, Tensor]]
PROMPT_FIELD = "prompt"


def read_prompts(path: Union[str, os.PathLike], required_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records of a ``.txt`` or ``.jsonl`` prompt file (see the module docstring).

    Args:
        path: the file; ``.jsonl`` is read as JSON lines, anything else as plain text.
        required_fields: metadata fields every record must carry (e.g. ``("digit",)`` for a reward
            that reads it); a missing one raises ``KeyError`` naming the file, line and field.

    Raises:
        FileNotFoundError: no such file. ValueError: an empty file, a line that is not a JSON object,
        a missing or empty ``"prompt"``. KeyError: a missing required field.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    records: list[dict[str, Any]] = []
    jsonl = path.endswith(".jsonl")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            if jsonl:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            else:
                record = {PROMPT_FIELD: line.strip()}
            prompt = record.get(PROMPT_FIELD)
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: field {PROMPT_FIELD!r} must be a non-empty string, got {prompt!r}")
            for name in required_fields:
                if name not in record:
                    raise KeyError(f"{where}: missing metadata field {name!r} (needed by the reward or metrics)")
            record.setdefault("prompt_id", len(records))
            records.append(record)
    if not records:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return records


def sample_prompt_indices(n_prompts: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` indices into ``n_prompts`` prompts: consecutive random permutations, cut to ``n``.

    Each prompt appears ``floor(n / n_prompts)`` or ``ceil(n / n_prompts)`` times; with
    ``n <= n_prompts`` the indices are distinct. Deterministic given the generator's state.
    """
    if n_prompts < 1:
        raise ValueError("no prompts to sample from")
    reps = -(-int(n) // int(n_prompts))
    return torch.cat([torch.randperm(n_prompts, generator=generator) for _ in range(reps)])[:n]


class PromptEmbeddingCache:
    """Encode each distinct prompt once; return stacked rows for any list of prompts.

    ``cache(prompts)`` returns ``{key: (len(prompts), ...)}`` in the order given, encoding (under
    ``torch.no_grad``, in batches of ``batch_size``) only the prompts not seen before. Rows are kept
    on ``device`` (CPU by default) and returned there; move them with
    :func:`~lightning_nft.conditions.condition_to`.

    Args:
        encoder: a prompt encoder ``list[str] -> dict[str, Tensor]`` of ``(n, ...)`` rows.
        device: where cached rows live. dtype: cast floating rows to this dtype (``None``: keep).
        batch_size: prompts per encoder call.

    Attributes:
        n_encoded: how many prompts the encoder has been asked to encode in total.
    """

    def __init__(self, encoder: PromptEncoder, device: Union[str, torch.device] = "cpu",
                 dtype: Optional[torch.dtype] = None, batch_size: int = 64) -> None:
        self.encoder = encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self._rows: dict[str, dict[str, Tensor]] = {}
        self.n_encoded = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def clear(self) -> None:
        self._rows.clear()

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> None:
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            out = self.encoder(chunk)
            name = type(self.encoder).__name__
            if not isinstance(out, dict) or not all(isinstance(v, Tensor) for v in out.values()):
                raise TypeError(f"prompt encoder {name} must return a dict of tensors, got {type(out).__name__}")
            for key, value in out.items():
                if value.shape[0] != len(chunk):
                    raise ValueError(f"prompt encoder {name} returned {value.shape[0]} rows of {key!r} for "
                                     f"{len(chunk)} prompts")
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = {k: self._store(v[i]) for k, v in out.items()}
            self.n_encoded += len(chunk)

    def _store(self, row: Tensor) -> Tensor:
        row = row.detach()
        if self.dtype is not None and row.is_floating_point():
            return row.to(device=self.device, dtype=self.dtype).clone()
        return row.to(self.device).clone()

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("PromptEmbeddingCache needs at least one prompt")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if missing:
            self._encode(missing)
        keys = self._rows[prompts[0]].keys()
        return {k: torch.stack([self._rows[p][k] for p in prompts]) for k in keys}


class PromptConditions:
    """The module's ``conditions`` callable over prompt files: ``(P, generator) -> Conditions``.

    Each call draws ``P`` training prompts with :func:`sample_prompt_indices` and returns a
    :class:`~lightning_nft.conditions.Conditions` whose tensors are the cached encodings and whose
    metadata are the prompt records (``"prompt"``, ``"prompt_id"`` and the file's fields, plus
    ``"split": "train"``).

    Args:
        encoder: a prompt encoder (see the module docstring); wrapped in a :class:`PromptEmbeddingCache`.
        train_file: prompts drawn for rollouts.
        heldout_file: prompts for evaluation only (never drawn for rollouts).
        required_fields: metadata fields every record of both files must carry.
        negative_prompt: the prompt of the unconditional branch of classifier-free guidance
            (``""``: the empty prompt, as the model was trained with prompt dropout).
        cache_device: where the cache keeps encodings.
    """

    def __init__(self, encoder: PromptEncoder, train_file: str, heldout_file: Optional[str] = None,
                 required_fields: Sequence[str] = (), negative_prompt: str = "",
                 cache_device: str = "cpu") -> None:
        self.cache = PromptEmbeddingCache(encoder, device=cache_device)
        self.train_file, self.heldout_file = train_file, heldout_file
        self.negative_prompt = negative_prompt
        self.records = {"train": [dict(r, split="train") for r in read_prompts(train_file, required_fields)]}
        if heldout_file is not None:
            self.records["heldout"] = [dict(r, split="heldout") for r in read_prompts(heldout_file, required_fields)]

    def split(self, name: str) -> list[dict[str, Any]]:
        """The records of ``"train"`` or ``"heldout"``."""
        if name not in self.records:
            raise KeyError(f"no {name!r} prompts (have {sorted(self.records)}; give heldout_file for 'heldout')")
        return self.records[name]

    def conditions(self, records: Sequence[dict[str, Any]]) -> Conditions:
        """Encoded tensors and metadata for these records, one row each."""
        return Conditions(self.cache([r[PROMPT_FIELD] for r in records]), [dict(r) for r in records])

    def negative(self, n: int) -> Conditions:
        """``n`` rows of the negative prompt (the unconditional branch of guidance)."""
        return Conditions(self.cache([self.negative_prompt] * n), [{PROMPT_FIELD: self.negative_prompt} for _ in range(n)])

    def __call__(self, n_groups: int, generator: torch.Generator) -> Conditions:
        train = self.records["train"]
        idx = sample_prompt_indices(len(train), n_groups, generator)
        return self.conditions([train[i] for i in idx.tolist()])
