"""The condition type: tensors for the network, metadata for rewards, one place for row operations."""

import pytest
import torch

from lightning_nft.conditions import (
    Conditions,
    concat_conditions,
    condition_to,
    index_condition,
    metadata_of,
    network_input,
    repeat_condition,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeat_then_index_keeps_rows_paired(seed):
    g = torch.Generator().manual_seed(seed)
    P, K = 3 + seed, 4
    labels = torch.randint(0, 10, (P,), generator=g)
    cond = Conditions({"labels": labels, "emb": torch.randn(P, 2, 5, generator=g)},
                      [{"prompt": f"a {int(d)}", "digit": int(d)} for d in labels])
    rep = repeat_condition(cond, K)
    assert len(rep) == P * K
    perm = torch.randperm(P * K, generator=g)
    sub = index_condition(rep, perm)
    for row, i in enumerate(perm.tolist()):
        assert sub.metadata[row]["digit"] == int(sub.tensors["labels"][row]) == int(labels[i // K])
        torch.testing.assert_close(sub.tensors["emb"][row], cond.tensors["emb"][i // K])


def test_concat_device_and_network_input():
    a = Conditions(torch.arange(3.0), [{"p": i} for i in range(3)])
    b = Conditions(torch.arange(3.0, 5.0), [{"p": i} for i in range(3, 5)])
    c = condition_to(concat_conditions([a, b]), "cpu", torch.float64)
    assert c.tensors.dtype == torch.float64 and c.tensors.tolist() == [0, 1, 2, 3, 4]
    assert [m["p"] for m in c.metadata] == [0, 1, 2, 3, 4]
    assert network_input(c) is c.tensors
    assert network_input(torch.ones(2)).shape == (2,)  # plain tensors pass through
    assert repeat_condition(None, 3) is None
    assert metadata_of(torch.ones(2), 2) == [{}, {}]


def test_malformed_conditions_name_the_field():
    with pytest.raises(ValueError, match="3 rows but metadata has 2"):
        Conditions(torch.zeros(3), [{}, {}])
    cond = Conditions(torch.zeros(2), [{"prompt": "a 3"}, {}])
    with pytest.raises(KeyError, match="PromptReward needs the metadata field 'digit'"):
        cond.values("digit", source="PromptReward")
    with pytest.raises(ValueError, match="2 metadata rows for 4 samples"):
        metadata_of(cond, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guidance_scale_one_is_conditional_and_w_extrapolates(seed):
    from lightning_nft.guidance import guided_velocity

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 4, generator=g)

    def velocity(x, t, cond):  # a nonlinear conditional field; cond is a dict of tensors
        return torch.tanh(x @ W + cond["emb"]) * (1 + t[:, None])

    x, t = torch.randn(6, 4, generator=g), torch.rand(6, generator=g)
    c, u = {"emb": torch.randn(6, 4, generator=g)}, {"emb": torch.zeros(6, 4)}
    assert torch.equal(guided_velocity(velocity, x, t, c, u, 1.0), velocity(x, t, c))
    w = 1.0 + 6.0 * torch.rand((), generator=g).item()
    expected = velocity(x, t, u) + w * (velocity(x, t, c) - velocity(x, t, u))
    torch.testing.assert_close(guided_velocity(velocity, x, t, c, u, w), expected, rtol=1e-6, atol=1e-6)


def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from lightning_nft.conditions import gather_conditions

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        cond = Conditions({"emb": torch.randn(3, 2, generator=g), "ids": torch.arange(3) + 10 * rank},
                          [{"prompt": f"rank {rank} row {i}", "digit": rank * 3 + i} for i in range(3)])
        torch.save({"mine": cond, "all": gather_conditions(cond), "plain": gather_conditions(cond.tensors["ids"])},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_conditions_across_two_real_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from lightning_nft.conditions import gather_conditions

    assert gather_conditions(Conditions(torch.ones(2))).tensors.shape == (2,)  # one process: unchanged
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected = concat_conditions([p["mine"] for p in parts])
    for p in parts:  # every rank holds all rows, in rank order, tensors paired with metadata
        assert p["all"].metadata == expected.metadata
        torch.testing.assert_close(p["all"].tensors["emb"], expected.tensors["emb"], rtol=0, atol=0)
        assert p["all"].tensors["ids"].tolist() == [0, 1, 2, 10, 11, 12] == p["plain"].tolist()
