"""Whether the Hugging Face Hub can be reached, found out once and quickly.

huggingface_hub retries a refused connection five times with growing waits, and transformers asks for every file
of a backbone: with the Hub down, a backbone named by its Hub id took ~50 s of ``Retrying in 8s`` lines before
its one-line error. One TCP connection decides instead (to the Hub, or to the proxy that would carry the
request); when it fails, optqa reads only the local cache (``local_files_only``), at once. Own code: neither
huggingface_hub nor transformers offers a single quick probe without retries (``HF_HUB_OFFLINE`` is the
user's switch, read by both libraries, and stays that).
"""
from __future__ import annotations

import functools
import logging
import socket
import urllib.request
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def endpoint() -> str:
    """The Hub's address huggingface_hub uses (``HF_ENDPOINT``, by default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached now, or None when it can (or when ``HF_HUB_OFFLINE`` is set: both libraries
    then read only the cache without trying the network).

    One TCP connection, at most ``PROBE_TIMEOUT_S`` seconds, to the Hub's host, or to the proxy that
    ``HTTPS_PROXY``/``HTTP_PROXY`` name for it (unless ``NO_PROXY`` exempts it); once per address and process.

    Returns:
        A short reason (``connection refused``, ``no answer ...``, ``name not resolved: ...``) or None.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlsplit(endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxied.hostname or "", proxied.port or 8080
    return _connect_error(host, port)


@functools.lru_cache(maxsize=8)
def _connect_error(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except socket.gaierror as exc:
        return f"name not resolved: {host} ({exc.strerror})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"{host}:{port}: {(exc.strerror or str(exc)).lower()}"
    return None


def offline_reason() -> str | None:
    """Why files must come from the local cache only: ``HF_HUB_OFFLINE=1``, or the Hub cannot be reached now; None
    when the Hub may be asked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    reason = hub_unreachable()
    return f"the Hub at {endpoint()} cannot be reached ({reason})" if reason else None
