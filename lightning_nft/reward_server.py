"""Reference reward server: serve any reward of the library over HTTP for :class:`~lightning_nft.rewards.remote.RemoteReward`.

Run::

    lightning-nft serve-reward --config reward_server.yaml          # or: python -m lightning_nft.reward_server
    # reward_server.yaml
    reward:
      class_path: lightning_nft.rewards.PickScore
      init_args: {model: yuvalkirstain/PickScore_v1, processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K}
    host: 127.0.0.1
    port: 8000
    device: cuda

The reward is chosen by ``class_path``/``init_args`` exactly as in the training YAML (jsonargparse, as
``LightningCLI``). Routes: ``POST /score`` (:mod:`lightning_nft.rewards.wire`) and ``GET /health``.

Why the standard library's ``ThreadingHTTPServer`` and not Flask/werkzeug: the server has two routes
and one JSON body format, needs no templating, sessions or routing library, and adds no dependency;
it is HTTP/1.1 with keep-alive, one thread per connection, so decoding and encoding of requests run in
parallel while scoring is serialised by a lock (one model on one device). For production traffic put
it behind a reverse proxy or run several servers and list them all as the client's endpoints.

Faults are reported, never hidden: a malformed request is answered ``400`` (``413`` too large, ``404``
unknown route, ``411`` no length) with a message; a reward that rejects its input (``KeyError`` /
``ValueError`` / ``TypeError``, e.g. a missing prompt field) gives ``422``; any other failure, and a
reward that returns the wrong number of scores or a non-finite score, gives ``500``. The server keeps
serving after each of them.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_nft.conditions import Conditions
from lightning_nft.rewards.wire import PayloadError, decode_request, encode_response


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server holding one reward; :meth:`score` is serialised by a lock.

    Args:
        address: ``(host, port)``; port ``0`` picks a free port (read ``server_address``).
        reward: the reward module (moved to ``device``, eval mode, no grad).
        device: where the reward runs.
        max_batch: samples per reward call (a larger request is scored in chunks).
        max_request_bytes: larger bodies are refused with ``413``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], reward: nn.Module, device: str = "cpu",
                 max_batch: Optional[int] = None, max_request_bytes: int = 512 * 2**20,
                 handler: type[BaseHTTPRequestHandler] | None = None, verbose: bool = False) -> None:
        super().__init__(address, handler or RewardRequestHandler)
        self.reward = reward.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.max_request_bytes = int(max_request_bytes)
        self.verbose = verbose
        self.score_lock = threading.Lock()
        self.requests_scored = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (timed out, dropped) is routine: no traceback; anything else is printed."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, samples: Tensor, metadata: list[dict[str, Any]],
              cond: Optional[Tensor]) -> tuple[Tensor, Optional[list[dict[str, Any]]]]:
        """Scores ``(B,)`` and the reward's per-sample metadata (``reward.last_metadata``) when it sets one."""
        n = samples.shape[0]
        step = self.max_batch or n
        scores, extras = [], []
        with self.score_lock, torch.inference_mode():
            for start in range(0, n, step):
                stop = min(n, start + step)
                part = _condition(metadata[start:stop] if metadata else [], None if cond is None else cond[start:stop])
                dtype = next(self.reward.parameters(), samples).dtype if samples.is_floating_point() else None
                x = samples[start:stop].to(self.device, dtype=dtype)
                if part is not None:
                    part = part.to(self.device) if isinstance(part, (Tensor, Conditions)) else part
                value = self.reward(x, part).detach().float().reshape(-1).cpu()
                if value.shape[0] != stop - start:
                    raise RuntimeError(f"{type(self.reward).__name__} returned {value.shape[0]} scores "
                                       f"for {stop - start} samples")
                bad = ~torch.isfinite(value)
                if bad.any():
                    i = int(bad.nonzero()[0, 0])
                    raise RuntimeError(f"{type(self.reward).__name__} returned {float(value[i])} for sample {start + i}")
                scores.append(value)
                meta = getattr(self.reward, "last_metadata", None)
                extras.extend(meta if isinstance(meta, list) and len(meta) == stop - start else [{}] * (stop - start))
            self.requests_scored += 1
        has_extras = any(extras)
        return torch.cat(scores), (_json_safe(extras) if has_extras else None)


