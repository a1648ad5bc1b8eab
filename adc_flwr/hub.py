"""One quick question before anything asks the Hugging Face Hub: can it be reached at all?

Without a network the hub clients retry for 25-45 s before they fail; a direct connection
attempt answers in seconds, so datasets and models fail fast with a message that says what
to do instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (``host:port: error``), or None when it can be or when a
    direct probe would say nothing (offline mode: the cache is used; a proxy is set)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))
    if offline or any(os.environ.get(k) for k in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")
