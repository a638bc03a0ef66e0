"""Atomic checkpoint writes (``lightning_nft.checkpoint_io``), tested with real processes and real SIGKILLs.

A child process writes a first checkpoint, then starts writing a second one and is killed with
``SIGKILL`` (which no process can catch) either half-way through the bytes of the file or after the
file is complete and synced but before it is renamed into place. In both cases the previous
checkpoint must still be complete and loadable, and the next save must leave no temporary file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_nft.checkpoint_io import AtomicCheckpointIO, CheckpointLoadError, stale_temp_files

CHILD = textwrap.dedent(
    """
    import io, sys, time, torch
    from lightning_nft.checkpoint_io import AtomicCheckpointIO

    path, mode = sys.argv[1], sys.argv[2]
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"round": 1, "w": torch.arange(200_000, dtype=torch.float32)}, path)
    print("FIRST", flush=True)

    if mode == "before_replace":
        class Slow(AtomicCheckpointIO):
            def _before_replace(self, tmp, target):
                print("WRITTEN", flush=True)
                time.sleep(120)
        io_plugin = Slow()
    else:  # half of the bytes reach the temporary file, then the writer stalls
        real_save = torch.save
        def half_then_stall(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            print("WRITTEN", flush=True)
            time.sleep(120)
            f.write(data[len(data) // 2:])
        torch.save = half_then_stall
    io_plugin.save_checkpoint({"round": 2, "w": -torch.arange(200_000, dtype=torch.float32)}, path)
    print("SECOND", flush=True)
    """
)


def _kill_child_mid_write(path: Path, mode: str) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "WRITTEN":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (lines, proc.stderr.read())
    return lines


@pytest.mark.parametrize("mode", ["mid_write", "before_replace"])
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, mode):
    path = tmp_path / "checkpoints" / "last.ckpt"
    lines = _kill_child_mid_write(path, mode)
    assert lines == ["FIRST", "WRITTEN"]
    # the kill left the interrupted temporary file next to the checkpoint, never the checkpoint itself
    stale = stale_temp_files(path)
    assert len(stale) == 1 and stale[0].parent == path.parent
    assert stale[0].stat().st_size > 0
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["round"] == 1
    torch.testing.assert_close(loaded["w"], torch.arange(200_000, dtype=torch.float32), rtol=0, atol=0)

    # the next save replaces the checkpoint and clears the orphan
    AtomicCheckpointIO().save_checkpoint({"round": 3}, path)
    assert stale_temp_files(path) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(path)["round"] == 3


def test_a_failed_save_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"round": 1}, path)
    with pytest.raises(Exception):
        plugin.save_checkpoint({"round": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert plugin.load_checkpoint(path)["round"] == 1


def test_a_failed_load_names_the_file_and_the_other_checkpoints(tmp_path):
    plugin = AtomicCheckpointIO()
    good = tmp_path / "round=0003.ckpt"
    plugin.save_checkpoint({"round": 3}, good)
    data = good.read_bytes()
    broken = tmp_path / "last.ckpt"
    for cut in (0, len(data) // 3, len(data) - 10):  # empty, truncated early, truncated late
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointLoadError) as err:
            plugin.load_checkpoint(broken)
        msg = str(err.value)
        assert str(broken) in msg and f"({cut} bytes)" in msg
        assert f"round=0003.ckpt ({len(data)} bytes)" in msg
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt does not exist.*round=0003\.ckpt"):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")
