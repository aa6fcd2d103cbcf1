"""Contrastive training of the image projection and location encoder on stored embeddings.

Images never pass through the backbone again: the bundle's embeddings are the
inputs. The loss is GeoCLIP's image-to-GPS InfoNCE with a learnable
temperature and a queue of recent GPS negatives; the queue holds location
*features* (MoCo style) rather than coordinates, so a step encodes only the
batch's coordinates — re-encoding 4,096 queued points per step is what would
make CPU training take hours.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.priors import photos_within
from geo.core.progress import bar, detail
from geo.core.runtime import resolve_device
from geo.core.splits import validation_mask
from geo.models.location import GEOCLIP_SIGMAS, ImageProjection, LocationEncoder

KM_PER_DEG = 111.195
VAL_THRESHOLDS_KM = tuple(float(t) for t in THRESHOLDS_KM[1:])  # 1 km is beyond a gallery point's reach


@dataclass
class TrainConfig:
    init: str = field(default="geoclip", metadata={"help": "location encoder start: 'geoclip' (GeoCLIP's published "
                                                          "weights) or 'random'"})
    sigmas: tuple[float, ...] = field(default=GEOCLIP_SIGMAS, metadata={
        "help": "RFF scales in Equal Earth units, one branch each (GeoCLIP: 1,16,256; add 4096 for finer "
                "resolution). With --gallery-init geoclip, sigmas beyond GeoCLIP's are added as new branches"})
    image_init: str = field(default="random", metadata={
        "help": "image projection start: 'random'; 'geoclip' (GeoCLIP's MLP, only for CLIP ViT-L/14 768-d "
                "features); 'identity' (residual, for embeddings already in GeoCLIP's space)"})
    epochs: int = field(default=40, metadata={"help": "maximum training rounds (0: keep the initial weights); a round "
                                                      "is one pass over the training photos, or round_photos of them "
                                                      "when there are more"})
    round_photos: int = field(default=10_000, metadata={
        "help": "photos per training round: training cost is bounded by epochs x round_photos whatever the gallery "
                "size; successive rounds go on through one shuffled order of all photos"})
    val_photos_max: int = field(default=5000, metadata={"help": "held-out photos scored after each round (a sample above)"})
    val_candidates_max: int = field(default=20_000, metadata={
        "help": "distinct photo places offered as answers when validating (a uniform sample above)"})
    batch_size: int = field(default=256, metadata={"help": "photos per contrastive batch"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the image projection"})
    location_lr: float = field(default=1e-5, metadata={"help": "learning rate of the location encoder (0 freezes it)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    hidden: int = field(default=1024, metadata={"help": "hidden width of the image projection MLP"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the image projection (regularises small galleries)"})
    queue_size: int = field(default=4096, metadata={"help": "recent GPS negatives kept between batches (GeoCLIP: 4096)"})
    jitter_km: float = field(default=10.0, metadata={"help": "std of the Gaussian GPS jitter applied to training "
                                                             "coordinates, km"})
    symmetric: bool = field(default=False, metadata={"help": "add the GPS-to-image InfoNCE term"})
    prior_weight: float = field(default=2.0, metadata={
        "help": "weight of log photo density added to each gallery point's logit (0: pure cosine). InfoNCE "
                "against photo-distributed negatives learns log p(point|image)/p(point), so adding log p(point) "
                "turns the score into a posterior"})
    prior_radius_km: float = field(default=750.0, metadata={"help": "radius of the photo-count density behind the prior"})
    val_fraction: float = field(default=0.2, metadata={"help": "fraction of rows held out (in whole groups) for early stopping"})
    patience: int = field(default=6, metadata={"help": "epochs without validation improvement before stopping"})
    val_gallery_max: int = field(default=4096, metadata={"help": "extra gallery points sampled as validation candidates"})
    seed: int = field(default=0, metadata={"help": "seed for the split, initialisation, batches and jitter"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when present), 'cpu' or 'cuda'"})


@dataclass
class TrainResult:
    location_encoder: LocationEncoder
    image_projection: ImageProjection
    metrics: dict


def jitter(latlon: torch.Tensor, km: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian displacement of ``km`` standard deviation, so a location's neighbourhood is also a positive."""
    if km <= 0:
        return latlon
    noise = torch.randn(latlon.shape, generator=gen, device="cpu").to(latlon) * (km / KM_PER_DEG)
    lat = (latlon[:, 0] + noise[:, 0]).clamp(-90.0, 90.0)
    coslat = torch.cos(torch.deg2rad(latlon[:, 0])).clamp_min(0.05)
    lon = torch.remainder(latlon[:, 1] + noise[:, 1] / coslat + 180.0, 360.0) - 180.0
    return torch.stack([lat, lon], 1)


def log_density(points: np.ndarray, photos: np.ndarray, radius_km: float, seed: int = 0) -> np.ndarray:
    """log(1 + number of photos within ``radius_km``) at each point: the photo prior p(point), up to a constant."""
    return np.log1p(photos_within(points, photos, radius_km, seed=seed)).astype(np.float32)


