"""The reference reward server with injected faults, run as a real process on 127.0.0.1 by the tests.

    python tests/fault_server.py --plan plan.json --log log.jsonl [serve-reward arguments...]

``plan.json`` is a list of actions, the ``i``-th applied to the ``i``-th ``POST /score`` (then "ok"), or
``{"offset": k, "actions": [...]}`` to start the list at request ``k``:

    "ok"          answer normally
    "drop"        close the connection without answering
    "500"         answer HTTP 500
    "late:S"      sleep S seconds, then answer normally
    "short"       answer one score too few
    "nan" / "inf" answer NaN / Infinity for the first sample (JSON literals)
    "always:A"    action A for this and every later request

The plan file is re-read at every request, so a test may change it while the server runs. Every
request is logged (one JSON line: index, action, number of samples, SHA-1 of the samples field) so a
test can check what was scored. Everything else is :mod:`lightning_nft.reward_server`'s own code.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

from lightning_nft.reward_server import RewardRequestHandler, make_server, serve

_counter = {"i": 0}
_lock = threading.Lock()


def _action(plan_path: Path, i: int) -> str:
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else []
    if isinstance(plan, dict):  # {"offset": k, "actions": [...]}: the plan starts at request k
        i -= int(plan.get("offset", 0))
        plan = plan.get("actions", [])
        if i < 0:
            return "ok"
    for k, a in enumerate(plan):
        if a.startswith("always:") and k <= i:
            return a[len("always:"):]
    return plan[i] if i < len(plan) else "ok"


def handler_with_faults(plan_path: Path, log_path: Path) -> type:
    class FaultyHandler(RewardRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/score":
                return super().do_POST()
            body = self.read_body()
            if body is None:
                return
            with _lock:
                i = _counter["i"]
                _counter["i"] += 1
            action = _action(plan_path, i)
            try:
                samples_field = json.loads(body).get("samples", {}).get("npy", "")
                n = len(json.loads(body).get("metadata", [])) or None
            except (ValueError, AttributeError):
                samples_field, n = "", None
            with _lock, open(log_path, "a") as f:
                f.write(json.dumps({"i": i, "action": action, "n": n,
                                    "digest": hashlib.sha1(samples_field.encode()).hexdigest()}) + "\n")
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if action == "500":
                self.send_error_json(500, "injected failure")
                return
            if action.startswith("late:"):
                time.sleep(float(action.split(":", 1)[1]))
            status, error, response = self.answer(body)
            if status == 200 and action in ("short", "nan", "inf"):
                payload = json.loads(response)
                if action == "short":
                    payload["scores"] = payload["scores"][:-1]
                else:
                    payload["scores"][0] = float("nan") if action == "nan" else float("inf")
                response = json.dumps(payload).encode()  # allow_nan: emits NaN / Infinity literals
            self.send_json(status, error, response)

    return FaultyHandler


def main(argv: list[str]) -> None:
    plan = Path(argv[argv.index("--plan") + 1])
    log = Path(argv[argv.index("--log") + 1])
    rest = [a for k, a in enumerate(argv) if a not in ("--plan", "--log") and argv[k - 1] not in ("--plan", "--log")]
    serve(make_server(rest, handler=handler_with_faults(plan, log)))


if __name__ == "__main__":
    main(sys.argv[1:])
