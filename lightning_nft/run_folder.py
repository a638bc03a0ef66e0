"""One run, one folder: where a run's files go, and when a folder may be written into.

**The choice (issue 13).** A run's folder is ``trainer.default_root_dir``; every output (checkpoints,
TensorBoard logs, pictures, ``samples.pt``, ``config.yaml``) is derived from it *after* the command
line is applied. Two mechanisms make this hold:

* the CLI parses YAML in jsonargparse's ``omegaconf+`` mode, which resolves ``${trainer.default_root_dir}``
  (and every other ``${...}``) once, on the final merged configuration, so
  ``--trainer.default_root_dir runs/other`` moves the checkpoints and logs as well (the plain
  ``omegaconf`` mode resolved each file when it was read, before the overrides);
* callbacks that write files default to paths computed from ``trainer.default_root_dir`` when the
  run starts (``RoundCheckpoint``, ``ImageGrid``, ``SampleQuality``).

We refuse a **non-empty run folder** rather than versioning folders (``run/version_3``): a versioned
folder keeps the README's ``--ckpt_path runs/x/checkpoints/last.ckpt`` pointing at the *previous* run,
next to pictures of the new one, which is exactly the mix-up this prevents. ``fit`` into a non-empty
folder is refused unless it resumes (``--ckpt_path``: the run continues in its folder) or the user
passes ``--overwrite true``, which deletes the folder's contents first.

``predict`` without a checkpoint samples the *untrained* model: it warns loudly and writes
``samples.untrained.pt`` instead of ``samples.pt``, so it never overwrites a fine-tuned run's samples.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from lightning.pytorch.utilities import rank_zero_warn

UNTRAINED_TAG = "untrained"


class RunFolderError(FileExistsError):
    """``fit`` was asked to write into a folder that holds another run."""


def run_folder_contents(root: os.PathLike | str) -> list[str]:
    """Names of the entries in ``root`` (empty when it does not exist)."""
    path = Path(root)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def prepare_run_folder(root: os.PathLike | str, *, resuming: bool, overwrite: bool) -> None:
    """Allow ``fit`` to write into ``root``, or refuse (see the module docstring for the rules).

    Raises :class:`RunFolderError` naming the folder, what is in it, and the three ways on. With
    ``overwrite`` (and not resuming) the folder's contents are deleted.
    """
    contents = run_folder_contents(root)
    if not contents or resuming:
        return
    if overwrite:
        rank_zero_warn(f"--overwrite: deleting the previous run in {root} ({', '.join(contents[:6])})")
        for name in contents:
            entry = Path(root) / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    shown = ", ".join(contents[:6]) + (", ..." if len(contents) > 6 else "")
    last = Path(root) / "checkpoints" / "last.ckpt"
    resume = f"--ckpt_path {last}" if os.path.lexists(last) else "--ckpt_path <a checkpoint of that run>"
    raise RunFolderError(
        f"the run folder {root} is not empty ({shown}): it holds another run. Resume it with {resume}, "
        "choose another folder with --trainer.default_root_dir, or replace it with --overwrite true"
    )


def untrained_output_path(path: os.PathLike | str) -> str:
    """``runs/x/samples.pt`` -> ``runs/x/samples.untrained.pt``."""
    stem, ext = os.path.splitext(str(path))
    return f"{stem}.{UNTRAINED_TAG}{ext or '.pt'}"


def predict_output_path(path: os.PathLike | str, ckpt_path: Optional[str]) -> str:
    """Where ``predict`` writes: ``path`` with a checkpoint; without one a loud warning and the untrained name."""
    if ckpt_path is not None:
        return str(path)
    target = untrained_output_path(path)
    rank_zero_warn(
        "predict WITHOUT --ckpt_path samples the UNTRAINED model given in the config, not a fine-tuned one. "
        f"Writing {target} (not {path}); pass --ckpt_path <run>/checkpoints/last.ckpt for the fine-tuned model"
    )
    return target
