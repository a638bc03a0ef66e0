"""Learned scorers (CLIP score, PickScore, HPS v2, LAION aesthetic) on tiny random models loaded by path.

Checked against the libraries' own processors and forward passes (transformers' ``CLIPImageProcessor``
in both back-ends and ``CLIPModel.forward``; open_clip's evaluation transform and ``CLIP.forward``):

* preprocessing equals the reference processor's within 1.5/255 per pixel (before normalisation);
  the references quantise to uint8 after each resampling pass, we do not (that is the whole gap);
* scores equal an independent computation from the reference pixels within 2e-3 in cosine;
* scores are deterministic, batch-size invariant (chunks of 1, 2, 3 vs all at once) and
  differentiable (directional derivative vs central finite difference, float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_scorers import save_tiny_aesthetic_head, save_tiny_clip, save_tiny_open_clip

from lightning_nft.conditions import Conditions
from lightning_nft.rewards.aesthetic import LaionAesthetic
from lightning_nft.rewards.clip_scores import CLIPScore, PickScore
from lightning_nft.rewards.hps import HPSv2
from lightning_nft.rewards.preprocess import ImagePreprocess, to_uint8_images

PIXEL_TOL = 1.5 / 255  # in [0, 1] units
COS_TOL = 2e-3
SIZES = [(48, 56), (57, 40), (32, 32), (20, 27), (61, 61)]
PROMPTS = ["a red cat", "a dog", "a red cat", "7 apples", "two birds", "a dog"]


def images_family(seed: int, size: tuple[int, int], n: int = 3, smooth: bool = False) -> torch.Tensor:
    """uint8-exact images in [-1, 1] (so our pipeline and the reference start from the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g) * 2 - 1, size=size, mode="bilinear", align_corners=False)
    else:
        x = torch.rand(n, 3, *size, generator=g) * 2 - 1
    return to_uint8_images(x).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": str(save_tiny_clip(root / "clip", image_size=40, crop=32)),
        "open_clip": str(save_tiny_open_clip(root / "open_clip", image_size=32)),
        "head": str(save_tiny_aesthetic_head(root / "head.pth", input_dim=8)),
    }


def cond_for(n: int) -> Conditions:
    return Conditions(None, [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)])


def max_pixel_gap(ours: torch.Tensor, ref: torch.Tensor, std) -> float:
    return float(((ours - ref).abs() * torch.tensor(std)[:, None, None]).max())


# ------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("backend", ["CLIPImageProcessor", "CLIPImageProcessorPil"])
def test_preprocess_matches_transformers_processor(backend):
    import transformers

    proc = getattr(transformers, backend)(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 31})
    pre = ImagePreprocess.from_clip_processor(proc)
    for seed, size in enumerate(SIZES):
        for smooth in (False, True):
            x = images_family(seed, size, smooth=smooth)
            ref = proc(images=[a.numpy() for a in to_uint8_images(x)], return_tensors="pt")["pixel_values"]
            ours = pre(x)
            assert ours.shape == ref.shape, (size, ours.shape, ref.shape)
            assert max_pixel_gap(ours, ref, pre.std) <= PIXEL_TOL, (backend, seed, size, smooth)


def test_preprocess_matches_open_clip_transform(models):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{models['open_clip']}")
    pre = ImagePreprocess.from_open_clip(model)
    for seed, size in enumerate(SIZES):
        for smooth in (False, True):
            x = images_family(seed, size, smooth=smooth)
            ref = torch.stack([transform(Image.fromarray(a.numpy())) for a in to_uint8_images(x)])
            ours = pre(x)
            assert ours.shape == ref.shape
            assert max_pixel_gap(ours, ref, pre.std) <= PIXEL_TOL, (seed, size, smooth)


def test_crop_offset_rules_differ_where_the_references_differ():
    # 41 - 32 = 9 is odd: floor puts the crop at 4, torchvision's round at 4 (round(4.5) = 4, banker's);
    # 43 - 32 = 11: floor 5, round(5.5) = 6
    floor, rnd = ImagePreprocess(32, (32, 32), crop_offset="floor"), ImagePreprocess(32, (32, 32), crop_offset="round")
    assert floor.crop_box(43, 32) == (5, 0) and rnd.crop_box(43, 32) == (6, 0)
    assert floor.crop_box(41, 41) == rnd.crop_box(41, 41) == (4, 4)
    with pytest.raises(ValueError, match="larger than the resized image"):
        floor.crop_box(20, 40)


