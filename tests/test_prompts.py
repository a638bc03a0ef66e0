"""Prompt files, per-rank/per-round prompt sampling, the embedding cache and the conditions callable."""

import json

import pytest
import torch

from lightning_nft.conditions import Conditions
from lightning_nft.data.prompts import PromptConditions, PromptEmbeddingCache, read_prompts, sample_prompt_indices

WORDS = ["red", "cube", "a", "two", "photo", "of", "dog", "blue", "seven", "cats"]


def _random_prompts(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(1, 6, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]


class CharEncoder:
    """An independent prompt encoder (a fixed function of the characters) that counts its calls."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def __call__(self, prompts):
        self.calls += 1
        self.seen.extend(prompts)
        codes = torch.zeros(len(prompts), 4, 3)
        for i, p in enumerate(prompts):
            for j, ch in enumerate(p[:12]):
                codes[i, j % 4, j % 3] += ord(ch) / 100.0
        return {"encoder_hidden_states": codes, "pooled_projections": codes.sum(1), "ids": codes[:, 0, 0].long()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_read_txt_and_jsonl_keep_prompts_metadata_and_ids(tmp_path, seed):
    prompts = _random_prompts(seed, 7)
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(p if i % 3 else p + "\n   " for i, p in enumerate(prompts)) + "\n\n")
    records = read_prompts(txt)
    assert [r["prompt"] for r in records] == prompts
    assert [r["prompt_id"] for r in records] == list(range(7))
    jl = tmp_path / "p.jsonl"
    rows = [{"prompt": p, "count": i, "tags": {"colour": WORDS[i]}} for i, p in enumerate(prompts)]
    rows[2]["prompt_id"] = 99  # a file may set its own ids
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_prompts(jl, required_fields=("count",))
    assert [r["count"] for r in records] == list(range(7))
    assert records[3]["tags"] == {"colour": WORDS[3]}
    assert [r["prompt_id"] for r in records] == [0, 1, 99, 3, 4, 5, 6]


def test_malformed_prompt_files_name_file_line_and_field(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt.*holds no prompts"):
        read_prompts(empty)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a 3", "digit": 3}\n{"prompt": "a 4", "digit": 4\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a 3", "digit": 3}\n\n{"text": "a 4"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: field 'prompt' must be a non-empty string"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a 3", "digit": 3}\n["a 4"]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a 3", "digit": 3}\n{"prompt": "a 4"}\n')
    with pytest.raises(KeyError, match=r"bad.jsonl, line 2: missing metadata field 'digit'"):
        read_prompts(bad, required_fields=("digit",))


@pytest.mark.parametrize("n_prompts,n", [(5, 3), (5, 5), (7, 20), (50, 8), (3, 31)])
def test_round_sampling_is_balanced_and_deterministic_per_rank_and_round(n_prompts, n):
    from lightning_nft.policy import round_generator

    draws = {}
    for rank in range(2):
        for rnd in range(3):
            idx = sample_prompt_indices(n_prompts, n, round_generator(0, rank, rnd))
            again = sample_prompt_indices(n_prompts, n, round_generator(0, rank, rnd))
            assert torch.equal(idx, again)
            counts = torch.bincount(idx, minlength=n_prompts)
            assert idx.numel() == n and counts.min() >= n // n_prompts and counts.max() <= -(-n // n_prompts)
            draws[rank, rnd] = idx.tolist()
    if n_prompts >= 7:  # enough permutations that equal draws would be a seeding bug
        assert len({tuple(v) for v in draws.values()}) == len(draws)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_encodes_each_distinct_prompt_once_and_matches_direct_encoding(seed):
    prompts = _random_prompts(seed, 9)
    enc = CharEncoder()
    cache = PromptEmbeddingCache(enc, batch_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        batch = [prompts[i] for i in torch.randint(len(prompts), (6,), generator=g).tolist()]
        out = cache(batch)
        direct = CharEncoder()(batch)
        for key in direct:
            expected = direct[key].double() if direct[key].is_floating_point() else direct[key]
            torch.testing.assert_close(out[key], expected, rtol=0, atol=0)
            assert out[key].device.type == "cpu"
        assert out["ids"].dtype == torch.long  # integer rows are not cast
    assert sorted(enc.seen) == sorted(set(enc.seen))  # never encoded twice
    assert cache.n_encoded == len(set(enc.seen)) == len(cache)


def test_cache_rejects_encoders_with_wrong_rows():
    with pytest.raises(ValueError, match="returned 1 rows of 'x' for 2 prompts"):
        PromptEmbeddingCache(lambda ps: {"x": torch.zeros(1, 3)})(["a", "b"])
    with pytest.raises(TypeError, match="must return a dict of tensors"):
        PromptEmbeddingCache(lambda ps: torch.zeros(len(ps), 3))(["a", "b"])


def test_prompt_conditions_draw_train_prompts_with_metadata_and_heldout_split(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"a {d}", "digit": d}) + "\n" for d in range(6)))
    held.write_text("".join(json.dumps({"prompt": f"the digit {d}", "digit": d}) + "\n" for d in range(3)))
    enc = CharEncoder()
    source = PromptConditions(enc, str(train), str(held), required_fields=("digit",))
    for seed in range(3):
        cond = source(4, torch.Generator().manual_seed(seed))
        assert isinstance(cond, Conditions) and len(cond) == 4
        assert all(m["split"] == "train" and m["prompt"] == f"a {m['digit']}" for m in cond.metadata)
        direct = CharEncoder()([m["prompt"] for m in cond.metadata])
        torch.testing.assert_close(cond.tensors["pooled_projections"], direct["pooled_projections"])
        again = source(4, torch.Generator().manual_seed(seed))
        assert again.metadata == cond.metadata
    assert [r["prompt"] for r in source.split("heldout")] == ["the digit 0", "the digit 1", "the digit 2"]
    assert not any(p.startswith("the digit") for p in enc.seen)  # held-out prompts never drawn
    neg = source.negative(3)
    assert neg.metadata == [{"prompt": ""}] * 3 and neg.tensors["encoder_hidden_states"].abs().sum() == 0
    with pytest.raises(KeyError, match="no 'val' prompts"):
        source.split("val")
