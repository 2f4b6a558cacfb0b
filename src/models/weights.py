"""Whether CLIP's pretrained weights can be had, answered in seconds.

open_clip turns a tag (`model.pretrained=openai`) into weights it downloads on first use and caches:
from the Hugging Face hub when the tag has a hub entry and huggingface_hub is installed (OpenAI's
weights too), else from the tag's URL (openaipublic, GitHub) with urllib. Without network the hub
retries for about a minute before failing; `check_weights` instead says at once that the weights
are neither a local file nor cached and cannot be downloaded now (HF_HUB_OFFLINE is set, or the
host does not answer within PROBE_TIMEOUT_S), and what to do.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import open_clip
from huggingface_hub import constants as hub_constants
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import has_hf_hub

PROBE_TIMEOUT_S = 3.0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
FALSE_VALUES = ("", "0", "false", "no", "off")


class WeightsUnavailableError(RuntimeError):
    """The pretrained CLIP weights could not be fetched or read."""


def check_weights(name: str, pretrained: str | None, cache_dir: str | None = None) -> None:
    """Raises WeightsUnavailableError (one line: what is missing, where open_clip looked, what to
    do) unless `pretrained` is None (random weights), a file, or a tag of `name` whose weights are
    cached or can be downloaded now."""
    if not pretrained or Path(pretrained).is_file() or ":" in name:  # `hf-hub:` names ignore `pretrained`
        return
    source = open_clip.get_pretrained_cfg(name, pretrained)
    if not source:
        if Path(pretrained).suffix in WEIGHT_SUFFIXES or os.sep in pretrained:
            raise WeightsUnavailableError(
                f"model.pretrained={pretrained}: no such file; give the path of a weights file"
            )
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise WeightsUnavailableError(
            f"model.pretrained={pretrained} is neither a file nor a tag of model.name={name} (its tags: "
            f"{tags}); give a tag or a local weights file"
        )
    if source.get("file"):  # a tag registered with a local file
        return
    hub = source.get("hf_hub") if has_hf_hub() else ""
    if hub:
        repo_id, filename = os.path.split(hub)
        files = (HF_SAFE_WEIGHTS_NAME, filename or HF_WEIGHTS_NAME)  # open_clip tries safetensors first
        found = [huggingface_hub.try_to_load_from_cache(repo_id, f, cache_dir=cache_dir) for f in files]
        if any(isinstance(path, str) for path in found):  # a path; otherwise None or a "known missing" mark
            return
        cache = cache_dir or hub_constants.HF_HUB_CACHE
        origin = f"{hub_constants.ENDPOINT}/{repo_id}"
        reason = _hub_offline() or _unreachable(hub_constants.ENDPOINT)
    elif source.get("url"):
        origin = source["url"]
        cache = cache_dir or os.path.expanduser("~/.cache/clip")  # open_clip's default for URLs
        if Path(cache, os.path.basename(origin)).is_file():
            return
        reason = _unreachable(origin)
    else:  # nothing to download: open_clip says what it makes of the tag
        return
    if reason is None:
        return
    file = f" (e.g. {os.path.basename(source['url'])} from {source['url']})" if source.get("url") else ""
    raise WeightsUnavailableError(
        f"model.pretrained={pretrained}: the {name} weights are not in open_clip's cache ({cache}) and "
        f"cannot be downloaded from {origin} now ({reason}); give a local file with "
        f"model.pretrained=<file>{file}, or run once with network (model.cache_dir=<folder> sets the "
        "cache), or use model=tiny for a random-weight test model"
    )


def _hub_offline() -> str | None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() not in FALSE_VALUES:
            return f"{variable}={os.environ[variable]}"
    return None


def _unreachable(url: str) -> str | None:
    """Why a connection to `url`'s host (or the proxy that reaches it) fails, None if it opens."""
    target = urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy:
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return _connect(target.hostname or "", target.port or (443 if target.scheme == "https" else 80))


@functools.cache  # one probe per host and process: a sweep's runs share the answer
def _connect(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"no connection to {host}:{port}: {err.strerror or err}"
