"""Model hubs stay offline unless the user asks: geo never downloads weights on its own.

open_clip resolves pretrained tags and ``hf-hub:`` names through the Hugging
Face hub, which retries the network for about a minute before it gives up on
a machine without one. Every load that could reach a hub runs inside
:func:`hub_offline`: the hub library answers from its cache or fails at once,
and the loader turns that into :class:`WeightsNotLocal` with the steps to get
the files onto the machine. ``geo build-index --allow-download`` (or
``GEO_ALLOW_DOWNLOAD=1`` for the Python API) lifts it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from geo.models.registry import BackboneError

ALLOW_ENV = "GEO_ALLOW_DOWNLOAD"


class WeightsNotLocal(BackboneError):
    """The weights a backbone names are not on this machine, and downloading was not asked for."""


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_downloads() -> None:
    """What ``--allow-download`` does: this process may fetch model weights from their hubs."""
    os.environ[ALLOW_ENV] = "1"


@contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face hub answers from its cache only, for the duration (unless downloads are allowed)."""
    if downloads_allowed():
        yield
        return
    import huggingface_hub.constants as hub  # a dependency of open_clip and timm

    before_env, before = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


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
