"""Conditions: what the network receives, kept apart from what rewards and metrics read.

A text-to-image batch is "``K`` samples for each of ``P`` prompts". Each row of such a batch has

* **tensors** for the backbone: a plain ``(N, ...)`` tensor (class labels, an embedding) or a
  dict of them (``{"encoder_hidden_states": (N, L, D), "pooled_projections": (N, D')}``...);
* **metadata** for rewards and metrics: one dict per row (``{"prompt": "a 7", "digit": 7,
  "prompt_id": 3}``), never shown to the backbone.

:class:`Conditions` holds both. Plain tensors, dicts/lists of tensors and ``None`` (unconditional
models) keep working everywhere: the functions below accept any of them, and :func:`network_input`
/ :func:`metadata_of` give each consumer its part. Indexing, repeating per group, concatenating
moving to a device and gathering across ranks live here and nowhere else.

Shapes: ``N`` rows; every tensor's first dimension and ``len(metadata)`` equal ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

TensorTree = Union[None, Tensor, dict, list, tuple]


@dataclass
class Conditions:
    """``N`` rows of conditions: ``tensors`` for the network, ``metadata`` (one dict per row) for rewards.

    Args:
        tensors: ``None``, a ``(N, ...)`` tensor, or a dict/list/tuple of ``(N, ...)`` tensors.
        metadata: ``N`` dicts (prompt text, prompt id, tags...); empty dicts when there is none.
    """

    tensors: TensorTree = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = _tree_rows(self.tensors)
        if n is not None and self.metadata and len(self.metadata) != n:
            raise ValueError(f"Conditions: tensors have {n} rows but metadata has {len(self.metadata)} entries")
        if n is not None and not self.metadata:
            self.metadata = [{} for _ in range(n)]

    def __len__(self) -> int:
        n = _tree_rows(self.tensors)
        return n if n is not None else len(self.metadata)

    def index(self, idx: Tensor) -> "Conditions":
        """Rows ``idx`` (a 1-D long tensor) of tensors and metadata."""
        rows = idx.tolist()
        return Conditions(_index_tree(self.tensors, idx), [self.metadata[i] for i in rows])

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "Conditions":
        """Tensors moved to ``device`` (floating tensors cast to ``dtype`` when given); metadata unchanged."""
        return Conditions(_to_tree(self.tensors, device, dtype), self.metadata)

    def values(self, key: str, source: str = "a reward") -> list[Any]:
        """``metadata[i][key]`` for every row; a ``KeyError`` naming the key and the consumer when missing."""
        missing = [i for i, m in enumerate(self.metadata) if key not in m]
        if missing or not self.metadata:
            raise KeyError(
                f"{source} needs the metadata field {key!r}, missing in {len(missing) or 'all'} of "
                f"{len(self)} rows (first row: {self.metadata[missing[0]] if missing else None}); "
                "add it to the prompt file (JSONL field) or the condition source"
            )
        return [m[key] for m in self.metadata]


def network_input(cond: Any) -> Any:
    """What the backbone receives: the tensors of a :class:`Conditions`, anything else unchanged."""
    return cond.tensors if isinstance(cond, Conditions) else cond


def metadata_of(cond: Any, n: int) -> list[dict[str, Any]]:
    """``n`` metadata dicts for rewards/metrics (empty dicts when ``cond`` carries none)."""
    if isinstance(cond, Conditions):
        if len(cond.metadata) != n:
            raise ValueError(f"conditions have {len(cond.metadata)} metadata rows for {n} samples")
        return cond.metadata
    return [{} for _ in range(n)]


def condition_rows(cond: Any) -> Optional[int]:
    """Number of rows of any condition (``None`` for ``None``)."""
    if isinstance(cond, Conditions):
        return len(cond)
    return _tree_rows(cond)


def index_condition(cond: Any, idx: Tensor) -> Any:
    """Select rows ``idx`` of a condition: :class:`Conditions`, a tensor, a dict/list/tuple of them, or ``None``."""
    if isinstance(cond, Conditions):
        return cond.index(idx)
    return _index_tree(cond, idx)


def repeat_condition(cond: Any, repeats: int) -> Any:
    """Repeat each of the ``P`` group conditions ``repeats`` times, in order (``N = P * K`` rows)."""
    if cond is None:
        return None
    n = condition_rows(cond)
    return index_condition(cond, torch.arange(n).repeat_interleave(repeats))


def concat_conditions(conds: Sequence[Any]) -> Any:
    """Concatenate conditions row-wise (all of one kind)."""
    if not conds or conds[0] is None:
        return None
    if isinstance(conds[0], Conditions):
        return Conditions(_cat_trees([c.tensors for c in conds]), [m for c in conds for m in c.metadata])
    return _cat_trees(list(conds))


def condition_to(cond: Any, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> Any:
    """Move any condition to ``device`` (floating tensors cast to ``dtype`` when given)."""
    if isinstance(cond, Conditions):
        return cond.to(device, dtype)
    return _to_tree(cond, device, dtype)


def gather_conditions(cond: Any) -> Any:
    """Rows of every rank in rank order (``world * N`` rows; every rank must hold the same ``N``).

    Tensors go through ``torch.distributed.all_gather``, metadata (and lists of non-tensors) through
    ``all_gather_object``. Without an initialised process group (one process) ``cond`` is returned.
    """
    import torch.distributed as dist

    if cond is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cond
    world = dist.get_world_size()
    n = condition_rows(cond)
    counts: list[Any] = [None] * world
    dist.all_gather_object(counts, n)
    if len(set(counts)) > 1:
        raise ValueError(f"gather_conditions: ranks hold different numbers of rows {counts}")

    def gather_objects(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return [x for part in out for x in part]

    def gather_tree(tree: Any) -> Any:
        if tree is None:
            return None
        if isinstance(tree, Tensor):
            parts = [torch.empty_like(tree) for _ in range(world)]
            dist.all_gather(parts, tree.contiguous())
            return torch.cat(parts, dim=0)
        if isinstance(tree, dict):
            return {k: gather_tree(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], (Tensor, dict)):
            return type(tree)(gather_tree(v) for v in tree)
        return gather_objects(list(tree))

    if isinstance(cond, Conditions):
        return Conditions(gather_tree(cond.tensors), gather_objects(cond.metadata))
    return gather_tree(cond)


# ---------------------------------------------------------------------------------------- trees
def _tree_rows(tree: Any) -> Optional[int]:
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return int(tree.shape[0])
    if isinstance(tree, dict):
        for v in tree.values():
            n = _tree_rows(v)
            if n is not None:
                return n
        return None
    if isinstance(tree, (list, tuple)):
        if tree and isinstance(tree[0], (Tensor, dict)):
            return _tree_rows(tree[0])
        return len(tree)
    raise TypeError(f"cannot count the rows of a condition of type {type(tree).__name__}")


def _index_tree(tree: Any, idx: Tensor) -> Any:
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return tree[idx.to(tree.device)]
    if isinstance(tree, dict):
        return {k: _index_tree(v, idx) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        if tree and isinstance(tree[0], (Tensor, dict)):
            return type(tree)(_index_tree(c, idx) for c in tree)
        return [tree[i] for i in idx.tolist()]
    raise TypeError(f"cannot index a condition of type {type(tree).__name__}")


def _to_tree(tree: Any, device: Any, dtype: Optional[torch.dtype]) -> Any:
    if isinstance(tree, Tensor):
        if dtype is not None and tree.is_floating_point():
            return tree.to(device=device, dtype=dtype)
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_tree(v, device, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], (Tensor, dict)):
        return type(tree)(_to_tree(v, device, dtype) for v in tree)
    return tree


def _cat_trees(trees: list[Any]) -> Any:
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(trees, dim=0)
    if isinstance(first, dict):
        return {k: _cat_trees([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        if first and isinstance(first[0], (Tensor, dict)):
            return type(first)(_cat_trees([t[i] for t in trees]) for i in range(len(first)))
        return [x for t in trees for x in t]
    raise TypeError(f"cannot concatenate conditions of type {type(first).__name__}")
