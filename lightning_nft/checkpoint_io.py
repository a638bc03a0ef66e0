"""Checkpoint files that are either the old version or the new one, never half of one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temporary folder; when that folder is on another filesystem (a tmpfs ``/tmp`` is common)
the final move is a copy, and a kill during the copy leaves a truncated checkpoint (a later resume
fails with a bare ``EOFError``) plus an orphan temporary file.

:class:`AtomicCheckpointIO` writes the new checkpoint to a temporary file *in the checkpoint's own
folder*, ``fsync`` s it, and renames it over the target with ``os.replace`` (atomic on POSIX and
Windows within one filesystem), then ``fsync`` s the folder so the rename itself survives a power
cut. A failed write removes its temporary file; temporary files left by a killed process (a
``SIGKILL`` cannot be caught) are removed by the next save of the same checkpoint. A failed load
names the file, its size and the other checkpoints in its folder.

Use it with ``Trainer(plugins=[AtomicCheckpointIO()])`` or, in YAML,
``trainer.plugins: [{class_path: lightning_nft.checkpoint_io.AtomicCheckpointIO}]``. Remote paths
(``s3://`` ...) fall back to Lightning's own writer. Sharded (distributed) checkpoints of
``ModelParallelStrategy`` are folders written by ``torch.distributed.checkpoint`` and do not pass
through a ``CheckpointIO``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_SUFFIX = ".tmp"


class CheckpointLoadError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, not a checkpoint, wrong format)."""


def temp_prefix(path: Path) -> str:
    """Name prefix of the temporary files that become ``path``: ``.<name>.`` (hidden, same folder)."""
    return f".{path.name}."


def stale_temp_files(path: Path) -> list[Path]:
    """Temporary files of earlier, interrupted writes of ``path`` in its folder."""
    pattern = os.path.join(glob.escape(str(path.parent)), glob.escape(temp_prefix(path)) + "*" + TEMP_SUFFIX)
    return [Path(p) for p in sorted(glob.glob(pattern))]


def other_checkpoints(path: Path) -> list[str]:
    """Descriptions ``"name (N bytes)"`` of the other checkpoint files and folders next to ``path``."""
    folder = path.parent
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name == path.name or entry.name.startswith("."):
            continue
        if entry.suffix == ".ckpt" or entry.is_dir() and (entry / ".metadata").exists():
            size = entry.stat().st_size if entry.is_file() else sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            out.append(f"{entry.name} ({size} bytes)")
    return out


def _describe_alternatives(path: Path) -> str:
    others = other_checkpoints(path)
    if not others:
        return f"there are no other checkpoints in {path.parent}"
    return f"other checkpoints in {path.parent}: " + ", ".join(others)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a temporary file in the same folder and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_files(path):
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            self._before_replace(tmp, path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)

    def _before_replace(self, tmp: Path, path: Path) -> None:
        """Called with the complete, synced temporary file just before it replaces ``path`` (a test seam)."""

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist; {_describe_alternatives(p)}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            size = p.stat().st_size if p.is_file() else "?"
            raise CheckpointLoadError(
                f"could not read checkpoint {p} ({size} bytes): {type(err).__name__}: {err}. "
                f"It may be truncated by an interrupted write; {_describe_alternatives(p)}"
            ) from err