def build_modules(config: TrainConfig, in_dim: int) -> tuple[LocationEncoder, ImageProjection]:
    """The initial location encoder and image projection the config asks for."""
    if config.init == "geoclip":
        missing = [s for s in GEOCLIP_SIGMAS if s not in config.sigmas]
        if missing:
            raise ValueError(f"--gallery-init geoclip keeps GeoCLIP's sigmas {GEOCLIP_SIGMAS}; sigmas may add scales, "
                             f"not drop {missing}")
        loc = LocationEncoder.from_geoclip(extra_sigmas=[s for s in config.sigmas if s not in GEOCLIP_SIGMAS])
    elif config.init == "random":
        loc = LocationEncoder(sigmas=config.sigmas, seed=config.seed)
    else:
        raise ValueError(f"gallery init must be 'geoclip' or 'random', not {config.init!r}")
    if config.image_init == "geoclip":
        if in_dim != 768:
            raise ValueError(f"image_init 'geoclip' needs CLIP ViT-L/14 768-d embeddings, these are {in_dim}-d")
        proj = ImageProjection.from_geoclip()
    elif config.image_init == "identity":
        proj = ImageProjection(in_dim, loc.out_dim, config.hidden, config.dropout, residual=True)
    elif config.image_init == "random":
        proj = ImageProjection(in_dim, loc.out_dim, config.hidden, config.dropout)
    else:
        raise ValueError(f"image_init must be 'random', 'geoclip' or 'identity', not {config.image_init!r}")
    return loc, proj


@torch.no_grad()
def gallery_accuracy(proj: ImageProjection, cand_feat: torch.Tensor, cand_latlon: np.ndarray, cand_bias: torch.Tensor,
                     emb: torch.Tensor, latlon: np.ndarray,
                     thresholds: Sequence[float] = VAL_THRESHOLDS_KM, chunk: int = 512) -> dict[str, float]:
    """Accuracy of answering each image with its best-scoring candidate point (the query-time rule).

    Scored ``chunk`` images at a time: 5,000 validation photos against 20,000 candidates at once was an
    800 MB score matrix (twice, with the bias), more than the training itself holds.
    """
    proj.eval()
    scale = proj.logit_scale.exp()
    best = np.concatenate([(scale * F.normalize(proj(emb[i:i + chunk]), dim=1) @ cand_feat.T + cand_bias)
                           .argmax(1).cpu().numpy() for i in range(0, len(emb), chunk)])
    err = haversine_km(latlon[:, 0], latlon[:, 1], cand_latlon[best, 0], cand_latlon[best, 1])
    out = {f"acc_{int(t)}km": float((err <= t).mean()) for t in thresholds}
    out["median_km"] = float(np.median(err))
    out["score"] = float(np.mean([out[f"acc_{int(t)}km"] for t in thresholds]))
    return out