def test_grayscale_images_are_repeated_to_rgb():
    pre = ImagePreprocess(16, (16, 16))
    gray = images_family(3, (24, 24))[:, :1]
    assert torch.allclose(pre(gray), pre(gray.expand(-1, 3, -1, -1)))


# ------------------------------------------------------------------------------- scores vs references
def test_clip_scores_match_clip_model_forward(models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(models["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(models["clip"])
    pick, clip = PickScore(models["clip"]), CLIPScore(models["clip"], min_cosine=None)
    scale = float(model.logit_scale.detach().exp())
    for seed, size in enumerate(SIZES):
        x = images_family(10 + seed, size, n=4)
        cond = cond_for(4)
        inputs = proc(text=[m["prompt"] for m in cond.metadata], images=[a.numpy() for a in to_uint8_images(x)],
                      return_tensors="pt", padding="max_length", max_length=16)
        with torch.no_grad():
            ref_logits = model(**inputs).logits_per_image.diagonal()
            ours_pick, ours_clip = pick(x, cond), clip(x, cond)
        assert torch.allclose(ours_pick, ref_logits, atol=COS_TOL * scale), (seed, ours_pick, ref_logits)
        assert torch.allclose(ours_clip, 100 * ref_logits / scale, atol=COS_TOL * 100)


def test_clip_score_clips_negative_cosines_at_zero(models):
    clip_clipped = CLIPScore(models["clip"])
    clip_raw = CLIPScore(models["clip"], min_cosine=None)
    x, cond = images_family(5, (32, 32), n=6), cond_for(6)
    raw = clip_raw(x, cond)
    assert torch.allclose(clip_clipped(x, cond), raw.clamp_min(0.0))


def test_hps_matches_open_clip_forward(models):
    import open_clip

    folder = f"local-dir:{models['open_clip']}"
    model, _, transform = open_clip.create_model_and_transforms(folder)
    model.eval()
    tokenizer = open_clip.get_tokenizer(folder)
    hps = HPSv2(folder)
    for seed, size in enumerate(SIZES):
        x, cond = images_family(20 + seed, size, n=4), cond_for(4)
        ref_images = torch.stack([transform(Image.fromarray(a.numpy())) for a in to_uint8_images(x)])
        with torch.no_grad():
            img_f, txt_f, _ = model(ref_images, tokenizer([m["prompt"] for m in cond.metadata]))
            ref = (img_f @ txt_f.T).diagonal()
            ours = hps(x, cond)
        assert torch.allclose(ours, ref, atol=COS_TOL), (seed, ours, ref)


def test_hps_loads_a_checkpoint_over_the_architecture(models, tmp_path):
    import open_clip

    folder = f"local-dir:{models['open_clip']}"
    other = open_clip.create_model(folder)
    torch.manual_seed(123)
    for p in other.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "hps.pt")
    x, cond = images_family(1, (32, 32), n=3), cond_for(3)
    plain, tuned = HPSv2(folder), HPSv2(folder, checkpoint=str(tmp_path / "hps.pt"))
    assert all(torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), other.state_dict().values()))
    assert not torch.allclose(plain(x, cond), tuned(x, cond))
    with pytest.raises(ValueError, match="needs checkpoint"):
        HPSv2("ViT-H-14")


