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
