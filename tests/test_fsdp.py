"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) against DDP, 2 CPU processes each, and an exact FSDP resume.

Both strategies run the same seeded DiffusionNFT fits on the mixture (``tests/sharded_run.py``, launched
as a real subprocess: Lightning starts the second rank by re-running the script). Each rank draws its
own rollouts; DDP all-reduces gradients, FSDP2 reduce-scatters them onto shards, so the trained, old
and reference policies must agree to float rounding after several rounds, for full fine-tuning and
for LoRA. The old policy's EMA runs with ``torch._foreach_lerp_`` on the shards. A third launch resumes
an FSDP run from its distributed checkpoint (a folder of shards) and must end exactly where the
uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("sharded_run.py")
ROUNDS = 4
TOLERANCE = 1e-5  # float32 rounding of the gradient reduction order over 4 rounds of 2 Adam steps


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(strategy: str, out: Path, jobs: list[dict]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # earlier ddp_spawn tests leave MASTER_PORT in this process's environment; two runs inheriting the same
    # port collide, so each run gets its own free port
    env["MASTER_PORT"] = str(_free_port())
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(SCRIPT), "--strategy", strategy, "--out", str(out),
                             "--jobs", json.dumps(jobs)], cwd=out, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]


def test_fsdp_matches_ddp_and_resumes_exactly(tmp_path):
    fsdp_dir, ddp_dir = tmp_path / "fsdp", tmp_path / "ddp"
    fsdp_dir.mkdir(), ddp_dir.mkdir()
    jobs = [{"name": "full", "kind": "full", "rounds": ROUNDS}, {"name": "lora", "kind": "lora", "rounds": ROUNDS}]
    fsdp = _launch("fsdp", fsdp_dir, jobs + [{"name": "half", "kind": "full", "rounds": ROUNDS // 2, "checkpoint": True}])
    ddp = _launch("ddp", ddp_dir, jobs)
    _wait(fsdp)
    _wait(ddp)

    for kind in ("full", "lora"):
        f, d = torch.load(fsdp_dir / f"{kind}.pt"), torch.load(ddp_dir / f"{kind}.pt")
        assert [r for r, _ in f["rewards"]] == list(range(ROUNDS))
        for name in ("current", "old", "reference", "backbone"):
            assert f[name].shape == d[name].shape and f[name].numel() > 0
            diff = (f[name] - d[name]).abs().max().item()
            print(f"{kind} {name}: max |FSDP - DDP| = {diff:.3g}")
            assert diff <= TOLERANCE, (kind, name, diff)
        assert (f["current"] - f["old"]).abs().max() > 1e-4  # the EMA lags: old != current
        assert (f["backbone"].numel() > f["reference"].numel()) == (kind == "lora")  # LoRA: adapters on a frozen base
        torch.testing.assert_close(torch.tensor([r for _, r in f["rewards"]]),
                                   torch.tensor([r for _, r in d["rewards"]]), rtol=0, atol=1e-5)
    full = torch.load(fsdp_dir / "full.pt")
    assert (full["current"] - full["reference"]).abs().max() > 1e-3  # training moved the weights

    checkpoint = fsdp_dir / "half" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").exists()  # a distributed (sharded) checkpoint
    resumed = _launch("fsdp", fsdp_dir, [{"name": "resumed", "kind": "full", "rounds": ROUNDS, "resume": str(checkpoint)}])
    _wait(resumed)
    r = torch.load(fsdp_dir / "resumed.pt")
    assert [k for k, _ in r["rewards"]] == list(range(ROUNDS // 2, ROUNDS))
    for name in ("current", "old", "reference"):
        diff = (r[name] - full[name]).abs().max().item()
        print(f"resumed {name}: max |resumed - uninterrupted| = {diff:.3g}")
        assert diff == 0.0, (name, diff)
    assert r["rewards"] == full["rewards"][ROUNDS // 2:]
