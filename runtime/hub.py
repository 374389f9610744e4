"""Hugging Face hub names: what a repo id looks like, the presets' public checkpoints, the default Mimi."""
import re

# "owner/name", each part starting with a letter, digit or underscore as the hub requires, so that
# a relative path such as "./ckpt" or "../ckpt" is never taken for a repo id.
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")

# Presets that name a public checkpoint; others need a local path or random weights.
PRESET_HUB_IDS = {"csm-1b": "sesame/csm-1b"}
# Mimi for a real checkpoint that bundles none (transformers' CSM checkpoints bundle theirs).
DEFAULT_CODEC = "kyutai/moshiko-pytorch-bf16"


def check_reachable(what: str, fix: str, timeout_s: float = 3.0) -> None:
    """Fail at once, with the fix, when the hub cannot be reached (offline, HF_HUB_OFFLINE set),
    rather than after huggingface_hub's retries (close to a minute without a network)."""
    import os
    import socket
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{what}: HF_HUB_OFFLINE is set and it is not in the local cache. {fix}")
    url = urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise FileNotFoundError(f"{what}: the Hugging Face Hub ({host}) cannot be reached ({e.strerror or e}). "
                                f"{fix}") from None
