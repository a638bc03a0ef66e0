"""Reward outputs, non-finite reward policies and the blame for non-finite samples (``rewards.validation``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_nft.rewards.validation import (
    PolicyDivergedError,
    check_finite_loss,
    check_finite_samples,
    nonfinite_reward_mask,
    reward_vector,
)


@pytest.mark.parametrize("seed", range(4))
def test_reward_vector_accepts_one_value_per_sample(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    values = torch.randn(n, generator=g, dtype=torch.float64)
    for given in (values, values[:, None]):
        out = reward_vector(given, n, source=f"R{seed}")
        assert out.shape == (n,) and out.dtype == torch.float64
        assert torch.equal(out, values)
    ints = torch.randint(-5, 5, (n,), generator=g)
    assert torch.equal(reward_vector(ints, n), ints.float())


@pytest.mark.parametrize("seed", range(3))
def test_numpy_and_lists_are_converted_with_one_note(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(2, 30))
    values = g.normal(size=n)
    source = f"NumpyReward{seed}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = reward_vector(values, n, source=source)
        b = reward_vector(values.tolist(), n, source=source)
        c = reward_vector(values.reshape(n, 1), n, source=source)
    notes = [w for w in caught if source in str(w.message)]
    assert len(notes) == 1 and "ndarray" in str(notes[0].message)
    for out in (a, b, c):
        assert out.shape == (n,) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor(values, dtype=torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("bad_shape", [(2, 8), (16, 2), (8,), (16, 1, 1), ()])
def test_other_shapes_are_refused_naming_the_reward_and_the_shape(bad_shape):
    n = 16
    with pytest.raises(ValueError, match=rf"MyReward returned a reward of shape {tuple(bad_shape)!s}".replace("(", r"\(")
                       .replace(")", r"\)")):
        reward_vector(torch.zeros(bad_shape), n, source="MyReward")
    with pytest.raises(ValueError, match="MyReward"):
        reward_vector(np.zeros(bad_shape), n, source="MyReward")


@pytest.mark.parametrize("value", [None, {"reward": torch.zeros(4)}, "0.5", [["a"] * 4], torch.zeros(4, dtype=torch.bool)])
def test_non_numeric_outputs_are_refused_naming_the_reward(value):
    with pytest.raises(TypeError, match="OddReward"):
        reward_vector(value, 4, source="OddReward")


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    P, K = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
    rewards = torch.randn(P * K, generator=g)
    group = torch.arange(P).repeat_interleave(K) + 10 * seed  # ids need not start at 0
    bad = torch.rand(P * K, generator=g) < 0.2
    bad[int(torch.randint(0, P * K, (1,), generator=g))] = True
    kinds = torch.tensor([float("nan"), float("inf"), float("-inf")])
    rewards[bad] = kinds[torch.randint(0, 3, (int(bad.sum()),), generator=g)]
    return rewards, group, bad


@pytest.mark.parametrize("seed", range(6))
def test_nonfinite_policies_keep_what_they_say(seed):
    rewards, group, bad = _case(seed)
    with pytest.raises(ValueError, match=r"GoodReward gave \d+ non-finite value\(s\).*round 7.*drop_sample"):
        nonfinite_reward_mask(rewards, group, "raise", source="GoodReward", round_index=7)

    s = nonfinite_reward_mask(rewards, group, "drop_sample")
    assert torch.equal(s.keep, ~bad)
    assert (s.nonfinite, s.dropped_samples, s.dropped_groups) == (int(bad.sum()), int(bad.sum()), 0)

    bad_groups = {int(x) for x in group[bad]}
    expected = torch.tensor([int(x) not in bad_groups for x in group])
    if not expected.any():
        with pytest.raises(ValueError, match="no sample is left"):
            nonfinite_reward_mask(rewards, group, "drop_group")
        return
    d = nonfinite_reward_mask(rewards, group, "drop_group")
    assert torch.equal(d.keep, expected)
    assert d.dropped_groups == len(bad_groups) and d.dropped_samples == int((~expected).sum())
    assert torch.isfinite(rewards[d.keep]).all()


def test_finite_rewards_pass_every_policy_untouched():
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    for policy in ("raise", "drop_sample", "drop_group"):
        s = nonfinite_reward_mask(rewards, torch.arange(12) // 4, policy)
        assert s.keep.all() and (s.nonfinite, s.dropped_samples, s.dropped_groups) == (0, 0, 0)
    with pytest.raises(ValueError, match="unknown non-finite reward policy"):
        nonfinite_reward_mask(rewards, None, "ignore")


def test_nonfinite_samples_and_losses_blame_the_policy():
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    check_finite_samples(x)  # finite: nothing happens
    x[5, 0, 2, 3] = float("nan")
    with pytest.raises(PolicyDivergedError, match=r"old policy produced 1 non-finite sample\(s\) of 8 at round 3, "
                       r"step 24 \(first: sample 5\).*reward was not called.*last finite loss was 0\.125"):
        check_finite_samples(x, policy="the old policy", round_index=3, step=24, last_finite_loss=0.125)
    check_finite_loss(torch.tensor(1.5))
    with pytest.raises(PolicyDivergedError, match=r"loss is inf at round 2, step 9.*No finite loss"):
        check_finite_loss(torch.tensor(float("inf")), round_index=2, step=9)
