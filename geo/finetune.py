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
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


from geo.core.geodesy import THRESHOLDS_KM, haversine_km, latlon_to_xyz
from geo.core.knn_vote import kde_vote
from geo.core.progress import bar, detail
from geo.core.runtime import resolve_device
from geo.core.splits import group_column, validation_mask
from geo.data.images import ImageDataset
from geo.data.manifest import ManifestError, read_manifest
from geo.models.backbones import Backbone, BackboneError, load_backbone
from geo.models.backbones.finetuned import CARD_FORMAT
from geo.models.location import ImageProjection, LocationEncoder
from geo.models.registry import MODEL_CARD
from geo.models.weights import file_sha256
from geo.stages.cells.partition import build_partitions, cell_table, default_taus, locate
from geo.stages.cells.train import smoothed_targets
from geo.store.atomic import atomic_save_safetensors, atomic_write_json

Log = Callable[[str], None]
MIN_PHOTOS = 8


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    image_root: str | None = None
    group_column: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4  # the backbone's; the new heads learn 10x faster
    weight_decay: float = 1e-4
    freeze_until: str | None = None  # parameters before the first whose name starts with this stay fixed
    smoothing_km: float = 75.0  # PIGEON's tau for haversine label smoothing
    partitioner: str = "adaptive"  # the cells the heads classify into: adaptive (S2) | semantic (PIGEON)
    regression_weight: float = 0.0
    contrastive_weight: float = 0.0  # GeoCLIP's image-to-GPS InfoNCE against its frozen location encoder
    augment: bool = True
    patience: int = 2
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"

    def fingerprint(self, manifest_digest: str) -> str:
        """What must match for a checkpoint to be resumed (epochs and patience may change). Settings at their
        defaults are left out, so an option added later with a neutral default keeps old checkpoints valid."""
        defaults = FinetuneConfig()
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("epochs", "patience", "device") and v != getattr(defaults, k)}
        return hashlib.sha256(json.dumps([keep, manifest_digest], sort_keys=True).encode()).hexdigest()[:16]