def _condition(metadata: list[dict[str, Any]], cond: Optional[Tensor]) -> Any:
    """What the reward receives: ``Conditions`` when there is metadata, else the plain tensor (or ``None``)."""
    if metadata and any(metadata):
        return Conditions(cond, metadata)
    return cond


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        out.append({k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in row.items()})
    return out


class RewardRequestHandler(BaseHTTPRequestHandler):
    """``POST /score`` and ``GET /health``; every answer is JSON."""

    protocol_version = "HTTP/1.1"
    server: RewardServer

    def send_json(self, status: int, payload: Any = None, body: Optional[bytes] = None) -> None:
        data = body if body is not None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") != "/health":
            self.send_error_json(404, f"unknown route {self.path!r}; routes: POST /score, GET /health")
            return
        self.send_json(200, {"status": "ok", "reward": type(self.server.reward).__name__,
                             "requests_scored": self.server.requests_scored})

    def read_body(self) -> Optional[bytes]:
        """The request body, or ``None`` after answering an error (no/oversized ``Content-Length``)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            self.send_error_json(411, "a Content-Length header is required")
            return None
        size = int(length)
        if size > self.server.max_request_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self.send_error_json(413, f"request of {size} bytes exceeds max_request_bytes={self.server.max_request_bytes}")
            return None
        return self.rfile.read(size)

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self.close_connection = True
            self.send_error_json(404, f"unknown route {self.path!r}; routes: POST /score, GET /health")
            return
        body = self.read_body()
        if body is None:
            return
        self.send_json(*self.answer(body))

    def answer(self, body: bytes) -> tuple[int, Any, Optional[bytes]]:
        """``(status, error payload, response body)`` for a request body; never raises."""
        try:
            samples, metadata, cond = decode_request(body)
        except PayloadError as err:
            return 400, {"error": f"malformed request: {err}"}, None
        try:
            scores, extras = self.server.score(samples, metadata, cond)
        except (KeyError, ValueError, TypeError) as err:
            return 422, {"error": f"{type(self.server.reward).__name__} rejected the batch: "
                                  f"{type(err).__name__}: {err}"}, None
        except Exception as err:  # noqa: BLE001 - report every scoring failure to the client, keep serving
            return 500, {"error": f"{type(self.server.reward).__name__} failed: {type(err).__name__}: {err}"}, None
        return 200, None, encode_response(scores, extras)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


def build_parser() -> Any:
    """The ``serve-reward`` argument parser (jsonargparse: ``--config`` YAML, ``reward.class_path``...)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_nft.rewards.base import Reward

    parser = ArgumentParser(prog="lightning-nft serve-reward", description="Serve a reward over HTTP.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--reward", type=Reward, required=True, help="the reward: class_path and init_args")
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--max_batch", type=Optional[int], default=None, help="samples per reward call")
    parser.add_argument("--max_request_mb", type=float, default=512.0)
    parser.add_argument("--torch_threads", type=Optional[int], default=None)
    parser.add_argument("--verbose", type=bool, default=False)
    return parser


def instantiate(parser: Any, cfg: Any) -> Any:
    """``parser.instantiate`` (jsonargparse >= 4.49) or ``instantiate_classes`` (older)."""
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return build(cfg)


def make_server(args: Optional[Sequence[str]] = None,
                handler: type[BaseHTTPRequestHandler] | None = None) -> RewardServer:
    """Parse ``args`` and build (not start) the server."""
    parser = build_parser()
    cfg = parser.parse_args(list(args) if args is not None else None)
    if cfg.torch_threads is not None:
        torch.set_num_threads(int(cfg.torch_threads))
    reward = instantiate(parser, cfg).reward
    return RewardServer((cfg.host, cfg.port), reward, cfg.device, cfg.max_batch,
                        int(cfg.max_request_mb * 2**20), handler=handler, verbose=cfg.verbose)


def serve(server: RewardServer) -> None:
    """Announce the URL on stdout, serve until SIGTERM/SIGINT, then close."""
    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {type(server.reward).__name__} on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(args: Optional[Sequence[str]] = None) -> None:
    """``lightning-nft serve-reward [--config FILE] [--reward.class_path ...] [--port N] ...``."""
    serve(make_server(args))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
