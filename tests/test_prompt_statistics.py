"""Per-prompt statistics: the fraction of tied groups and the per-prompt running baseline."""

import pytest
import torch

from lightning_nft.advantages import PromptStatTracker, normalize_rewards, tied_group_fraction


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tied_group_fraction_counts_constant_groups(seed):
    g = torch.Generator().manual_seed(seed)
    G, K = 6 + seed, 4
    rewards = torch.randn(G, K, generator=g)
    tied = torch.rand(G, generator=g) < 0.5
    rewards[tied] = torch.rand(int(tied.sum()), 1, generator=g) * 0.3 + 0.1  # constant rows (not exact floats)
    group = torch.arange(G).repeat_interleave(K) * 7 + 3  # any integer ids
    perm = torch.randperm(G * K, generator=g)
    got = tied_group_fraction(rewards.reshape(-1)[perm], group[perm])
    assert got.item() == pytest.approx(tied.double().mean().item(), abs=0)
    assert tied_group_fraction(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])).item() == 1.0  # singletons


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_with_one_round_window_is_group_normalisation_by_prompt(seed):
    g = torch.Generator().manual_seed(seed)
    tracker = PromptStatTracker(window=1, clip=2.0)
    for _ in range(3):
        ids = torch.randint(0, 5, (24,), generator=g)
        rewards = torch.randn(24, generator=g) + ids.float()
        adv, r = tracker(rewards, ids)
        adv_ref, r_ref = normalize_rewards(rewards, ids, mode="group", std_scope="group", clip=2.0)
        torch.testing.assert_close(adv, adv_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r, r_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_baseline_is_the_mean_and_std_of_the_prompt_history(seed):
    g = torch.Generator().manual_seed(seed)
    tracker = PromptStatTracker(window=2, clip=50.0, eps=0.0)
    past = {p: [] for p in range(3)}
    for rnd in range(4):
        ids = torch.randint(0, 3, (18,), generator=g)
        rewards = torch.randn(18, generator=g) * (1 + rnd)
        adv, _ = tracker(rewards, ids)
        for p in torch.unique(ids).tolist():
            past[p].append(rewards[ids == p].double())
            seen = torch.cat(past[p][-2:])  # this round and the previous one in which p was drawn
            expected = (rewards[ids == p].double() - seen.mean()) / seen.std(unbiased=False)
            torch.testing.assert_close(adv[ids == p].double(), expected, rtol=1e-5, atol=1e-6)
    state = tracker.state_dict()
    again = PromptStatTracker(window=2, clip=50.0, eps=0.0)
    again.load_state_dict(state)
    x, ids = torch.randn(6, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(again(x, ids)[0], tracker(x, ids)[0])
    with pytest.raises(ValueError, match="window must be a positive"):
        PromptStatTracker(window=0)
