"""``RemoteReward``: score samples on HTTP scoring servers, surviving their faults.

Heavy scorers (detectors, OCR, VLM judges) run as separate servers with their own environment or
GPUs (``lightning-nft serve-reward``, :mod:`lightning_nft.reward_server`). This reward sends the
decoded samples and their prompt metadata (:mod:`lightning_nft.rewards.wire`: JSON + ``.npy``, no
pickle) and reads one float per sample back.

Faults: every request has a ``timeout``; a failed attempt (connection refused or dropped, timeout,
``5xx``, a response with the wrong number of scores or a non-finite score) is retried up to
``max_retries`` times after a pause ``min(max_backoff, backoff * 2**k) * U(1 - jitter, 1 + jitter)``
(exponential backoff with jitter, so many clients do not retry in lock-step). With several endpoints,
requests go round-robin and an endpoint that failed is skipped for ``dead_for`` seconds. A ``4xx``
(a malformed request) is not retried. When the attempts are spent, :class:`RewardScoringError` names
every endpoint tried and the last error: never a silently wrong reward. The rollout collection may
catch it to save a checkpoint before the run stops (``callbacks/reward_failure.py``).

Requests run through a ``requests.Session`` per thread (connection reuse; sessions are not shared
between threads), so the reward can be called from the scoring thread pool of
:mod:`lightning_nft.rewards.async_scoring`.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_nft.conditions import metadata_of
from lightning_nft.rewards.base import Reward
from lightning_nft.rewards.wire import PayloadError, decode_response, encode_request


class RewardScoringError(RuntimeError):
    """Scoring failed for good: the endpoints tried and the last error are attributes and in the message."""

    def __init__(self, message: str, endpoints: Sequence[str] = (), last_error: Optional[BaseException] = None,
                 retryable: bool = True) -> None:
        super().__init__(message)
        self.endpoints = list(endpoints)
        self.last_error = last_error
        self.retryable = retryable


class _AttemptFailed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class RemoteReward(Reward):
    """Scores from HTTP endpoints: ``(B, *S) -> (B,)``, black-box (``differentiable = False``).

    Args:
        endpoints: one URL or several (``http://127.0.0.1:8000``; ``/score`` is appended).
        timeout: seconds for connecting and for each read of one request.
        max_retries: retries after the first attempt of a batch (``0``: no retry).
        backoff, max_backoff, jitter: pause before retry ``k`` (0-based) is
            ``min(max_backoff, backoff * 2**k) * U(1 - jitter, 1 + jitter)`` seconds.
        dead_for: seconds an endpoint that failed is skipped (while another one is alive).
        batch_size: samples per request (``None``: the whole call in one request).
        encoding: ``"float32"`` (exact) or ``"uint8"`` (images quantised as a PNG would; 4x smaller).
        send_cond: also send a plain condition tensor (class labels) when ``cond`` is one.
        seed: seed of the jitter's random generator (reproducible pauses in tests).
    """

    differentiable = False
    check_at_startup = False  # no start-up request: each request costs server time and is logged

    def __init__(self, endpoints: Union[str, Sequence[str]], timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 30.0, jitter: float = 0.5, dead_for: float = 30.0,
                 batch_size: Optional[int] = None, encoding: str = "float32", send_cond: bool = True,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ValueError("RemoteReward needs at least one endpoint URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must be an http:// or https:// URL")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or not 0 <= jitter <= 1:
            raise ValueError(f"need timeout > 0, max_retries >= 0, backoff >= 0, 0 <= jitter <= 1; got "
                             f"timeout={timeout}, max_retries={max_retries}, backoff={backoff}, jitter={jitter}")
        if encoding not in ("float32", "uint8"):
            raise ValueError(f"encoding must be 'float32' or 'uint8', got {encoding!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.endpoints = [u.rstrip("/") for u in urls]
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff, self.max_backoff, self.jitter = float(backoff), float(max_backoff), float(jitter)
        self.dead_for = float(dead_for)
        self.batch_size = batch_size
        self.encoding = encoding
        self.send_cond = bool(send_cond)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._next = 0
        self._dead_until = [0.0] * len(self.endpoints)
        self._local = threading.local()
        self.last_metadata: Optional[list[dict[str, Any]]] = None
        self.requests_sent = 0

    def __getstate__(self) -> dict[str, Any]:  # picklable (ddp_spawn): locks and sessions are rebuilt
        state = self.__dict__.copy()
        for key in ("_lock", "_local"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._local = threading.local()

    # ------------------------------------------------------------------ endpoints and pauses
    def _pick_endpoint(self) -> int:
        """Next endpoint in round-robin order that is not marked dead (the soonest to revive if all are)."""
        with self._lock:
            now = time.monotonic()
            n = len(self.endpoints)
            for step in range(n):
                i = (self._next + step) % n
                if self._dead_until[i] <= now:
                    self._next = (i + 1) % n
                    return i
            i = min(range(n), key=lambda k: self._dead_until[k])
            self._next = (i + 1) % n
            return i

    def _mark(self, i: int, alive: bool) -> None:
        with self._lock:
            self._dead_until[i] = 0.0 if alive else time.monotonic() + self.dead_for

    def pause(self, retry: int) -> float:
        """Seconds to wait before retry ``retry`` (0-based): capped exponential backoff times jitter."""
        base = min(self.max_backoff, self.backoff * (2.0 ** retry))
        with self._lock:
            u = self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base * u

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session

    # ------------------------------------------------------------------ one request
    def _attempt(self, url: str, body: bytes, n: int) -> tuple[Tensor, Optional[list[dict[str, Any]]]]:
        import requests

        try:
            response = self._session().post(f"{url}/score", data=body, timeout=self.timeout,
                                            headers={"Content-Type": "application/json"})
        except requests.Timeout as err:
            raise _AttemptFailed(f"no answer within {self.timeout:g} s ({type(err).__name__})", True) from err
        except requests.RequestException as err:
            raise _AttemptFailed(f"connection failed ({type(err).__name__}: {err})", True) from err
        if response.status_code != 200:
            message = _error_message(response)
            retryable = response.status_code >= 500 or response.status_code in (408, 429)
            raise _AttemptFailed(f"HTTP {response.status_code}: {message}", retryable)
        try:
            return decode_response(response.content, n)
        except PayloadError as err:
            raise _AttemptFailed(f"bad response: {err}", True) from err

    def score_batch(self, samples: Tensor, metadata: list[dict[str, Any]],
                    cond: Optional[Tensor] = None) -> tuple[Tensor, Optional[list[dict[str, Any]]]]:
        """Scores ``(B,)`` (and per-sample response metadata) of one request, with retries."""
        body = encode_request(samples, metadata, cond, self.encoding)
        n = samples.shape[0]
        tried: list[str] = []
        last: Optional[_AttemptFailed] = None
        for attempt in range(self.max_retries + 1):
            if attempt > 0:
                time.sleep(self.pause(attempt - 1))
            i = self._pick_endpoint()
            url = self.endpoints[i]
            if url not in tried:
                tried.append(url)
            try:
                with self._lock:
                    self.requests_sent += 1
                result = self._attempt(url, body, n)
            except _AttemptFailed as err:
                last = err
                if not err.retryable:  # the request is at fault, not the endpoint
                    raise RewardScoringError(f"remote reward at {url} refused the request: {err}",
                                             [url], err, retryable=False) from err
                self._mark(i, alive=False)
                continue
            self._mark(i, alive=True)
            return result
        raise RewardScoringError(
            f"remote reward failed after {self.max_retries + 1} attempts on {', '.join(tried)}; last error: {last}",
            tried, last,
        ) from last

    # ------------------------------------------------------------------ the reward
    def forward(self, samples: Tensor, cond: Any = None) -> Tensor:
        n = samples.shape[0]
        if n == 0:
            return torch.zeros(0, device=samples.device)
        metadata = metadata_of(cond, n)
        plain = cond if (self.send_cond and isinstance(cond, Tensor)) else None
        step = self.batch_size or n
        scores, extras = [], []
        for start in range(0, n, step):
            stop = min(n, start + step)
            part_cond = plain[start:stop] if plain is not None else None
            s, meta = self.score_batch(samples[start:stop], metadata[start:stop], part_cond)
            scores.append(s)
            extras.extend(meta if meta is not None else [{} for _ in range(stop - start)])
        self.last_metadata = extras
        return torch.cat(scores).to(samples.device)


def _error_message(response: Any) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and "error" in payload:
            return str(payload["error"])
    except ValueError:
        pass
    return (response.text or response.reason or "")[:500]
