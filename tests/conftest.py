"""Test-session settings: with `pytest -n N`, the N worker processes share the machine's cores."""

from __future__ import annotations

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:  # one worker per core: torch's own threads would only contend with the other workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