class _Heads(torch.nn.Module):
    """One linear classifier per partition, the optional unit-sphere regression head and the optional projection
    into GeoCLIP's location space (with its learnable logit scale)."""

    def __init__(self, dim: int, cells: list[int], regression: bool, contrastive: bool):
        super().__init__()
        self.cells = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in cells)
        self.xyz = torch.nn.Linear(dim, 3) if regression else None
        self.proj = ImageProjection(in_dim=dim, out_dim=512, hidden=dim) if contrastive else None

    def forward(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        xyz = F.normalize(self.xyz(f), dim=1) if self.xyz is not None else None
        gps = F.normalize(self.proj(f), dim=1) if self.proj is not None else None
        return [h(f) for h in self.cells], xyz, gps


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Horizontal flip and a random crop of 70-100 % of the side, resized back: seeded, so a resumed run sees
    the same pixels as an uninterrupted one."""
    n, _, s, _ = x.shape
    out = torch.empty_like(x)
    flips, scales = rng.random(n) < 0.5, rng.uniform(0.7, 1.0, n)
    offsets = rng.random((n, 2))
    for i in range(n):
        side = max(8, int(round(s * scales[i])))
        top, left = int(offsets[i, 0] * (s - side)), int(offsets[i, 1] * (s - side))
        crop = x[i:i + 1, :, top:top + side, left:left + side]
        if side != s:
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        out[i] = crop[0].flip(-1) if flips[i] else crop[0]
    return out


def probe_heads(model: torch.nn.Module, heads: "_Heads", images: torch.Tensor, train: np.ndarray,
                loss_of_features: Callable, cfg: FinetuneConfig, device: torch.device, steps_per_photo: int = 30) -> None:
    """Train the new heads on the frozen network's features (computed once) before the network moves:
    fine-tuning then starts from sensible heads instead of random ones, which would push noise back into
    the pretrained layers (LP-FT, Kumar et al. 2022)."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model(images[train[s:s + cfg.batch_size]].to(device).float()).flatten(1).float()
                           for s in range(0, len(train), cfg.batch_size)])
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 0])
    batch = min(64, len(train))
    for _ in range(max(1, steps_per_photo * len(train) // batch)):
        pick = rng.choice(len(train), batch, replace=False)
        loss, _ = loss_of_features(feats[pick], train[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _freeze(model: torch.nn.Module, until: str | None) -> int:
    """Fix every parameter before the first whose name starts with ``until``; returns how many stay trainable."""
    if until is None:
        return sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    first = next((i for i, n in enumerate(names) if n.startswith(until)), None)
    if first is None:
        raise ValueError(f"--freeze-until {until!r} names no parameter of this backbone; its first are "
                         f"{', '.join(names[:3])} ... and its blocks {sorted({n.split('.')[0] for n in names})}")
    for i, (_, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i >= first)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _bn_eval(model: torch.nn.Module) -> None:
    """Batch statistics of 16-64 photos are noise: fine-tuning keeps the pretrained BatchNorm statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _decode(paths: list[str], bb: Backbone, log: Log) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Every photo once, through the query's own preprocessing (float16 in memory); failures reported."""
    ds = ImageDataset(paths, bb.preprocess, crops=1)
    size = bb.preprocess.size
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.float16)
    ok, failed = [], []
    progress = bar(len(paths), "decode", "img")
    for i in range(len(paths)):
        _, t, reason = ds[i]
        if t is None:
            failed.append((i, reason))
        else:
            out[i] = t[0].half()
            ok.append(i)
        progress.update(1)
    progress.close()
    for i, reason in failed[:5]:
        log(f"finetune: {paths[i]}: {reason}")
    return out, ok, failed


def _state(model: torch.nn.Module, heads: _Heads, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights, heads and AdamW moments as one flat tensor dict (safetensors: nothing is pickled)."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    out.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        st = opt.state.get(p)
        if st:
            out.update({f"opt.{i}.exp_avg": st["exp_avg"], f"opt.{i}.exp_avg_sq": st["exp_avg_sq"],
                        f"opt.{i}.step": torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)})
    return out


def _restore(state: dict[str, torch.Tensor], model: torch.nn.Module, heads: _Heads, opt: torch.optim.Optimizer) -> None:
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        if f"opt.{i}.exp_avg" in state:
            # the moments live where the parameter does (a checkpoint loads on the CPU; AdamW's step stays there)
            opt.state[p] = {"step": torch.tensor(float(state[f"opt.{i}.step"][0])),
                            "exp_avg": state[f"opt.{i}.exp_avg"].to(p.device, copy=True),
                            "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(p.device, copy=True)}


def finetune(manifest: str, out: str | Path, cfg: FinetuneConfig = FinetuneConfig(), log: Log = print) -> dict[str, Any]:
    """Fine-tune ``cfg.backbone`` on the manifest's photos into ``out`` (MODEL_DIR); returns the card."""
    out = Path(out)
    man = read_manifest(manifest, cfg.image_root)
    df = man.df.reset_index(drop=True)
    if len(df) < MIN_PHOTOS:
        raise ManifestError(f"{man.source}: {len(df)} usable photos; fine-tuning needs at least {MIN_PHOTOS}")
    col = group_column(df.columns, cfg.group_column)
    groups = df[col].astype(str).to_numpy() if col else None
    held = validation_mask(len(df), groups, cfg.val_fraction, cfg.seed)
    if not held.any() or held.all():
        raise ManifestError(f"{man.source}: cannot hold out photographers for validation ({col or 'no group column'})")
    device = resolve_device(cfg.device)
    bb = load_backbone(cfg.backbone, device="cpu", precision="fp32", weights=cfg.weights)
    if not isinstance(bb.model, torch.nn.Module):
        raise BackboneError(f"{cfg.backbone}: not a torch module; it cannot be fine-tuned")
    log(f"finetune: {len(df):,} photos ({(~held).sum():,} train, {held.sum():,} validation"
        f"{f', whole {col} groups' if col else ', at random: no photographer column'}); base {bb.name}")

    images, ok, failed = _decode(df["path"].tolist(), bb, log)
    usable = np.zeros(len(df), bool)
    usable[ok] = True
    train, val = np.flatnonzero(usable & ~held), np.flatnonzero(usable & held)
    usable_rows = np.flatnonzero(usable)
    if len(train) < MIN_PHOTOS // 2 or len(val) < 1:
        raise ManifestError(f"{man.source}: {len(train)} training and {len(val)} validation photos decode; too few")
    lat, lon = df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64)

    # cells from the training photos only; each photo's smoothed targets against every cell's centre
    tau_min, tau_max = default_taus(len(train))
    parts = build_partitions(lat[train], lon[train], tau_min, tau_max, cfg.partitioner, seed=cfg.seed)
    located = locate(parts, lat[train], lon[train])
    targets, centres = [], []
    photo_xyz = torch.from_numpy(latlon_to_xyz(lat, lon))
    for k, p in enumerate(parts):  # the cells' centres are their training photos' spherical means (Class2GPS), as in the stage
        table = cell_table(p, located[:, k], lat[train], lon[train], {}, {})
        clat, clon = table["lat"].to_numpy(np.float64), table["lon"].to_numpy(np.float64)
        centres.append((clat, clon))
        targets.append(smoothed_targets(photo_xyz, torch.from_numpy(latlon_to_xyz(clat, clon)),
                                        cfg.smoothing_km).float())
    xyz_true = photo_xyz.float()

    model = bb.model.to(device).float()
    trainable = _freeze(model, cfg.freeze_until)
    with torch.random.fork_rng(devices=[]):  # the heads start the same in every run of this config
        torch.manual_seed(cfg.seed)
        heads = _Heads(bb.dim, [p.n_cells for p in parts], cfg.regression_weight > 0,
                       cfg.contrastive_weight > 0).to(device)
    train_pos = np.full(len(df), -1, np.int64)
    train_pos[train] = np.arange(len(train))
    train_gps = None
    if cfg.contrastive_weight > 0:  # every training photo's location in GeoCLIP's space (frozen, encoded once)
        train_gps = torch.from_numpy(LocationEncoder.from_geoclip().encode(
            np.stack([lat[train], lon[train]], 1), normalize=True)).to(device)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr},
                             {"params": list(heads.parameters()), "lr": cfg.lr * 10}], weight_decay=cfg.weight_decay)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def loss_of(x: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with amp:
            feats = model(x.to(device).float()).flatten(1)
        return loss_of_features(feats.float(), rows)

    def loss_of_features(feats: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, xyz, gps = heads(feats)
        idx = torch.from_numpy(rows)
        loss = torch.stack([-(t[idx].to(device) * F.log_softmax(lg.float(), 1)).sum(1).mean()
                            for lg, t in zip(logits, targets)]).mean()
        if xyz is not None:
            loss = loss + cfg.regression_weight * (1 - (xyz.float() * xyz_true[idx].to(device)).sum(1)).mean()
        if gps is not None:
            own = torch.from_numpy(train_pos[rows])
            mine = own >= 0  # validation photos have no place among the training locations
            if mine.any():
                scores = heads.proj.logit_scale.exp() * gps[mine.to(gps.device)].float() @ train_gps.T
                loss = loss + cfg.contrastive_weight * F.cross_entropy(scores, own[mine].to(device))
        return loss, logits

    @torch.no_grad()
    def validate() -> dict[str, float]:
        """The held-out loss, and what the bundle will do with these embeddings: each validation photo located
        by a kNN vote among the training photos (``score``: mean accuracy at 25/200/750/2500 km selects
        the epoch kept, since a bundle retrieves with the embeddings and discards the heads)."""
        model.eval()
        losses, feats = [], []
        for s in range(0, len(usable_rows), cfg.batch_size):
            rows = usable_rows[s:s + cfg.batch_size]
            with amp:
                f = model(images[rows].to(device).float()).flatten(1).float()
            feats.append(F.normalize(f, dim=1).cpu())
            inval = np.isin(rows, val)
            if inval.any():
                loss, _ = loss_of_features(f[torch.from_numpy(inval)], rows[inval])
                losses.append(float(loss) * int(inval.sum()))
        emb = torch.cat(feats).numpy()
        pos = {r: i for i, r in enumerate(usable_rows)}
        tv, vv = emb[[pos[r] for r in train]], emb[[pos[r] for r in val]]
        sims = vv @ tv.T
        top = np.argsort(-sims, 1)[:, :10]
        d = np.empty(len(val))
        for i, nb in enumerate(top):
            v = kde_vote(lat[train][nb], lon[train][nb], sims[i, nb])
            d[i] = haversine_km(v.lat, v.lon, lat[val[i]], lon[val[i]])
        scores = {"loss": sum(losses) / len(val), "knn_median_km": float(np.median(d))}
        scores.update({f"knn_acc_{t}km": float((d <= t).mean()) for t in THRESHOLDS_KM})
        scores["score"] = float(np.mean([scores[f"knn_acc_{t}km"] for t in (25, 200, 750, 2500)]))
        return scores

    digest = hashlib.sha256(json.dumps([df["id"].astype(str).tolist(), lat.tolist(), lon.tolist()]).encode()).hexdigest()
    fingerprint = cfg.fingerprint(digest)
    ck_json, ck_state = out / "checkpoint" / "state.json", out / "checkpoint" / "state.safetensors"
    history: list[dict[str, float]] = []
    best, best_epoch, waited, start = -math.inf, -1, 0, 0
    if ck_json.exists():
        ck = json.loads(ck_json.read_text())
        if ck.get("fingerprint") != fingerprint:
            raise ManifestError(f"{out}: holds a checkpoint of another run (other photos or settings); "
                                "choose another --out or delete it")
        _restore(load_file(str(ck_state)), model, heads, opt)
        history, best, best_epoch, waited = ck["history"], ck["best"], ck["best_epoch"], ck["waited"]
        start = len(history)  # history[0] is epoch 0 (the probe), so the next epoch is len(history)
        log(f"finetune: resumed after epoch {start - 1} (best held-out score {best:.4f} at epoch {best_epoch})")
    if start == 0:  # epoch 0: the heads alone on frozen features (a linear probe), then fine-tuning (LP-FT)
        t0 = time.perf_counter()
        probe_heads(model, heads, images, train, loss_of_features, cfg, device)
        history.append({"epoch": 0, **validate(), "seconds": round(time.perf_counter() - t0, 1)})
        best, best_epoch = history[0]["score"], 0
        atomic_save_safetensors(out / "model.safetensors", model.state_dict())
        start = 1
        log(f"finetune: the frozen backbone: held-out kNN median {history[0]['knn_median_km']:.0f} km, score "
            f"{best:.4f} (heads' loss {history[0]['loss']:.3f}); {trainable:,} parameters to fine-tune")

    for epoch in range(start, cfg.epochs + 1):
        if waited >= cfg.patience:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = train[rng.permutation(len(train))]
        model.train()
        _bn_eval(model)
        progress = bar(len(order), f"epoch {epoch}/{cfg.epochs}", "img")
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            x = images[rows].float()
            loss, _ = loss_of(_augment(x, rng) if cfg.augment else x, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.update(len(rows))
            progress.set_postfix_str(f"loss {loss.item():.3f}")
        progress.close()
        scores = validate()
        history.append({"epoch": epoch, **scores, "seconds": round(time.perf_counter() - t0, 1)})
        if scores["score"] > best + 1e-4:
            best, best_epoch, waited = scores["score"], epoch, 0
            atomic_save_safetensors(out / "model.safetensors", model.state_dict())
        else:
            waited += 1
        atomic_save_safetensors(ck_state, _state(model, heads, opt))
        atomic_write_json(ck_json, {"fingerprint": fingerprint, "history": history, "best": best,
                                    "best_epoch": best_epoch, "waited": waited})
        log(f"finetune: epoch {epoch}: held-out kNN median {scores['knn_median_km']:.0f} km, "
            + " ".join(f"{t} km {scores[f'knn_acc_{t}km']:.1%}" for t in (25, 200, 750, 2500))
            + f", loss {scores['loss']:.3f} ({history[-1]['seconds']:.0f} s)"
            + ("  best" if best_epoch == epoch else f"  no better for {waited}"))
        detail(log, json.dumps(history[-1]))
    if waited >= cfg.patience:
        log(f"finetune: stopped early: no better held-out score for {waited} epochs")

    card = {
        "format": CARD_FORMAT, "version": 1, "base": cfg.backbone, "base_weights": bb.weights,
        "dim": bb.dim, "preprocess": bb.preprocess.to_dict(), "weights": "model.safetensors",
        "weights_sha256": file_sha256(out / "model.safetensors"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {"manifest": str(man.source), "photos": len(df), "train": int(len(train)),
                     "validation": int(len(val)), "failed": len(failed), "group_column": col,
                     "photographers": int(len(np.unique(groups))) if groups is not None else None,
                     "cells": {p.name: p.n_cells for p in parts}, "trainable_parameters": trainable,
                     "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"},
                     "device": str(device)},
        "validation": {"best_epoch": best_epoch, "best": history[best_epoch], "base": history[0], "history": history},
    }
    atomic_write_json(out / MODEL_CARD, card)
    return card
