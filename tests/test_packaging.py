"""``lightning_nft.callbacks`` ships inside the distribution, from an editable install and from a wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import lightning_nft, lightning_nft.callbacks as c; print(c.__file__); print(c.OnlineRollout.__name__)"


def test_callbacks_importable_from_installed_package(tmp_path):
    """Run outside the repository so only the installed (editable) distribution can answer."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "OnlineRollout"


def test_wheel_contains_callbacks_subpackage_and_no_top_level_callbacks(tmp_path):
    wheel_dir = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = wheel_dir.glob("lightning_nft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_nft/callbacks/__init__.py" in names
    assert "lightning_nft/callbacks/online_rollout.py" in names
    assert not any(n.startswith("callbacks/") for n in names)
    for asset in ("digits_t2i/transformer/config.json", "digits_t2i/transformer/diffusion_pytorch_model.safetensors",
                  "digits_t2i/text_encoder/config.json", "digits_t2i/text_encoder/model.safetensors",
                  "digits_t2i/tokenizer.json", "digits_t2i/digits_train.jsonl", "digits_t2i/digits_heldout.jsonl"):
        assert f"lightning_nft/assets/{asset}" in names, asset
    assert any(n.startswith("lightning_nft/assets/") and n.endswith(".safetensors") for n in names) or not list(
        (ROOT / "lightning_nft" / "assets").glob("*.safetensors"))
    # install the wheel into a bare target folder and import from there, outside the repository
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(target))
