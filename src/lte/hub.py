"""Hub names fail fast: a model name that is neither a local folder nor an embedded model goes to the
Hugging Face Hub only when the Hub can answer.

With `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set, or when the Hub does not answer within a few
seconds, a hub name resolves to its snapshot in the local hub cache, or is refused in one line at
once, instead of after the retries of the download code (about 30-50 s of warnings).
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from lte.errors import LTEError

__all__ = ["cached_snapshot", "check_hub_dataset", "hub_endpoint", "hub_offline", "hub_reachable",
           "resolve_hub_model"]

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_SECONDS = 3.0
EMBEDDED_HINT = "an embedded name (smollm2-135m, minilm, mpnet)"


def hub_offline() -> bool:
    """Whether the environment asks for no Hub access (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=8)
def _answers(endpoint: str, timeout: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:  # an HTTP error is an answer
        return True
    except (OSError, ValueError):  # no route, no name resolution, refused, timed out
        return False
    return True


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether the Hub endpoint answers within `timeout` seconds (asked once per process)."""
    return _answers(hub_endpoint(), timeout)


def cached_snapshot(name: str) -> Path | None:
    """The local hub-cache folder of a hub model (one with its config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json")
    except (ValueError, OSError):  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_hub_model(name: str) -> Path | str:
    """A hub model name as something loadable now: the name (the Hub answers), its cached snapshot folder
    (offline or no network), or a one-line `LTEError` when neither works."""
    if not hub_offline() and hub_reachable():
        return name
    snapshot = cached_snapshot(name)
    if snapshot is not None:
        logger.info("hub offline: using the cached snapshot of %s in %s", name, snapshot)
        return snapshot
    why = ("HF_HUB_OFFLINE is set" if hub_offline()
           else f"{hub_endpoint()} does not answer (no network?)")
    fix = "unset HF_HUB_OFFLINE" if hub_offline() else "connect to the network"
    raise LTEError(f"'{name}' is not a local model folder nor an embedded model, and as a hub name it cannot be "
                   f"fetched: {why} and it is not in the local hub cache. Pass a local model folder or "
                   f"{EMBEDDED_HINT}, or {fix}.")


def check_hub_dataset(name: str) -> None:
    """Refuse at once a hub dataset name when the Hub does not answer (offline mode is left to `datasets`' cache)."""
    if not hub_offline() and not hub_reachable():
        raise LTEError(f"'{name}' is not a local file or folder, and as a hub dataset it needs the network: "
                       f"{hub_endpoint()} does not answer. Pass a local data file instead.")
