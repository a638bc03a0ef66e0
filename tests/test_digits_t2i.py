"""The shipped text-to-image digits model: tokenizer, prompt encoder, pretraining data, alignment reward."""

import pytest
import torch

from lightning_nft.conditions import Conditions, repeat_condition
from lightning_nft.data.prompts import PromptEmbeddingCache, read_prompts
from lightning_nft.models.digits_t2i import (
    EOS_ID,
    MAX_LENGTH,
    PAD_ID,
    UNK_ID,
    DigitsPromptEncoder,
    DigitsT2IPretrainModel,
    DigitsT2IVelocity,
    digit_prompt_file,
    load_pretrained_digits_t2i,
)
from lightning_nft.rewards import DigitPromptAlignment

TRAIN = read_prompts(digit_prompt_file("train"), required_fields=("digit",))
HELDOUT = read_prompts(digit_prompt_file("heldout"), required_fields=("digit",))


def test_prompt_files_name_every_digit_and_heldout_phrasings_are_new():
    for records in (TRAIN, HELDOUT):
        assert sorted({r["digit"] for r in records}) == list(range(10))
    assert not {r["prompt"] for r in TRAIN} & {r["prompt"] for r in HELDOUT}


def test_tokenizer_knows_every_prompt_word_and_pads_after_eos():
    enc = DigitsPromptEncoder()
    ids = enc.token_ids([r["prompt"] for r in TRAIN + HELDOUT])
    assert ids.shape == (80, MAX_LENGTH) and not (ids == UNK_ID).any()
    n_words = torch.tensor([len(r["prompt"].split()) for r in TRAIN + HELDOUT])
    eos_at = (ids == EOS_ID).int().argmax(1)
    assert torch.equal(eos_at, n_words + 1)  # [BOS] words [EOS]
    after = torch.arange(MAX_LENGTH)[None] > eos_at[:, None]
    assert (ids[after] == PAD_ID).all()
    with pytest.warns(UserWarning, match=r"\['banana'\]"):
        assert enc.token_ids(["a banana"])[0, 2] == UNK_ID


def test_encoder_rows_are_cached_once_and_match_direct_encoding():
    enc = DigitsPromptEncoder()
    cache = PromptEmbeddingCache(enc)
    prompts = [r["prompt"] for r in TRAIN[:7]] * 3
    out = cache(prompts)
    assert cache.n_encoded == 7
    with torch.no_grad():
        direct = enc(prompts)
    assert out["encoder_hidden_states"].shape == (21, MAX_LENGTH, 32) and out["pooled_projections"].shape == (21, 32)
    for k in direct:
        torch.testing.assert_close(out[k], direct[k], rtol=1e-5, atol=1e-6)


def test_pretraining_batches_pair_each_image_with_a_phrasing_of_its_digit():
    from lightning_nft.data.digit_prompts import DigitPromptsDataModule
    from lightning_nft.models import load_pretrained_digit_classifier

    digit_of = {r["prompt"]: r["digit"] for r in TRAIN}
    dm = DigitPromptsDataModule(batch_size=256, cfg_dropout=0.25, seed=3)
    classifier = load_pretrained_digit_classifier()
    dropped = total = 0
    for images, prompts in dm.train_dataloader():
        kept = [i for i, p in enumerate(prompts) if p]
        with torch.no_grad():
            pred = classifier(images[kept]).argmax(1)
        named = torch.tensor([digit_of[prompts[i]] for i in kept])
        assert (pred == named).float().mean() > 0.95  # the classifier agrees with the named digit
        dropped += len(prompts) - len(kept)
        total += len(prompts)
    assert abs(dropped / total - 0.25) < 0.04  # 1617 draws: 4 standard deviations
    images, prompts = next(iter(dm.val_dataloader()))
    assert all(prompts)  # validation never drops the prompt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_reward_reads_the_digit_from_metadata(seed):
    from lightning_nft.data.digits import load_digit_images

    reward = DigitPromptAlignment()
    images, labels = load_digit_images(split="val")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(labels.numel(), generator=g)[:40]
    images, labels = images[idx], labels[idx]
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=g)) % 10
    meta = lambda ds: Conditions(torch.zeros(40, 1), [{"prompt": f"a {d}", "digit": int(d)} for d in ds])
    right_r, wrong_r = reward(images, meta(labels)), reward(images, meta(wrong))
    with torch.no_grad():  # independent computation: softmax of the classifier's logits at the named digit
        probs = torch.softmax(reward.classifier(images), dim=1)
    torch.testing.assert_close(right_r, probs[torch.arange(40), labels], rtol=1e-5, atol=1e-6)
    assert right_r.mean() > 0.9 and wrong_r.mean() < 0.1


