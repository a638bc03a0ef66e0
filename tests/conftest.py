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
