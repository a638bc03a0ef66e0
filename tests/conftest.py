"""Shared test set-up: one torch thread and a quiet Lightning logger for every test.

The models under test are small; on a 2-core machine one thread is faster than two (and much
faster when the cores are shared), so every test runs with ``torch.set_num_threads(1)``.
"""

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run the test from an empty temporary folder (CLI runs write ``runs/...`` relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


FAMILY_TEST = "test_adjoint_family.py::"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """Run the Adjoint Matching family test last and start its fits now, in the background (``test_adjoint_family``:
    they take minutes of one core, which the rest of the suite, one test at a time, leaves idle)."""
    family = [item for item in items if FAMILY_TEST in item.nodeid]
    if not family or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in family] + family
    from test_adjoint_family import start_family_fits

    config.adjoint_family_fits = start_family_fits()


def pytest_unconfigure(config):
    """Stop family fits still running (an interrupted session) and remove their folder."""
    started = getattr(config, "adjoint_family_fits", None)
    if started is None:
        return
    import os
    import shutil
    import signal

    proc, folder = started
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)
