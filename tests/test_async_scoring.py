"""Scoring overlapped with sampling: order, equality with the sequential round, overlap, early failure.

The overlap is checked structurally, not by timing: while chunk ``k`` is sampled, the slow server
(a real process adding latency) must already have received the request of chunk ``k - 1``. In a
sequential round that request would only be sent after the last chunk is sampled, and the wait
below would run into its deadline.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from server_process import start_server

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.module import RewardFineTuningModule
from lightning_nft.objectives.grpo import GRPOObjective
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards.async_scoring import group_chunks, rollout_and_score, sample_and_score
from lightning_nft.rewards.base import LinearReward
from lightning_nft.rewards.remote import RemoteReward, RewardScoringError

DIRECTION = [1.0, -0.5]


def module(objective=None, reward=None, **kw) -> RewardFineTuningModule:
    gmm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], 0.3)
    torch.manual_seed(0)
    bb = ResidualVelocity(gmm, MLPVelocity(2, 16, 1, zero_init=False))
    settings = dict(sample_shape=[2], groups_per_round=6, group_size=4, n_sample_steps=4)
    settings.update(kw)
    return RewardFineTuningModule(bb, reward or LinearReward(DIRECTION), objective or NFTObjective(beta=1.0), **settings)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("slow"), ["--reward.class_path", "lightning_nft.rewards.LinearReward",
                                                        "--reward.init_args.direction", json.dumps(DIRECTION)])
    s.set_plan(["always:late:0.2"])
    yield s
    s.stop()


def test_group_chunks_partition_whole_groups():
    for n_groups in range(1, 13):
        for chunks in range(1, 15):
            parts = group_chunks(n_groups, 3, chunks)
            rows = torch.cat(parts)
            assert torch.equal(rows, torch.arange(3 * n_groups))
            sizes = [len(p) // 3 for p in parts]
            assert all(len(p) % 3 == 0 for p in parts) and max(sizes) - min(sizes) <= 1
            assert len(parts) == min(chunks, n_groups)


@pytest.mark.parametrize("objective", ["nft", "grpo"])
def test_rollout_and_score_equals_the_sequential_round(objective):
    m = module(GRPOObjective() if objective == "grpo" else None)
    x0 = torch.randn(24, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seq = m.rollout(x0, None, torch.Generator().manual_seed(2))
        seq_rewards = m.compute_rewards(seq.samples, None)
        one, one_rewards = rollout_and_score(m.rollout, m.compute_rewards, x0, None, torch.Generator().manual_seed(2),
                                             group_size=4, chunks=1)
    assert torch.equal(one.samples, seq.samples) and torch.equal(one_rewards, seq_rewards)
    if objective == "nft":  # an ODE rollout does not draw from the generator: any chunking gives the same samples
        with torch.no_grad():
            out, rewards = rollout_and_score(m.rollout, m.compute_rewards, x0, None, torch.Generator().manual_seed(2),
                                             group_size=4, chunks=4)
        assert torch.allclose(out.samples, seq.samples, atol=1e-6) and torch.allclose(rewards, seq_rewards, atol=1e-6)
    else:  # the SDE draws chunk by chunk: trajectories and log-probs are joined along the batch
        with torch.no_grad():
            out, rewards = rollout_and_score(m.rollout, m.compute_rewards, x0, None, torch.Generator().manual_seed(2),
                                             group_size=4, chunks=3)
        assert out.trajectory.shape == seq.trajectory.shape and out.log_probs.shape == seq.log_probs.shape
        assert torch.equal(out.trajectory[0], x0) and torch.equal(out.trajectory[-1], out.samples)
        assert torch.allclose(rewards, LinearReward(DIRECTION)(out.samples))


def test_scoring_overlaps_sampling_with_a_slow_server(slow_server):
    remote = RemoteReward(slow_server.url, max_retries=0, timeout=30, seed=0)
    first = len(slow_server.requests_logged())
    chunks, seen = 4, []

    def sample_chunk(k):
        if k > 0:  # the previous chunk's request must reach the server while this chunk is being sampled
            deadline = time.monotonic() + 30
            while len(slow_server.requests_logged()) - first < k:
                assert time.monotonic() < deadline, f"chunk {k - 1} was not sent while chunk {k} was sampled"
                time.sleep(0.01)
            seen.append(len(slow_server.requests_logged()) - first)
        x = torch.randn(5, 2, generator=torch.Generator().manual_seed(k))
        return x, None

    results, rewards = sample_and_score(sample_chunk, remote, chunks)
    assert seen == [1, 2, 3]
    expected = LinearReward(DIRECTION)(torch.cat([r[0] for r in results]))
    assert torch.equal(rewards, expected)  # in sample order


def test_a_scoring_failure_stops_the_round_early(slow_server):
    slow_server.set_plan(["always:500"])
    try:
        remote = RemoteReward(slow_server.url, max_retries=0, timeout=30, seed=0)
        failed = threading.Event()

        def reward(samples, cond):
            try:
                return remote(samples, cond)
            finally:
                failed.set()

        sampled = []

        def sample_chunk(k):
            if k > 0:
                assert failed.wait(30), "chunk 0 was never scored"
            sampled.append(k)
            return torch.zeros(2, 2), None

        with pytest.raises(RewardScoringError, match="HTTP 500"):
            sample_and_score(sample_chunk, reward, chunks=5)
        assert sampled == [0, 1]  # the failure of chunk 0 is raised before chunk 2 is sampled
    finally:
        slow_server.set_plan(["always:late:0.2"])


def test_scoring_runs_without_grad_in_the_worker_thread():
    modes = []

    def reward(samples, cond):
        modes.append(torch.is_grad_enabled())
        return samples.sum(1)

    x = torch.randn(3, 2, requires_grad=True)
    _, rewards = sample_and_score(lambda k: (x, None), reward, chunks=2)
    assert modes == [False, False] and not rewards.requires_grad


def test_the_module_collects_with_overlapped_remote_scoring(slow_server):
    """``RewardFineTuningModule(score_chunks=3)`` with a slow remote scorer: the same round as in process."""
    sequential = module()
    overlapped = module(reward=RemoteReward(slow_server.url, max_retries=0, timeout=30, seed=0), score_chunks=3)
    before = len(slow_server.requests_logged())
    with torch.no_grad():
        a = sequential.collect_rollouts(round_index=0)
        b = overlapped.collect_rollouts(round_index=0)
    assert len(slow_server.requests_logged()) - before == 3  # one request per chunk of 2 groups
    assert torch.allclose(a.x1, b.x1, atol=1e-6) and torch.allclose(a.rewards, b.rewards, atol=1e-5)
    assert torch.allclose(b.rewards, LinearReward(DIRECTION)(b.x1))
    assert torch.allclose(a.advantages, b.advantages, atol=1e-4) and torch.equal(a.group, b.group)
    with pytest.raises(ValueError, match="score_chunks"):
        module(score_chunks=0)
