"""The online fine-tuning contract: one error naming every missing member, the mixin on a user's own module
(tutorial 2), old policy and reference taken at fit start, tolerant hyper-parameters, no import-time state."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy, ImageGrid, KLAnchor, OnlineRollout, RewardMetrics, SampleQuality
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import NFTObjective
from lightning_nft.policy import (
    CONTRACT_MEMBERS,
    ContractError,
    OnlineFineTuning,
    OnlineFineTuningMixin,
    check_contract,
)
from lightning_nft.rewards import LinearReward

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "tutorials" / "02_callbacks_in_your_trainer.py"


def _tutorial():
    spec = importlib.util.spec_from_file_location("tutorial_02", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class _PlainModule(pl.LightningModule):
    """A module with a velocity and a sample shape, nothing else of the contract."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 2)
        self.sample_shape = (2,)

    def velocity(self, x, t, cond=None):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("callback, expected", [
    (OnlineRollout(), {"collect_rollouts", "rollouts_per_round", "steps_per_round", "update_old_policy"}),
    (EMAOldPolicy(), {"update_old_policy"}),
    (KLAnchor(), {"kl_weight", "rollouts", "reference_velocity"}),
    (RewardMetrics(), {"rollouts", "rollout_version"}),
    (ImageGrid(), {"sample_conditions", "sample"}),
])
def test_a_module_missing_members_gets_one_error_naming_all_of_them(callback, expected):
    """Each callback refuses the plain module in ``setup`` (through a real ``Trainer.fit``) with one
    ContractError whose message lists exactly the members it needs and lacks, and points at the mixin."""
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ContractError) as info:
            trainer.fit(_PlainModule())
    message = str(info.value)
    listed = set(message.split("missing: ")[1].split(". Add")[0].split(", "))
    assert listed == expected, message
    assert "OnlineFineTuningMixin" in message and type(callback).__name__ in message


def test_check_contract_lists_every_member_of_the_protocol():
    """An empty object lacks the whole contract; the names are exactly the protocol's members."""
    with pytest.raises(ContractError) as info:
        check_contract(object(), "a test")
    listed = str(info.value).split("missing: ")[1].split(". Add")[0].split(", ")
    assert listed == list(CONTRACT_MEMBERS)
    protocol_members = {n for n in vars(OnlineFineTuning) if not n.startswith("_")} | set(
        OnlineFineTuning.__annotations__) | {"velocity", "old_velocity", "reference_velocity", "sample"}
    assert set(CONTRACT_MEMBERS) == protocol_members
    for cb in (OnlineRollout(), EMAOldPolicy(), KLAnchor(), RewardMetrics(), ImageGrid(),
               SampleQuality(torch.nn.Flatten())):
        assert set(cb.contract_members) <= set(CONTRACT_MEMBERS), type(cb).__name__


def test_tutorial_module_runs_with_the_five_callbacks_and_at_most_ten_lines_of_glue(tmp_path):
    """Tutorial 2: a user's UNet2DModel flow-matching module plus the mixin, fitted 2 rounds with OnlineRollout,
    EMAOldPolicy, KLAnchor, RewardMetrics and ImageGrid. The glue between the markers has <= 10 code lines;
    the module satisfies the contract; every round logs reward statistics; the picture is written; the UNet
    moved while the reference stayed at the weights the network had when fit started."""
    lines = TUTORIAL.read_text().splitlines()
    begin, end = lines.index("# --- glue: begin"), lines.index("# --- glue: end")
    glue = [ln for ln in lines[begin + 1:end] if ln.strip() and not ln.strip().startswith("#")]
    assert 0 < len(glue) <= 10, glue
    tutorial = _tutorial()
    pretrained = tutorial.tiny_unet().state_dict()  # "pretrained" weights, loaded after the module is built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tutorial.main(str(tmp_path), rounds=2, pretrained=pretrained)
    module = result["module"]
    assert isinstance(module, OnlineFineTuning) and isinstance(module, tutorial.FlowMatchingUNet)
    assert [len(row) > 0 and abs(row["reward/mean"]) < 1 for row in result["metrics"].history] == [True, True]
    assert (tmp_path / "02_before_after.png").exists()
    assert module.rollout_version == 2 and len(module.rollouts) == 16
    start = _flat(pretrained.values())
    torch.testing.assert_close(_flat(module.reference_backbone.state_dict().values()), start, rtol=0, atol=0)
    assert not torch.equal(_flat(module.unet.state_dict().values()), start)
    assert module.kl_weight == 0.1


class _PoliciesAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.current = _flat(pl_module.backbone.parameters()).clone()
        self.old = _flat(pl_module.old_backbone.parameters()).clone()
        self.reference = _flat(pl_module.reference_backbone.parameters()).clone()


def test_old_policy_and_reference_come_from_the_weights_at_fit_start():
    """Build the module, *then* load other weights into the backbone: when training starts the old policy and
    the reference equal the loaded weights (not the construction-time copies)."""
    torch.manual_seed(0)
    mixture = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.4)
    module = RewardFineTuningModule(ResidualVelocity(mixture, MLPVelocity(2, 16, 2)), LinearReward([1.0, 0.0]),
                                    NFTObjective(), groups_per_round=2, group_size=8, optimizer=adamw(1e-3))
    loaded = ResidualVelocity(mixture, MLPVelocity(2, 16, 2)).state_dict()
    module.backbone.load_state_dict(loaded)
    assert not torch.equal(_flat(module.old_backbone.parameters()), _flat(module.backbone.parameters()))
    probe = _PoliciesAtTrainStart()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    assert torch.equal(probe.old, probe.current) and torch.equal(probe.reference, probe.current)
    expected = torch.cat([loaded[n].reshape(-1) for n, _ in module.backbone.named_parameters()])
    assert torch.equal(probe.current, expected)


def test_save_hyperparameters_tolerates_any_subclass_argument():
    """A subclass taking a non-leaf tensor and a module: construction works (no deepcopy of them) and the
    hyper-parameters keep exactly the plain values."""

    class WithTensors(RewardFineTuningModule):
        def __init__(self, direction: torch.Tensor, extra: torch.nn.Module, scale: float = 2.0, **kw):
            super().__init__(MLPVelocity(2, 8, 1), LinearReward(direction.detach()), NFTObjective(), **kw)

    direction = torch.ones(2, requires_grad=True) * 2  # not a leaf: deepcopy would fail
    module = WithTensors(direction, torch.nn.Linear(1, 1), group_size=4)
    assert module.hparams["scale"] == 2.0 and module.hparams["group_size"] == 4
    assert "direction" not in module.hparams and "extra" not in module.hparams and "backbone" not in module.hparams


def test_importing_the_library_leaves_global_warning_filters_alone():
    """Our modules add no warning filter (the third-party libraries they import are imported first: some of
    those do add filters)."""
    code = ("import warnings, lightning.pytorch, lightning.pytorch.cli, torchmetrics, torchvision; "
            "before = list(warnings.filters); import lightning_nft.module, lightning_nft.callbacks, "
            "lightning_nft.cli; print(before == list(warnings.filters))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_mixin_refuses_too_few_steps_for_the_rollouts_per_round():
    with pytest.raises(ValueError, match="rollouts_per_round"):
        RewardFineTuningModule(MLPVelocity(2, 8, 1), LinearReward([1.0, 0.0]), NFTObjective(substeps=4),
                               steps_per_round=3)
    assert issubclass(RewardFineTuningModule, OnlineFineTuningMixin)
