"""Where lte keeps files of its own between runs (a leaf module: it imports nothing from lte)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """lte's cache folder (converted/unpacked models, the kernel table `lte tune` writes): ``$LTE_CACHE`` or
    ``~/.cache/lte``."""
    return Path(os.environ.get("LTE_CACHE") or Path.home() / ".cache" / "lte").expanduser()
