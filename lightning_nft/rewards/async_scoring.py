"""Score chunk ``k`` of a round while chunk ``k + 1`` is being sampled.

A round samples ``N = P K`` rollouts and scores them. Done one after the other, the round takes
``T_sample + T_score``; with a slow scorer (a remote server, a big model) scoring dominates. Split
the round into ``C`` chunks of whole groups; the caller's thread samples chunk ``k + 1`` while a
worker thread scores chunk ``k``, so the round takes about ``T_sample + T_score / C`` when
``T_score <= T_sample`` (the scorer is hidden behind sampling) and ``T_sample / C + T_score``
otherwise. Waiting on a server and torch kernels release the GIL, so the two really overlap.

Guarantees: rewards come back in sample order; the caller's random generator is only used by the
caller's thread (sampling), so rollouts are the same as without overlap for the same chunking; a
scoring failure is raised as soon as it is seen (the remaining chunks are not sampled); scoring runs
under ``torch.no_grad`` (grad mode is per thread).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from lightning_nft.conditions import index_condition
from lightning_nft.samplers import SampleOutput

T = TypeVar("T")
ScoreFn = Callable[[Tensor, Any], Tensor]


def _score(reward: ScoreFn, samples: Tensor, cond: Any) -> Tensor:
    with torch.no_grad():
        return reward(samples, cond)


def sample_and_score(sample_chunk: Callable[[int], tuple[Tensor, Any]], reward: ScoreFn, chunks: int,
                     max_workers: int = 1, executor: Optional[ThreadPoolExecutor] = None
                     ) -> tuple[list[tuple[Tensor, Any]], Tensor]:
    """Sample ``chunks`` chunks in this thread and score each in a worker thread as soon as it exists.

    Args:
        sample_chunk: ``k -> (samples_k (n_k, *S), cond_k)``; further tuple items are passed back untouched.
        reward: ``(samples, cond) -> (n_k,)`` scores (e.g. ``pl_module.compute_rewards``).
        chunks: number of chunks ``C >= 1``.
        max_workers: scoring threads (1 keeps one request in flight; more for several endpoints).
        executor: a pool to reuse across rounds (not shut down here).

    Returns:
        the ``C`` results of ``sample_chunk`` in order, and the concatenated rewards ``(sum n_k,)``.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be positive, got {chunks}")
    pool = executor or ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-scoring")
    futures: list[Future] = []
    results: list[tuple[Tensor, Any]] = []
    try:
        for k in range(chunks):
            _raise_first_failure(futures)
            result = sample_chunk(k)
            results.append(result)
            futures.append(pool.submit(_score, reward, result[0], result[1]))
        scores = [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        if executor is None:
            pool.shutdown(wait=True, cancel_futures=True)
    return results, torch.cat([s.reshape(-1) for s in scores])


def _raise_first_failure(futures: Sequence[Future]) -> None:
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()


def group_chunks(n_groups: int, group_size: int, chunks: int) -> list[Tensor]:
    """Row indices of ``min(chunks, n_groups)`` chunks of whole groups (sizes differ by at most one group)."""
    c = max(1, min(int(chunks), n_groups))
    bounds = [round(i * n_groups / c) for i in range(c + 1)]
    return [torch.arange(bounds[i] * group_size, bounds[i + 1] * group_size) for i in range(c)]


def concat_sample_outputs(outputs: Sequence[SampleOutput]) -> SampleOutput:
    """Join chunk outputs along the batch: samples ``(N, *S)``, trajectory ``(T+1, N, *S)``, log_probs ``(T, N)``."""
    first = outputs[0]
    return SampleOutput(
        samples=torch.cat([o.samples for o in outputs]),
        times=first.times,
        trajectory=None if first.trajectory is None else torch.cat([o.trajectory for o in outputs], dim=1),
        log_probs=None if first.log_probs is None else torch.cat([o.log_probs for o in outputs], dim=1),
    )


def rollout_and_score(rollout: Callable[[Tensor, Any, torch.Generator], SampleOutput], score: ScoreFn,
                      x0: Tensor, cond: Any, generator: torch.Generator, group_size: int, chunks: int,
                      executor: Optional[ThreadPoolExecutor] = None) -> tuple[SampleOutput, Tensor]:
    """``rollout`` chunk by chunk (whole groups) with ``score`` of each chunk overlapped.

    The drop-in for ``out = pl_module.rollout(x0, cond, g); rewards = pl_module.compute_rewards(out.samples, cond)``
    in the rollout collection: ``rollout_and_score(pl_module.rollout, pl_module.compute_rewards, x0, cond, g,
    K, chunks)``. ``x0``: ``(P K, *S)`` noises, ``cond``: ``P K`` rows; returns the joined
    :class:`SampleOutput` and rewards ``(P K,)``. With ``chunks=1`` it is exactly the sequential code.
    """
    n = x0.shape[0]
    if n % group_size:
        raise ValueError(f"{n} rollouts are not whole groups of {group_size}")
    parts = group_chunks(n // group_size, group_size, chunks)

    def sample(k: int) -> tuple[Tensor, Any, SampleOutput]:
        idx = parts[k]
        part_cond = index_condition(cond, idx) if cond is not None else None
        out = rollout(x0[idx.to(x0.device)], part_cond, generator)
        return out.samples, part_cond, out

    results, rewards = sample_and_score(sample, score, len(parts), executor=executor)
    return concat_sample_outputs([r[2] for r in results]), rewards
