"""Model hubs stay offline unless the user asks: geo never downloads weights on its own.

open_clip resolves pretrained tags and ``hf-hub:`` names through the Hugging
Face hub, which retries the network for about a minute before it gives up on
a machine without one. Whether this process may download is decided once, by
:func:`configure_hub`, which every loader that could reach a hub calls before
it loads: without ``GEO_ALLOW_DOWNLOAD`` the hub library is set offline
(``HF_HUB_OFFLINE``, in the environment and in ``huggingface_hub.constants``)
for the rest of the process, so it answers from its cache or fails at once,
and the loader turns that into :class:`WeightsNotLocal` with the steps to get
the files onto the machine. Nothing is switched back and forth around a load,
so concurrent loads (``geo serve``'s threads) never see the hub half-set.
``geo build-index --allow-download`` calls :func:`allow_downloads` before
anything loads (``GEO_ALLOW_DOWNLOAD=1`` does the same for the Python API).
"""
from __future__ import annotations

import os
import threading

from geo.models.registry import BackboneError

ALLOW_ENV = "GEO_ALLOW_DOWNLOAD"

_lock = threading.Lock()
_decision: bool | None = None  # whether this process may download, once configure_hub decided (None: not yet)


class WeightsNotLocal(BackboneError):
    """The weights a backbone names are not on this machine, and downloading was not asked for."""


def downloads_allowed() -> bool:
    """Whether this process was asked to allow downloads (``GEO_ALLOW_DOWNLOAD``); :func:`configure_hub` turns
    the answer into the process's one decision."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_downloads() -> None:
    """What ``--allow-download`` does: this process may fetch model weights from their hubs.

    It takes effect only before the first load that could reach a hub. Once that load has set the hub offline,
    this raises RuntimeError instead of turning the hub back online under loads that may be running in other
    threads: call it first, or set ``GEO_ALLOW_DOWNLOAD=1`` before starting the process.
    """
    with _lock:
        if _decision is False:
            raise RuntimeError("allow_downloads() came after a model load already set the hub offline for this "
                               f"process; call it before loading any model, or set {ALLOW_ENV}=1 at start")
        os.environ[ALLOW_ENV] = "1"


def configure_hub() -> bool:
    """Set the Hugging Face hub online or offline for the whole process, once, from :func:`downloads_allowed`,
    and return that decision (whether downloads are allowed). The first call decides; later calls only read it,
    so a load never changes what another thread's load sees."""
    global _decision
    with _lock:
        if _decision is None:
            import huggingface_hub.constants as hub  # a dependency of open_clip and timm

            allowed = downloads_allowed()
            os.environ["HF_HUB_OFFLINE"] = "0" if allowed else "1"  # for processes this one starts
            hub.HF_HUB_OFFLINE = not allowed  # read at import: the environment alone is too late for this one
            _decision = allowed
        return _decision


def how_to_get(name: str, repo: str | None, include: str | None, cache_dir: str | None) -> str:
    """The message for weights that are not here: what to run, on which machine, and where to put it.

    ``include`` is the pattern of the repo's files the loader reads (None: the whole repo).
    """
    import huggingface_hub.constants as hub

    where = cache_dir or hub.HF_HUB_CACHE
    steps = [f"{name}: its weights are not on this machine, and geo downloads nothing unless asked.",
             f"  - to fetch them now: add --allow-download (or set {ALLOW_ENV}=1); they go to {where}"]
    if repo:
        command = " ".join(["hf download", repo, *([f"--include '{include}'"] if include else []), "--cache-dir DIR"])
        steps.append(f"  - or, on a machine with a network: `{command}`, copy DIR here and set HF_HUB_CACHE=DIR")
    steps.append("  - or use open_clip:local-dir:DIR, a folder with open_clip_config.json and the weights")
    steps.append("  - README, 'Stronger models', has the steps for CLIP ViT-L/14 + GeoCLIP")
    return "\n".join(steps)
