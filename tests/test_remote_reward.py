"""Remote scoring against real reference-server processes on 127.0.0.1, with injected faults.

Each fault (dropped connection, HTTP 500, late answer, wrong number of scores, NaN / Infinity) ends in
a retry that returns exactly the in-process reward, or, when it persists, in a ``RewardScoringError``
naming the endpoint after exactly ``max_retries + 1`` requests. Malformed payloads get a 4xx with a
message and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from server_process import free_port, start_server

from lightning_nft.conditions import Conditions
from lightning_nft.rewards.base import LinearReward
from lightning_nft.rewards.remote import RemoteReward, RewardScoringError
from lightning_nft.rewards.wire import array_to_field

DIRECTION = [1.0, -2.0, 0.5, 0.25]
LINEAR = ["--reward.class_path", "lightning_nft.rewards.LinearReward", "--reward.init_args.direction", json.dumps(DIRECTION)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("linear"), LINEAR, extra=["--max_request_mb", "1"])
    yield s
    s.stop()


def client(url, **kw) -> RemoteReward:
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return RemoteReward(url, seed=0, **kw)


def samples(seed: int, n: int = 9) -> torch.Tensor:
    return torch.randn(n, len(DIRECTION), generator=torch.Generator().manual_seed(seed))


def test_scores_equal_the_in_process_reward(server):
    local = LinearReward(DIRECTION)
    for seed, batch_size in enumerate([None, 1, 4, 9, 20]):
        x = samples(seed)
        before = len(server.requests_logged())
        remote = client(server.url, batch_size=batch_size)
        assert torch.equal(remote(x), local(x)), batch_size
        expected_requests = 1 if batch_size is None else -(-9 // batch_size)
        assert len(server.requests_logged()) - before == expected_requests


@pytest.mark.parametrize("fault", ["drop", "500", "late:1.5", "short", "nan", "inf"])
def test_a_transient_fault_is_retried_and_the_reward_is_exact(server, fault):
    x = samples(hash(fault) % 1000)
    server.set_plan([fault])
    before = len(server.requests_logged())
    remote = client(server.url, timeout=0.75)
    assert torch.equal(remote(x), LinearReward(DIRECTION)(x))
    log = server.requests_logged()[before:]
    assert [r["action"] for r in log] == [fault, "ok"]
    assert log[0]["digest"] == log[1]["digest"]  # the same samples were sent again


@pytest.mark.parametrize("fault", ["drop", "500", "late:1.0", "short", "nan", "inf"])
def test_a_persistent_fault_is_a_clear_error_naming_the_endpoint(server, fault):
    server.set_plan([f"always:{fault}"])
    before = len(server.requests_logged())
    remote = client(server.url, max_retries=2, timeout=0.5)
    with pytest.raises(RewardScoringError) as info:
        remote(samples(1))
    server.set_plan([])
    assert server.url in str(info.value) and info.value.endpoints == [server.url]
    assert "after 3 attempts" in str(info.value)
    assert len(server.requests_logged()) - before == 3
    expected = {"drop": "connection", "500": "HTTP 500", "late:1.0": "no answer within", "short": "8 scores for 9",
                "nan": "not finite", "inf": "not finite"}[fault]
    assert expected in str(info.value), str(info.value)


def test_round_robin_skips_a_dead_endpoint(server):
    dead = f"http://127.0.0.1:{free_port()}"
    remote = RemoteReward([dead, server.url], max_retries=2, backoff=0.0, timeout=2.0, dead_for=60.0, seed=0)
    before = len(server.requests_logged())
    local = LinearReward(DIRECTION)
    for seed in range(5):
        x = samples(seed, n=3)
        assert torch.equal(remote(x), local(x))
    # the dead endpoint was tried once (first request), then skipped: every request reached the live one
    assert len(server.requests_logged()) - before == 5
    assert remote.requests_sent == 6


def test_round_robin_alternates_between_live_endpoints(server, tmp_path):
    """The second server is the plain ``lightning-nft serve-reward --config <yaml>`` (no fault injection)."""
    config = tmp_path / "server.yaml"
    config.write_text(f"reward:\n  class_path: lightning_nft.rewards.LinearReward\n"
                      f"  init_args:\n    direction: {json.dumps(DIRECTION)}\n")
    other = start_server(tmp_path / "other", ["--config", str(config)], faults=False)
    try:
        remote = RemoteReward([server.url, other.url], max_retries=0, seed=0, batch_size=2)
        before = len(server.requests_logged())
        x = samples(3, n=8)
        assert torch.equal(remote(x), LinearReward(DIRECTION)(x))
        assert len(server.requests_logged()) - before == 2
        assert requests.get(f"{other.url}/health", timeout=10).json()["requests_scored"] == 2
    finally:
        other.stop()


def test_all_endpoints_dead_is_an_error_naming_them():
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    remote = RemoteReward(dead, max_retries=3, backoff=0.0, timeout=1.0, seed=0)
    with pytest.raises(RewardScoringError) as info:
        remote(samples(0))
    assert all(url in str(info.value) for url in dead) and sorted(info.value.endpoints) == sorted(dead)


def test_backoff_is_exponential_capped_and_jittered():
    for seed in range(5):
        r = RemoteReward("http://127.0.0.1:1", backoff=0.1, max_backoff=1.0, jitter=0.5, seed=seed)
        for k in range(8):
            base = min(1.0, 0.1 * 2**k)
            pauses = [r.pause(k) for _ in range(50)]
            assert all(0.5 * base <= p <= 1.5 * base for p in pauses), (seed, k)
            assert len(set(pauses)) > 40  # jitter: not lock-step
    flat = RemoteReward("http://127.0.0.1:1", backoff=0.2, jitter=0.0)
    assert [flat.pause(k) for k in range(3)] == [0.2, 0.4, 0.8]


# ------------------------------------------------------------------------------- malformed payloads
def npy_b64(array: np.ndarray, allow_pickle: bool = False) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return base64.b64encode(buf.getvalue()).decode()


MALFORMED = {
    "not json": (b"{not json", 400, "not JSON"),
    "json list": (b"[1, 2]", 400, "JSON object"),
    "no samples": (json.dumps({"metadata": []}).encode(), 400, "missing field 'samples'"),
    "bad base64": (json.dumps({"samples": {"npy": "%%%"}}).encode(), 400, "invalid base64"),
    "pickled object array": (json.dumps({"samples": {"npy": npy_b64(np.array([{"a": 1}], dtype=object), True)}}).encode(),
                             400, "not a numeric .npy"),
    "string dtype": (json.dumps({"samples": {"npy": npy_b64(np.array(["ab", "cd"]))}}).encode(), 400, "not numeric"),
    "garbage npy": (json.dumps({"samples": {"npy": base64.b64encode(b"\x93NUMPY garbage").decode()}}).encode(), 400, ".npy"),
    "metadata count": (json.dumps({"samples": array_to_field(np.zeros((3, 4), np.float32)), "metadata": [{}]}).encode(),
                       400, "1 entries for 3 samples"),
    "nan samples": (json.dumps({"samples": array_to_field(np.full((2, 4), np.nan, np.float32))}).encode(), 400, "non-finite"),
    "wrong version": (json.dumps({"version": 99, "samples": array_to_field(np.zeros((1, 4), np.float32))}).encode(),
                      400, "wire version"),
    "too large": (b"{" + b" " * (2 * 2**20) + b"}", 413, "exceeds max_request_bytes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_payloads_get_a_4xx_and_the_server_survives(server, case):
    body, status, message = MALFORMED[case]
    response = requests.post(f"{server.url}/score", data=body, timeout=10, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    health = requests.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["reward"] == "LinearReward"


def test_unknown_route_and_a_4xx_is_not_retried(server):
    assert requests.post(f"{server.url}/nope", data=b"{}", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/nope", timeout=10).status_code == 404
    before = len(server.requests_logged())
    remote = client(server.url, max_retries=3)
    with pytest.raises(RewardScoringError, match="refused the request") as info:
        remote(torch.full((2, 4), float("nan")))  # the server refuses non-finite samples: a 400
    assert not info.value.retryable and len(server.requests_logged()) - before == 1


def test_the_reward_error_of_a_served_scorer_is_a_422_with_its_message(tmp_path):
    """A served reward that needs prompts rejects a batch without them: 422 naming the field; server survives."""
    from tiny_scorers import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip")
    s = start_server(tmp_path / "srv", ["--reward.class_path", "lightning_nft.rewards.clip_scores.PickScore",
                                        "--reward.init_args.model", str(folder)])
    try:
        x = torch.rand(3, 3, 32, 32) * 2 - 1
        cond = Conditions(None, [{"prompt": p} for p in ["a cat", "a dog", "a cat"]])
        from lightning_nft.rewards.clip_scores import PickScore

        remote = RemoteReward(s.url, max_retries=0, seed=0)
        assert torch.allclose(remote(x, cond), PickScore(str(folder))(x, cond), atol=1e-5)
        uint8 = RemoteReward(s.url, max_retries=0, seed=0, encoding="uint8")
        assert torch.allclose(uint8(x, cond), PickScore(str(folder))(x, cond), atol=0.05)  # quantised pixels
        with pytest.raises(RewardScoringError, match="422.*PickScore.*prompt"):
            remote(x, Conditions(None, [{"digit": 1}] * 3))
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        s.stop()


def test_the_shipped_server_config_builds_its_reward():
    from pathlib import Path

    from lightning_nft.reward_server import build_parser, instantiate
    from lightning_nft.rewards import DigitClassifierReward

    parser = build_parser()
    config = Path(__file__).resolve().parents[1] / "configs" / "reward_server_digits.yaml"
    cfg = parser.parse_args(["--config", str(config), "--port", "0"])
    reward = instantiate(parser, cfg).reward
    assert isinstance(reward, DigitClassifierReward) and reward.target == 3 and cfg.port == 0
