"""Test-session settings: with `pytest -n N`, the N worker processes share the machine's cores."""

from __future__ import annotations

import os

import pytest
import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:  # one worker per core: torch's own threads would only contend with the other workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _no_user_kernel_table(tmp_path_factory, monkeypatch):
    """Keep a kernel table that `lte tune` wrote on this machine out of the tests (they check the shipped rows)."""
    from lte.kernels import tuning

    monkeypatch.setattr(tuning, "user_table_path", lambda: tmp_path_factory.getbasetemp() / "no_user_table.json")
