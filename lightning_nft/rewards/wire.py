"""The wire format of remote scoring: JSON with base64 ``.npy`` arrays, never pickle.

Request (``POST /score``, ``Content-Type: application/json``)::

    {"version": 1,
     "samples": {"npy": "<base64 of a .npy file>"},       # float32 (B, *S) decoded samples, or uint8 (B, H, W, C)
     "metadata": [{...}, ...],                             # B JSON objects (prompt, ids...), may be empty dicts
     "cond": {"npy": "..."}}                               # optional: a plain (B, ...) condition tensor

Response (``200``)::

    {"version": 1, "scores": [float, ...],                 # B finite numbers
     "metadata": [{...}, ...]}                             # optional, per-sample extras (e.g. OCR text)

Errors are ``4xx`` (malformed request: the client's fault, not retried) or ``5xx`` (server trouble,
retried) with ``{"error": "<message>"}``. ``.npy`` arrays are read with ``allow_pickle=False``, so a
payload can carry numbers only; object arrays are refused. uint8 image samples (``encoding="uint8"``,
4x smaller than float32) are what a PNG would carry: ``u = round(255 (x + 1) / 2)`` in ``(B, H, W, C)``;
the server maps them back to ``x = u / 127.5 - 1`` in ``(B, C, H, W)``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

WIRE_VERSION = 1


class PayloadError(ValueError):
    """A malformed request or response; the message says which field is wrong."""


def array_to_field(array: np.ndarray) -> dict[str, str]:
    """``{"npy": base64}`` of a numeric array (``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return {"npy": base64.b64encode(buf.getvalue()).decode("ascii")}


def field_to_array(field: Any, name: str) -> np.ndarray:
    """The array of a ``{"npy": base64}`` field; :class:`PayloadError` naming ``name`` when malformed."""
    if not isinstance(field, dict) or not isinstance(field.get("npy"), str):
        raise PayloadError(f"field {name!r} must be an object {{\"npy\": <base64 .npy>}}")
    try:
        raw = base64.b64decode(field["npy"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(f"field {name!r}: invalid base64 ({err})") from err
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as err:  # object arrays (pickle) and corrupt headers
        raise PayloadError(f"field {name!r}: not a numeric .npy array ({err})") from err
    except Exception as err:  # noqa: BLE001 - any parse failure of untrusted bytes is the sender's fault
        raise PayloadError(f"field {name!r}: unreadable .npy ({type(err).__name__}: {err})") from err
    if array.dtype.kind not in "biuf":
        raise PayloadError(f"field {name!r}: dtype {array.dtype} is not numeric")
    return array


def samples_to_array(samples: Tensor, encoding: str = "float32") -> np.ndarray:
    """Decoded samples ``(B, *S)`` -> the array sent: float32 as is, or uint8 images ``(B, H, W, C)``."""
    x = samples.detach().cpu()
    if encoding == "float32":
        return x.float().numpy()
    if encoding == "uint8":
        if x.dim() != 4:
            raise ValueError(f"encoding='uint8' needs images (B, C, H, W), got shape {tuple(x.shape)}")
        return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    raise ValueError(f"encoding must be 'float32' or 'uint8', got {encoding!r}")


def array_to_samples(array: np.ndarray) -> Tensor:
    """The inverse of :func:`samples_to_array`: float32 ``(B, *S)``; uint8 ``(B, H, W, C)`` -> ``(B, C, H, W)`` in [-1, 1]."""
    if array.ndim < 1 or array.shape[0] < 1:
        raise PayloadError(f"field 'samples' must have a batch dimension with at least one sample, got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.ndim != 4:
            raise PayloadError(f"uint8 'samples' must be images (B, H, W, C), got shape {array.shape}")
        return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = torch.from_numpy(array.astype(np.float32, copy=False).copy())
    if not torch.isfinite(x).all():
        raise PayloadError("field 'samples' contains non-finite values")
    return x


def encode_request(samples: Tensor, metadata: list[dict[str, Any]], cond: Optional[Tensor] = None,
                   encoding: str = "float32") -> bytes:
    """The JSON body of a scoring request (``metadata`` must be JSON-serialisable)."""
    body: dict[str, Any] = {"version": WIRE_VERSION, "samples": array_to_field(samples_to_array(samples, encoding)),
                            "metadata": metadata}
    if cond is not None:
        body["cond"] = array_to_field(cond.detach().cpu().numpy())
    try:
        return json.dumps(body, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise TypeError(f"condition metadata must be JSON-serialisable for remote scoring: {err}") from err


def decode_request(body: bytes) -> tuple[Tensor, list[dict[str, Any]], Optional[Tensor]]:
    """``(samples, metadata, cond)`` of a request body; :class:`PayloadError` for anything malformed."""
    payload = _json_object(body, "request")
    version = payload.get("version", WIRE_VERSION)
    if version != WIRE_VERSION:
        raise PayloadError(f"unsupported wire version {version!r} (this server speaks {WIRE_VERSION})")
    if "samples" not in payload:
        raise PayloadError("missing field 'samples'")
    samples = array_to_samples(field_to_array(payload["samples"], "samples"))
    metadata = payload.get("metadata", [])
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise PayloadError("field 'metadata' must be a list of objects")
    if metadata and len(metadata) != samples.shape[0]:
        raise PayloadError(f"field 'metadata' has {len(metadata)} entries for {samples.shape[0]} samples")
    cond = None
    if payload.get("cond") is not None:
        cond_array = field_to_array(payload["cond"], "cond")
        if cond_array.ndim < 1 or cond_array.shape[0] != samples.shape[0]:
            raise PayloadError(f"field 'cond' has shape {cond_array.shape} for {samples.shape[0]} samples")
        cond = torch.from_numpy(cond_array.copy())
    return samples, metadata, cond


def encode_response(scores: Tensor, metadata: Optional[list[dict[str, Any]]] = None) -> bytes:
    body: dict[str, Any] = {"version": WIRE_VERSION, "scores": [float(s) for s in scores.detach().cpu().reshape(-1)]}
    if metadata is not None:
        body["metadata"] = metadata
    return json.dumps(body, allow_nan=False).encode("utf-8")


def decode_response(body: bytes, n: int) -> tuple[Tensor, Optional[list[dict[str, Any]]]]:
    """``(scores (n,), metadata)``; :class:`PayloadError` on a wrong count or a non-finite / non-number score."""
    payload = _json_object(body, "response")
    scores = payload.get("scores")
    if not isinstance(scores, list):
        raise PayloadError("response has no list 'scores'")
    if len(scores) != n:
        raise PayloadError(f"response has {len(scores)} scores for {n} samples")
    bad = [i for i, s in enumerate(scores)
           if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)]
    if bad:
        raise PayloadError(f"response score of sample {bad[0]} is {scores[bad[0]]!r} "
                           f"({len(bad)} of {n} not finite numbers)")
    metadata = payload.get("metadata")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != n):
        raise PayloadError(f"response 'metadata' must be a list of {n} entries")
    return torch.tensor(scores, dtype=torch.float32), metadata


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    def _constant(name: str) -> float:  # NaN / Infinity literals are kept as floats, then refused by the checks
        return float(name.replace("Infinity", "inf"))

    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"{what} body is not JSON ({err})") from err
    if not isinstance(payload, dict):
        raise PayloadError(f"{what} body must be a JSON object, got {type(payload).__name__}")
    return payload
