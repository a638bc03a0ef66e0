"""End to end: a run whose remote scorer dies saves a checkpoint and resumes with no rollout scored twice.

Three runs of the same 4-round DiffusionNFT job on the 2-D mixture, scored by a real reference
server process on 127.0.0.1:

1. uninterrupted (the reference);
2. the server answers the rounds before round ``f``, then only HTTP 500: the run stops in round ``f``
   with a ``RewardScoringError`` naming the endpoint, after ``CheckpointOnRewardFailure`` saved a
   checkpoint;
3. resumed from that checkpoint with the server healthy again.

The resumed run scores rounds ``f..3`` only, each exactly once, with the same rollouts and rewards as
the reference, and ends with the same parameters (``f = 2``, and ``f = 0``: a failure in the first round).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from server_process import start_server

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks.reward_failure import CheckpointOnRewardFailure
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards.remote import RemoteReward, RewardScoringError

DIRECTION = [1.0, 0.0]
ROUNDS = 4


class RecordRounds(Callback):
    """The rewards each round trained on (read after the round's collection)."""

    def __init__(self) -> None:
        self.rounds: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rounds[trainer.current_epoch] = pl_module.rollouts.rewards.clone()


def make_module(url: str) -> RewardFineTuningModule:
    gmm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.4)
    torch.manual_seed(0)
    bb = ResidualVelocity(gmm, MLPVelocity(2, 16, 1, zero_init=True))
    reward = RemoteReward(url, max_retries=2, backoff=0.01, timeout=10, seed=0)
    return RewardFineTuningModule(bb, reward, NFTObjective(beta=1.0), sample_shape=[2], groups_per_round=3,
                                  group_size=8, steps_per_round=3, n_sample_steps=4, optimizer=adamw(1e-2))


def fit(module, root, callbacks, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=ROUNDS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         callbacks=callbacks)
    module.last_trainer = trainer  # reachable after fit raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("srv"), ["--reward.class_path", "lightning_nft.rewards.LinearReward",
                                                       "--reward.init_args.direction", json.dumps(DIRECTION)])
    yield s
    s.stop()


@pytest.mark.parametrize("fail_round", [2, 0])
def test_failed_scoring_checkpoints_and_resumes_without_rescoring(server, tmp_path, fail_round):
    reference, ref_rec = make_module(server.url), RecordRounds()
    fit(reference, tmp_path / "ref", [ref_rec])
    assert sorted(ref_rec.rounds) == list(range(ROUNDS))

    start = len(server.requests_logged())
    server.set_plan(["ok"] * fail_round + ["always:500"])
    failing, fail_rec = make_module(server.url), RecordRounds()
    # round 2: a saver given explicitly; round 0: the one the module adds itself for a remote reward
    explicit = [CheckpointOnRewardFailure()] if fail_round else []
    with pytest.raises(RewardScoringError) as info:
        fit(failing, tmp_path / "run", [fail_rec, *explicit])
    savers = [c for c in failing.last_trainer.callbacks if isinstance(c, CheckpointOnRewardFailure)]
    assert len(savers) == 1
    saver = savers[0]
    assert server.url in str(info.value) and "HTTP 500" in str(info.value)
    assert sorted(fail_rec.rounds) == list(range(fail_round))
    assert saver.saved_path is not None and saver.saved_path.name == f"reward-failure-round{fail_round}.ckpt"
    assert saver.saved_path.exists()

    server.set_plan([])
    resumed, res_rec = make_module(server.url), RecordRounds()
    fit(resumed, tmp_path / "run", [res_rec], ckpt_path=str(saver.saved_path))
    assert sorted(res_rec.rounds) == list(range(fail_round, ROUNDS))  # earlier rounds were not scored again
    for e in range(fail_round, ROUNDS):
        assert torch.equal(res_rec.rounds[e], ref_rec.rounds[e]), e
    for (name, a), (_, b) in zip(reference.backbone.named_parameters(), resumed.backbone.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    # what the server saw after the reference run: the rounds before the failure ok, three failed attempts
    # (max_retries=2), then the resumed rounds ok: each round's samples scored successfully exactly once
    log = server.requests_logged()[start:]
    f = fail_round
    assert [r["action"] for r in log] == ["ok"] * f + ["500"] * 3 + ["ok"] * (ROUNDS - f)
    ok = Counter(r["digest"] for r in log if r["action"] == "ok")
    assert len(ok) == ROUNDS and set(ok.values()) == {1}
    assert log[f]["digest"] == log[f + 3]["digest"]  # the round that failed was re-collected identically
