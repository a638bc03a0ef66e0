"""The Adjoint Matching benchmarks' shared problem family and fine-tuning loop.

They live with their tests (``tests/test_adjoint_matching.py``: ``random_tilt_problem``,
``finetune_adjoint_matching``, ``measure_tilt``), so the benchmarks load that module by path rather than keep
a second copy.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_test_helpers() -> ModuleType:
    """``tests/test_adjoint_matching.py`` as a module (the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location("_am_tests", ROOT / "tests" / "test_adjoint_matching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
