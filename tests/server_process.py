"""Start the reference reward server (optionally with injected faults) as a real process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    plan: Path
    log: Path

    def requests_logged(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def set_plan(self, actions: list[str]) -> None:
        """Apply ``actions`` to the next requests (the fault server counts requests from the log)."""
        self.plan.write_text(json.dumps({"offset": len(self.requests_logged()), "actions": actions}))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    """A port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, reward_args: list[str], faults: bool = True, extra: Optional[list[str]] = None,
                 timeout: float = 120.0) -> ServerProcess:
    """Launch ``fault_server.py`` (or the plain ``lightning-nft serve-reward``) and wait for its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    plan, log = folder / "plan.json", folder / "log.jsonl"
    plan.write_text("[]")
    common = [*reward_args, "--host", "127.0.0.1", "--port", "0", "--torch_threads", "1", *(extra or [])]
    if faults:
        cmd = [sys.executable, str(TESTS / "fault_server.py"), "--plan", str(plan), "--log", str(log), *common]
    else:
        cmd = [sys.executable, "-m", "lightning_nft", "serve-reward", *common]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(folder / "stderr.txt", "w"), env=env,
                            text=True, cwd=str(ROOT))
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    while "serving" not in line:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"reward server did not start: {(folder / 'stderr.txt').read_text()[-3000:]}")
        line = proc.stdout.readline()
    url = line.strip().rsplit(" ", 1)[-1]
    requests.get(f"{url}/health", timeout=10).raise_for_status()
    return ServerProcess(proc, url, plan, log)
