"""Settings checked before round 0, so that a bad one fails in seconds with a message instead of training nothing.

* **Sample shape.** A backbone or reward loaded from a weights file that records the shape it was trained on
  (``metadata["sample_shape"]``, see ``lightning_nft.models.export``) exposes it as ``.sample_shape``; it must
  equal the module's ``sample_shape`` (convolutional nets accept any size, so a mismatch would otherwise train
  on the wrong resolution without complaint).
* **One forward pass and one reward call** on a tiny batch of ``sample_shape``: the velocity has the samples'
  shape, and the reward returns one finite-or-not float per sample (``rewards.validation.reward_vector``); an
  exception inside either is re-raised naming the backbone / reward class and the batch shape.
* **Group normalisation needs groups.** With ``group_size = 1`` a group-centred normalisation makes every
  advantage 0 (``r = 1/2``): a whole run would train nothing and exit cleanly.
* **Learning rate.** A zero learning rate trains nothing either.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_nft.rewards.validation import reward_vector

GROUP_MODES = ("group", "binary")  # normalisations that centre each sample on its own group's mean


def declared_sample_shape(obj: Any) -> Optional[tuple[int, ...]]:
    """The ``sample_shape`` recorded on ``obj`` or, for an ``nn.Module``, on its first submodule that has one."""
    modules = obj.modules() if isinstance(obj, nn.Module) else [obj]
    for m in modules:
        shape = getattr(m, "sample_shape", None)
        if shape is not None and not callable(shape):
            return tuple(int(s) for s in shape)
    return None


def check_declared_sample_shapes(sample_shape: Sequence[int], **parts: Any) -> None:
    """Raise ``ValueError`` when a part (``backbone=..., reward=...``) records another sample shape."""
    shape = tuple(int(s) for s in sample_shape)
    for role, part in parts.items():
        declared = declared_sample_shape(part)
        if declared is not None and declared != shape:
            raise ValueError(
                f"sample_shape is {shape}, but the {role} {type(part).__name__} was trained on samples of shape "
                f"{declared} (recorded in its weights file); set sample_shape: {list(declared)}"
            )


def check_forward_and_reward(velocity: Callable[[Tensor, Tensor, Any], Tensor], reward: Callable[[Tensor, Any], Any],
                             sample_shape: Sequence[int], cond: Any = None, *, decode: Optional[Callable[[Tensor], Tensor]] = None,
                             backbone_name: str = "backbone", reward_name: str = "reward",
                             device: Optional[torch.device] = None, n: int = 2) -> Tensor:
    """One velocity evaluation at ``t = 1/2`` and one reward call on ``n`` random samples of ``sample_shape``.

    ``cond`` is the condition of the ``n`` samples (or ``None``); ``decode`` maps samples to what the reward
    sees (e.g. latents to pixels). Returns the ``(n,)`` rewards. Raises naming the part that failed.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *sample_shape), generator=g).to(device or "cpu")
    t = torch.full((n,), 0.5, device=x.device)
    with torch.no_grad():
        try:
            v = velocity(x, t, cond)
        except Exception as err:
            raise RuntimeError(
                f"start-up check: the {backbone_name} failed on a batch of shape {tuple(x.shape)} "
                f"(sample_shape {tuple(sample_shape)}): {type(err).__name__}: {err}"
            ) from err
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(
                f"start-up check: the {backbone_name} returned a velocity of shape {tuple(v.shape)} for samples of "
                f"shape {tuple(x.shape)}; sample_shape {tuple(sample_shape)} does not fit this backbone"
            )
        samples = decode(x) if decode is not None else x
        try:
            rewards = reward(samples, cond)
        except Exception as err:
            raise RuntimeError(
                f"start-up check: the reward {reward_name} failed on samples of shape {tuple(samples.shape)} "
                f"(sample_shape {tuple(sample_shape)}): {type(err).__name__}: {err}"
            ) from err
    return reward_vector(rewards, n, source=reward_name)


def check_group_size(group_size: int, normalizer: Any) -> None:
    """Refuse ``group_size = 1`` with a group-centred normalisation (every advantage would be 0)."""
    mode = getattr(normalizer, "mode", None)
    if int(group_size) == 1 and mode in GROUP_MODES:
        raise ValueError(
            f"group_size is 1 but the reward normalisation {type(normalizer).__name__}(mode={mode!r}) centres each "
            "reward on its own group's mean: every advantage would be 0 (r = 1/2) and the run would train nothing. "
            "Use group_size >= 2 (several samples per condition), or a batch-wide normalisation "
            "(normalizer mode 'minmax')"
        )


def check_learning_rates(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Refuse a parameter group with learning rate 0 (or below)."""
    for k, opt in enumerate(optimizers):
        for j, group in enumerate(opt.param_groups):
            lr = group.get("lr")
            lr = float(lr.item() if isinstance(lr, Tensor) else lr)
            if not lr > 0:
                raise ValueError(
                    f"the learning rate of {type(opt).__name__} (optimizer {k}, parameter group {j}) is {lr}: "
                    "nothing would be trained; set a positive lr"
                )
