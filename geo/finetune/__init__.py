"""``geo finetune``: teach an image backbone where photos are, on the same manifests ``geo build-index`` reads.

Why: a frozen ImageNet network knows objects, not places; every strong geolocation system fine-tunes on
geotagged photos (PlaNet, Müller-Budack et al., PIGEON, GeoCLIP). The objective here is PIGEON's:
cross-entropy over geo's cells (adaptive S2, or PIGEON's semantic cells) at every partition, with *haversine label smoothing* (the target
spreads over cells by exp(-(d(cell) - d(true cell)) / tau), tau = 75 km), so a near miss costs little and
the network learns geography, not cell ids. An optional coordinate-regression term (``regression_weight``)
adds a unit-sphere head (Manocchio & Passaro), and an optional GPS-contrastive term (``contrastive_weight``)
is GeoCLIP's: a projection of the image features must pick the photo's own location, encoded by GeoCLIP's
published (frozen) location encoder, out of every training photo's location. The heads and the projection
are discarded afterwards: the bundle fits its own.

Validation holds out whole photographers (:func:`geo.core.splits.validation_mask`, as the build does) and
measures what a bundle will do with the embeddings: each held-out photo located by a kNN vote among the
training photos. Training stops early when that stops improving, and the best epoch's weights are kept. Each
epoch ends with an atomic checkpoint (weights, optimizer moments, history), so an interrupted run resumes
where it stopped and ends in the same state as an uninterrupted one (data order and augmentation are seeded
per epoch). Photos are decoded once into memory (float16), with geo's own preprocessing, so the model
learns from exactly the pixels a query will show it.

MODEL_DIR after a run::

    geo-model.json                 the card: base backbone, preprocessing, training data, validation scores
    model.safetensors              the fine-tuned backbone (every tensor; heads excluded)
    checkpoint/state.safetensors   last epoch's weights, heads and optimizer moments (resume)
    checkpoint/state.json          last finished epoch, best so far, history, the run's fingerprint

One module per role (as clip-retrieval's clip_inference has reader, mapper, writer, runner):

    config      FinetuneConfig: the settings (tuned constants as data), their checks, the resume fingerprint,
                and read_config for ``geo finetune --config FILE`` (JSON or TOML)
    data        manifest -> photos split by photographer -> pixels, cells and smoothed targets
    model       the heads (discarded afterwards), freezing, augmentation
    trainer     Trainer: model + heads + AdamW, the probe, an epoch, validation by kNN
    checkpoint  per-epoch save and resume (Progress, the fingerprint check, AdamW moments on their device)
    card        model.safetensors and geo-model.json
    runner      finetune(): the roles in order, and the log lines
"""
from geo.finetune.config import FinetuneConfig, read_config
from geo.finetune.runner import finetune

__all__ = ["FinetuneConfig", "finetune", "read_config"]