def test_aesthetic_matches_head_on_reference_embeddings(models):
    from transformers import CLIPModel, CLIPProcessor

    from lightning_nft.rewards.aesthetic import AestheticHead

    model = CLIPModel.from_pretrained(models["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(models["clip"])
    head = AestheticHead(8).eval()
    head.load_state_dict(torch.load(models["head"], weights_only=True))
    aesthetic = LaionAesthetic(models["clip"], models["head"])
    for seed, size in enumerate(SIZES):
        x = images_family(30 + seed, size, n=4)
        pixels = proc.image_processor(images=[a.numpy() for a in to_uint8_images(x)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            emb = model.get_image_features(pixel_values=pixels)
            emb = getattr(emb, "pooler_output", emb)
            ref = head(emb / emb.norm(dim=-1, keepdim=True))
            ours = aesthetic(x)
        # the head has Lipschitz constant <= prod ||W||; compare with a tolerance scaled to its output spread
        assert torch.allclose(ours, ref, atol=5e-3), (seed, ours, ref)


def test_wrong_head_file_is_a_clear_error(models, tmp_path):
    from lightning_nft.rewards.aesthetic import AestheticHead

    torch.save(AestheticHead(16).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit AestheticHead"):
        LaionAesthetic(models["clip"], str(tmp_path / "wrong.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LaionAesthetic(models["clip"], str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def scorers(models):
    return {
        "pick": PickScore(models["clip"]),
        "clip": CLIPScore(models["clip"], min_cosine=None),
        "hps": HPSv2(f"local-dir:{models['open_clip']}"),
        "aesthetic": LaionAesthetic(models["clip"], models["head"]),
    }


def test_scores_are_deterministic_and_batch_size_invariant(scorers):
    for name, scorer in scorers.items():
        for seed, size in enumerate(SIZES[:3]):
            x, cond = images_family(40 + seed, size, n=6), cond_for(6)
            with torch.no_grad():
                whole = scorer(x, cond)
                again = scorer(x, cond)
                for chunk in (1, 2, 3):
                    parts = torch.cat([scorer(x[i: i + chunk], cond.index(torch.arange(i, min(i + chunk, 6))))
                                       for i in range(0, 6, chunk)])
                    assert torch.allclose(parts, whole, atol=1e-5, rtol=1e-5), (name, chunk)
            assert torch.equal(whole, again), name
            assert whole.shape == (6,) and torch.isfinite(whole).all()


def test_scorers_stay_frozen_and_in_eval_mode(scorers):
    for name, scorer in scorers.items():
        holder = torch.nn.ModuleDict({"reward": scorer}).train()
        assert not scorer.training and not any(m.training for m in scorer.modules()), name
        assert not any(p.requires_grad for p in scorer.parameters()), name
        del holder


def test_scorers_are_differentiable(scorers):
    """Directional derivative <grad r, v> vs central difference (r(x + h v) - r(x - h v)) / 2h in float64."""
    for name, scorer in scorers.items():
        scorer = copy.deepcopy(scorer).double()
        g = torch.Generator().manual_seed(7)
        x = (torch.rand(2, 3, 36, 44, generator=g, dtype=torch.float64) * 1.6 - 0.8)  # away from the clamp
        cond = cond_for(2)
        grad = scorer.gradient(x, cond)
        assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        h = 1e-5
        with torch.no_grad():
            fd = (scorer(x + h * v, cond) - scorer(x - h * v, cond)) / (2 * h)
        analytic = (grad * v).flatten(1).sum(1)
        assert torch.allclose(analytic, fd, rtol=1e-4, atol=1e-7), (name, analytic, fd)


def test_scorers_follow_the_module_dtype(scorers):
    x, cond = images_family(50, (32, 32), n=3), cond_for(3)
    for name, scorer in scorers.items():
        with torch.no_grad():
            r32 = scorer(x, cond)
            scorer64 = copy.deepcopy(scorer).double()
            r64 = scorer64(x.double(), cond)
        assert next(scorer64.parameters()).dtype == torch.float64 and r64.dtype == torch.float64
        assert torch.allclose(r32.double(), r64, atol=1e-4), name


def test_missing_prompt_metadata_names_the_field(models):
    pick = PickScore(models["clip"])
    x = images_family(0, (32, 32), n=2)
    with pytest.raises(KeyError, match="'prompt'.*PickScore|PickScore.*'prompt'"):
        pick(x, Conditions(None, [{"digit": 1}, {"digit": 2}]))
    with pytest.raises(ValueError, match="needs prompts"):
        pick(x, None)
    fixed = PickScore(models["clip"], prompt="a red cat")
    assert torch.allclose(fixed(x), pick(x, Conditions(None, [{"prompt": "a red cat"}] * 2)))


def test_text_features_are_computed_once_per_distinct_prompt(models):
    calls = []
    pick = PickScore(models["clip"])
    original = pick.text_embeddings
    pick.text_embeddings = lambda prompts: (calls.append(list(prompts)), original(prompts))[1]
    pick(images_family(0, (32, 32), n=6), cond_for(6))
    assert calls == [["a red cat", "a dog", "7 apples", "two birds"]]


def test_hps_without_open_clip_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the optional extra were not installed
    with pytest.raises(ImportError, match=r"lightning-nft\[hps\]"):
        HPSv2("local-dir:/nowhere")
