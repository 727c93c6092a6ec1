"""Can the Hugging Face hub be reached? Asked once before any download, so offline runs fail fast.

huggingface_hub reads `HF_HUB_OFFLINE` once, at import; a hub download attempted without network
then waits for connection timeouts and retries (tens of seconds) before it gives up. `prepare` and
`base_model` ask `hub_unreachable()` first: the offline environment variables answer at once,
otherwise one TCP connect with a short timeout does.

>>> import os
>>> from unittest import mock
>>> with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
...     hub_unreachable()
'HF_HUB_OFFLINE is set'
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=8)
def _connect_error(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err})"


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None when the hub can be reached, else the reason (an offline variable, a failed connect)."""
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").lower() in _TRUE:
            return f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _connect_error(endpoint.hostname or "huggingface.co", endpoint.port or 443, timeout)