def train_gallery(emb: np.ndarray, latlon: np.ndarray, groups: np.ndarray | None, config: TrainConfig,
                  extra_latlon: np.ndarray | None = None, log=print, val: np.ndarray | None = None) -> TrainResult:
    """Train (or, with epochs=0, just build) the gallery modules; early-stops on held-out groups.

    ``extra_latlon`` are gallery points without photos; a sample of them joins
    the validation candidates so early stopping sees the same choice queries will.
    ``val``: bool [n], the held-out photographers (default: the shared validation mask over ``groups``).
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    latlon = np.asarray(latlon, dtype=np.float64)
    if emb.ndim != 2 or latlon.shape != (len(emb), 2):
        raise ValueError(f"train_gallery: emb {emb.shape} and latlon {latlon.shape} do not pair up")
    torch.manual_seed(config.seed)
    loc, proj = build_modules(config, emb.shape[1])
    metrics: dict = {"n": int(len(emb)), "init": config.init, "image_init": config.image_init, "epochs_run": 0}
    if config.epochs <= 0:
        return TrainResult(loc.eval(), proj.eval(), metrics)

    dev = resolve_device(config.device)
    loc.to(dev), proj.to(dev)
    va = validation_mask(len(emb), groups, config.val_fraction, config.seed) if val is None else np.asarray(val, bool)
    tr = ~va
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    x_tr = torch.from_numpy(emb[tr]).to(dev)
    g_tr = torch.from_numpy(latlon[tr].astype(np.float32)).to(dev)
    # Photos shot at one spot share a location id; they must not be each other's negatives.
    _, loc_id = np.unique(np.round(latlon[tr], 3), axis=0, return_inverse=True)
    id_tr = torch.from_numpy(loc_id.reshape(-1)).to(dev)
    va_rows = np.flatnonzero(va)
    if len(va_rows) > config.val_photos_max:  # validation is a bounded cost per round, not a pass over 20 % of N
        va_rows = np.sort(rng.choice(va_rows, config.val_photos_max, replace=False))
    x_va = torch.from_numpy(emb[va_rows]).to(dev)
    cand = np.unique(np.round(latlon[tr], 5), axis=0)
    if len(cand) > config.val_candidates_max:
        cand = cand[np.sort(rng.choice(len(cand), config.val_candidates_max, replace=False))]
    if extra_latlon is not None and len(extra_latlon):
        pick = rng.choice(len(extra_latlon), min(len(extra_latlon), config.val_gallery_max), replace=False)
        cand = np.concatenate([cand, np.asarray(extra_latlon, np.float64)[pick]])
    metrics.update(n_train=int(tr.sum()), n_val=int(va.sum()), n_val_candidates=int(len(cand)))
    cand_bias = torch.from_numpy(config.prior_weight * log_density(cand, latlon[tr], config.prior_radius_km)).to(dev)

    params = [{"params": list(proj.parameters()), "lr": config.lr}]
    if config.location_lr > 0:
        params.append({"params": list(loc.parameters()), "lr": config.location_lr})
    else:
        loc.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=config.weight_decay)
    queue = torch.zeros(0, loc.out_dim, device=dev)
    queue_ids = torch.zeros(0, dtype=torch.long, device=dev)

    def val_metrics() -> dict[str, float]:
        with torch.no_grad():
            loc.eval()
            cf = F.normalize(torch.from_numpy(loc.encode(cand)).to(dev), dim=1)
        return gallery_accuracy(proj, cf, cand, cand_bias, x_va, latlon[va_rows])

    rounds = _rounds(len(x_tr), config.round_photos, rng)
    best = val_metrics() if va.any() else None
    best_state, best_epoch, stale, history = _snapshot(loc, proj), 0, 0, []
    t0 = time.perf_counter()
    progress = bar(config.epochs, "gallery rounds (early stopping ends sooner)", unit="round")
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loc.train(config.location_lr > 0)
        proj.train()
        order = torch.from_numpy(next(rounds)).to(dev)
        total, steps = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            if len(idx) < 2:
                continue
            img = F.normalize(proj(x_tr[idx]), dim=1)
            locf = F.normalize(loc(jitter(g_tr[idx], config.jitter_km, gen)), dim=1)
            scale = proj.logit_scale.exp()
            logits = scale * img @ torch.cat([locf, queue]).T
            target = torch.arange(len(idx), device=dev)
            ids = id_tr[idx]
            same = ids[:, None] == torch.cat([ids, queue_ids])[None, :]
            same[target, target] = False
            logits = logits.masked_fill(same, float("-inf"))
            loss = F.cross_entropy(logits, target)
            if config.symmetric:
                loss = (loss + F.cross_entropy(logits[:, :len(idx)].T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                proj.logit_scale.clamp_(0.0, math.log(100.0))
                queue = torch.cat([locf.detach(), queue])[:config.queue_size]
                queue_ids = torch.cat([ids, queue_ids])[:config.queue_size]
            total, steps = total + loss.item(), steps + 1
        row = {"epoch": epoch, "loss": total / max(steps, 1), "logit_scale": proj.logit_scale.exp().item()}
        if best is not None:
            m = val_metrics()
            row.update(m)
            if m["score"] > best["score"]:
                best, best_state, best_epoch, stale = m, _snapshot(loc, proj), epoch, 0
            else:
                stale += 1
        row["seconds"] = time.perf_counter() - started  # training and validation: what each further epoch costs
        history.append(row)
        progress.update()
        progress.set_postfix_str(", ".join(f"{k} {row[k]:.3g}" for k in ("score", "loss") if k in row))
        detail(log, f"gallery epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if best is not None and stale >= config.patience:
            break
    progress.close()
    if best is None:  # no held-out groups: keep the last epoch
        best_state, best_epoch = _snapshot(loc, proj), len(history)
    loc.load_state_dict(best_state[0]), proj.load_state_dict(best_state[1])
    metrics.update(epochs_run=len(history), best_epoch=best_epoch, val=best, history=history,
                   seconds=round(time.perf_counter() - t0, 2), device=str(dev))
    return TrainResult(loc.cpu().eval(), proj.cpu().eval(), metrics)


def _rounds(n: int, size: int, rng: np.random.Generator):
    """Row orders of successive training rounds: a fresh permutation per round while n <= size (epochs),
    else consecutive slices of size rows through one permutation after another."""
    if n <= size:
        while True:
            yield rng.permutation(n)
    pending = np.zeros(0, np.int64)
    while True:
        while len(pending) < size:
            pending = np.concatenate([pending, rng.permutation(n)])
        yield pending[:size]
        pending = pending[size:]


def _snapshot(*modules: nn.Module) -> list[dict]:
    return [copy.deepcopy({k: v.detach().cpu() for k, v in m.state_dict().items()}) for m in modules]
