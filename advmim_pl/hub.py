"""Reading from the Hugging Face Hub without the long wait: one check whether the Hub answers, then timm's own
download code, from the local cache only when it does not.

huggingface_hub retries a refused or timed-out request five times per file with growing pauses, and timm asks for
two files per model, so an unreachable Hub costs about 50 s (53 s against a closed port here) and a retry message per
attempt before the error. ``hub_reads``
asks once (``HUB_TIMEOUT_S``) and, when the Hub does not answer or ``HF_HUB_OFFLINE`` is set, switches
huggingface_hub to its offline mode (its ``constants.HF_HUB_OFFLINE``, which it otherwise reads once at import) for
the duration, so that files already in the cache still load and missing ones fail at once.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import huggingface_hub
from huggingface_hub import constants

HUB_TIMEOUT_S = 5.0  # seconds for the one connection check
TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true environment variable


def offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was set when huggingface_hub was
    imported."""
    now = any(os.environ.get(name, "").upper() in TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or huggingface_hub.is_offline_mode()


def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint (``HF_ENDPOINT``, default https://huggingface.co) answers one HEAD request within
    ``timeout`` seconds, with any status; otherwise why it cannot be used, in one line."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT  # what downloads use: HF_ENDPOINT as huggingface_hub read it at import
    try:
        huggingface_hub.get_session().head(endpoint, timeout=timeout)
    except Exception as err:  # httpx's or requests' connection errors, depending on huggingface_hub's release
        lines = str(err).strip().splitlines()
        return f"the Hub at {endpoint} does not answer ({type(err).__name__}{': ' + lines[0] if lines else ''})"
    return None


@contextmanager
def hub_reads() -> Iterator[str | None]:
    """Context for Hub downloads (timm's ``create_model(..., pretrained=True)`` and huggingface_hub's): yields None
    when the Hub answered the one check; otherwise the reason, with huggingface_hub in offline mode inside the block
    (cache only, no retries). Restores the mode on exit."""
    reason = hub_unreachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or reason is not None
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = saved