def test_alignment_reward_errors_name_the_field_and_row():
    reward = DigitPromptAlignment()
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(KeyError, match="DigitPromptAlignment needs the metadata field 'digit'"):
        reward(x, Conditions(torch.zeros(2), [{"prompt": "a 3", "digit": 3}, {"prompt": "a 4"}]))
    with pytest.raises(ValueError, match="row 1 must be a digit 0-9, got 12"):
        reward(x, Conditions(torch.zeros(2), [{"digit": 3}, {"prompt": "x", "digit": 12}]))
    with pytest.raises(ValueError, match="3 metadata rows for 2 samples"):
        reward(x, Conditions(torch.zeros(3), [{"digit": 1}] * 3))
    with pytest.raises(TypeError, match="reads the metadata field 'digit' of a Conditions"):
        reward(x, torch.tensor([3, 4]))


def _evaluate(records, scale, k=4, n_steps=10):
    from lightning_nft.conditions import network_input
    from lightning_nft.data.prompts import PromptConditions
    from lightning_nft.evaluation import evaluate_prompts

    velocity, encoder = load_pretrained_digits_t2i()
    source = PromptConditions(encoder, digit_prompt_file("train"), digit_prompt_file("heldout"))
    return evaluate_prompts(lambda x, t, c: velocity(x, t, network_input(c)), source, records, DigitPromptAlignment(),
                            (1, 8, 8), images_per_prompt=k, guidance_scale=scale, n_steps=n_steps)


def test_shipped_model_follows_trained_and_heldout_phrasings_and_guidance_helps():
    # measured when the assets were made (K=4, 10 Euler steps): w=1 0.709 / 0.704, w=3 0.956 / 0.962
    for records in (TRAIN, HELDOUT):
        plain, guided = _evaluate(records, 1.0), _evaluate(records, 3.0)
        assert guided.mean > 0.9 and guided.mean - plain.mean > 0.15, (plain.mean, guided.mean)
        assert guided.images.shape == (4 * len(records), 1, 8, 8)


def test_evaluation_noise_is_per_prompt_so_batching_does_not_change_results():
    records = HELDOUT[3:9]
    whole = _evaluate(records, 2.0, k=2, n_steps=4)
    parts = [_evaluate(records[:2], 2.0, k=2, n_steps=4), _evaluate(records[2:], 2.0, k=2, n_steps=4)]
    torch.testing.assert_close(torch.cat([p.per_prompt for p in parts]), whole.per_prompt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.images for p in parts]), whole.images, rtol=1e-4, atol=1e-5)


def test_pretraining_exports_a_folder_that_loads_back_to_the_same_model(tmp_path):
    import lightning.pytorch as pl

    from lightning_nft.data.digit_prompts import DigitPromptsDataModule
    from lightning_nft.models import ExportSafetensors
    from lightning_nft.pretrain import FlowMatchingModule

    torch.manual_seed(0)
    backbone = DigitsT2IPretrainModel(DigitsT2IVelocity(transformer_config={"num_layers": 1}),
                                      DigitsPromptEncoder(text_config={"num_hidden_layers": 1}))
    module = FlowMatchingModule(backbone, sample_shape=[1, 8, 8], lr=1e-3)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExportSafetensors(str(tmp_path / "t2i"), attribute="backbone")])
    trainer.fit(module, datamodule=DigitPromptsDataModule(batch_size=16))
    velocity, encoder = load_pretrained_digits_t2i(str(tmp_path / "t2i"))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.rand(5, generator=g)
    prompts = [r["prompt"] for r in HELDOUT[:5]]
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(velocity(x, t, encoder(prompts)), backbone(x, t, prompts), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "t2i" / "transformer" / "config.json").stat().st_mode & 0o044  # world-readable
