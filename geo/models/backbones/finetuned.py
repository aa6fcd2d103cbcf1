"""A backbone fine-tuned by ``geo finetune``: its MODEL_DIR holds the card and the weights, nothing else.

``geo build-index --backbone MODEL_DIR`` (the registry turns a directory holding a card into
``finetuned:MODEL_DIR``) rebuilds the base network the card names, then loads every one of its tensors from
``model.safetensors``; the bundle records the model as ``finetuned:NAME`` (the folder's name) and that file's
sha256 and path like any other weights.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from geo.models.registry import MODEL_CARD, Backbone, BackboneError, load_backbone, register_backbone
from geo.models.weights import file_sha256, file_weights, read_state_dict

CARD_FORMAT = "geo-finetuned-model"


def read_card(root: str | Path) -> dict:
    path = Path(root) / MODEL_CARD
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackboneError(f"{root}: not a `geo finetune` model directory (no {MODEL_CARD})") from None
    except (OSError, ValueError) as e:
        raise BackboneError(f"{path}: not a readable model card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise BackboneError(f"{path}: not a `geo finetune` model card (format {card.get('format')!r})"
                            if isinstance(card, dict) else f"{path}: not a model card")
    return card


def _check_card_sha(card: dict, path: Path) -> None:
    """The weights are the ones the card was written for: a changed ``model.safetensors`` (a bad copy, flipped
    bytes) would otherwise load, build a bundle and only be caught, if at all, when a query compares hashes."""
    want = card.get("weights_sha256")
    if not isinstance(want, str):
        raise BackboneError(f"{path.parent / MODEL_CARD}: records no weights_sha256 for {path.name}")
    try:
        got = file_sha256(path)
    except OSError as e:
        raise BackboneError(f"{path}: cannot be read ({e.strerror or e})") from None
    if got != want:
        raise BackboneError(f"{path}: sha256 {got[:12]}... is not the {want[:12]}... that {MODEL_CARD} records "
                            "(the file changed since `geo finetune` wrote it); copy the model directory again")


def _model_dir(spec: str, weights: str | None) -> Path:
    """The MODEL_DIR: the folder of the weights file a bundle recorded where it holds the card, else ``spec``
    (``--backbone my-model/``). A bundle names the model ``finetuned:NAME`` (the folder's name, not where it was
    on the machine that built it) and identifies it by its weights' sha256, which every load checks."""
    if weights and (Path(weights).parent / MODEL_CARD).exists():
        return Path(weights).parent
    return Path(spec)


def _load_finetuned(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    if not spec:
        raise BackboneError("finetuned: needs the model directory, e.g. --backbone my-model/ (from geo finetune)")
    root = _model_dir(spec, weights)
    card = read_card(root)
    path = Path(weights) if weights else root / card["weights"]
    with warnings.catch_warnings():  # a random-init base warns; every tensor is replaced just below
        warnings.simplefilter("ignore")
        base = load_backbone(card["base"], device="cpu", precision="fp32")
    if not weights:
        _check_card_sha(card, path)
    state = read_state_dict(path)
    try:
        base.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BackboneError(f"{path}: does not fit {card['base']!r} ({str(e).splitlines()[0]})") from None
    return Backbone(f"finetuned:{root.resolve().name}", base.dim, base.preprocess, base.model,
                    file_weights(path, source=f"geo finetune of {card['base']}"), inference=base.inference)


register_backbone("finetuned", _load_finetuned, "MODEL_DIR from `geo finetune` (also accepted as the bare "
                  "directory)")
