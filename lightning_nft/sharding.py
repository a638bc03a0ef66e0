"""FSDP2 sharding of the policies: trained weights, old policy and reference sharded alike.

With ``lightning.pytorch.strategies.ModelParallelStrategy`` (``data_parallel_size = world size``,
``tensor_parallel_size = 1``) Lightning builds a device mesh and calls the module's
``configure_model``; there :func:`shard_policies` applies ``torch.distributed.fsdp.fully_shard``
to the trained backbone and to its frozen old / reference copies with the *same* mesh (and, with
LoRA, to the one backbone that carries both adapters). Every parameter is then a ``DTensor``
sharded on dimension 0 in the same way, so the old policy's EMA
``old <- d old + (1 - d) current`` runs shard by shard with ``torch._foreach_lerp_`` and never
gathers the full weights. FSDP2 runs on CPU with the gloo backend (FSDP1 refuses CPU), so all of
this is tested with two CPU processes.

One catch: FSDP2 keeps the *root* module's parameters unsharded after a forward pass (the
backward would gather them again at once); after a no-grad forward (sampling the old policy, the
reference) the module's registered parameters are plain full tensors, not shards, until the next
reshard. :func:`reshard` puts every FSDP module back on its shards; call it before touching
parameters directly (EMA, snapshot of the reference).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def shard_policies(modules: Iterable[Optional[nn.Module]], mesh, block_classes: Sequence[str] = ()) -> None:
    """``fully_shard`` each module in ``modules`` (``None`` s skipped) over ``mesh``, in place.

    ``block_classes`` names submodule classes (e.g. ``"JointTransformerBlock"``) sharded as their own
    units first, so that only one block's full weights are gathered at a time; the rest of each
    module forms one unit with its root.
    """
    from torch.distributed.fsdp import fully_shard

    wanted = set(block_classes)
    for module in modules:
        if module is None or _fsdp_modules(module):
            continue
        if wanted:
            for sub in module.modules():
                if sub is not module and type(sub).__name__ in wanted:
                    fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh)


def reshard(module: nn.Module) -> None:
    """Put the parameters of every FSDP2 unit in ``module`` back on their shards (no-op without FSDP)."""
    for m in _fsdp_modules(module):
        m.reshard()


def full_tensor(t: Tensor) -> Tensor:
    """The full value of a (possibly sharded) tensor; a collective call on every rank for ``DTensor`` s."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def flat_parameters(params: Iterable[Tensor]) -> Tensor:
    """All of ``params``, gathered if sharded, detached, flattened and concatenated on the CPU ``(P,)``."""
    return torch.cat([full_tensor(p).detach().reshape(-1).cpu() for p in params])
