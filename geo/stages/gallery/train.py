"""Contrastive training of the image projection (and, if asked, the location encoder) on stored embeddings.

Images never pass through the backbone again: the bundle's embeddings are the
inputs. The loss is GeoCLIP's image-to-GPS InfoNCE with a learnable
temperature and a queue of recent GPS negatives; the queue holds location
*features* (MoCo style) rather than coordinates, so a step encodes only the
batch's coordinates — re-encoding 4,096 queued points per step is what would
make CPU training take hours. By default the location encoder (GeoCLIP's) stays frozen: training it at
its small learning rate cost most of each step and held-out accuracy did not gain from it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.memory import compact_rows
from geo.core.priors import photos_within
from geo.core.progress import bar, detail
from geo.core.runtime import resolve_device
from geo.core.splits import validation_mask
from geo.models.location import GEOCLIP_SIGMAS, ImageProjection, LocationEncoder

KM_PER_DEG = 111.195
VAL_THRESHOLDS_KM = tuple(float(t) for t in THRESHOLDS_KM[1:])  # 1 km is beyond a gallery point's reach


RANDOM_INIT_LOCATION_LR = 1e-5  # the rate every encoder trained at before freezing became the default


@dataclass
class TrainConfig:
    """What a build may change about the gallery's training (``geo build-index --gallery-*``, tests, benchmarks).

    A round is one pass over the training photos, or ``round_photos`` of them when there are more
    (successive rounds go on through one shuffled order of all photos): training costs at most
    ``epochs x round_photos`` photos whatever the gallery's size.
    """

    init: str = "geoclip"  # location encoder start: 'geoclip' (GeoCLIP's published weights) or 'random'
    # RFF scales in Equal Earth units, one branch each (GeoCLIP: 1, 16, 256; add 4096 for finer resolution).
    # With init 'geoclip', scales beyond GeoCLIP's are added as new branches.
    sigmas: tuple[float, ...] = GEOCLIP_SIGMAS
    # Image projection start: 'auto' (resolved from the backbone by GalleryConfig.train_config: identity for the
    # geoclip backbone, GeoCLIP's MLP for CLIP ViT-L/14, else random); 'random'; 'geoclip' (GeoCLIP's MLP, only
    # for CLIP ViT-L/14 768-d features); 'identity' (residual, for embeddings already in GeoCLIP's space).
    image_init: str = "auto"
    epochs: int = 40  # most training rounds (0: keep the initial weights)
    round_photos: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3  # AdamW learning rate of the image projection
    # Learning rate of the location encoder; 0 freezes it. None: frozen from GeoCLIP's weights (one forward a
    # step, validation candidates encoded once, no loss of held-out accuracy: benchmarks/RESULTS.md, "Cheaper
    # training at the 1M build's sample"), trained at RANDOM_INIT_LOCATION_LR from a random start (frozen
    # random features would be all the gallery ever had).
    location_lr: float | None = None
    hidden: int = 1024  # hidden width of the image projection MLP
    dropout: float = 0.2  # in the image projection: regularises small galleries
    jitter_km: float = 10.0  # std of the GPS jitter on training places: a place's surroundings are positives too
    patience: int = 6  # rounds without a better held-out score before stopping
    seed: int = 0  # the split, the initialisation, the batches and the jitter
    device: str = "auto"  # 'auto' (cuda when present), 'cpu' or 'cuda'

    @property
    def encoder_lr(self) -> float:
        """The location encoder's learning rate this config means (``location_lr`` with None resolved)."""
        if self.location_lr is not None:
            return self.location_lr
        return 0.0 if self.init == "geoclip" else RANDOM_INIT_LOCATION_LR


@dataclass(frozen=True)
class Tuned:
    """The gallery's tuned constants: chosen once (benchmarks/RESULTS.md, "GPS gallery"), not options of a build.

    Changing one changes every bundle built after, so it is done here, in one place, with a benchmark run.
    """

    weight_decay: float = 1e-2  # AdamW's
    queue_size: int = 4096  # recent location features kept as negatives between batches (GeoCLIP's 4096)
    # Weight of log photo density added to each gallery point's logit (0: pure cosine). InfoNCE against
    # photo-distributed negatives learns log p(point|image)/p(point), so adding log p(point) makes it a posterior.
    prior_weight: float = 2.0
    prior_radius_km: float = 750.0  # radius of the photo-count density behind the prior
    # Early stopping is a bounded cost per round: at most this many held-out photos, scored against at most
    # val_candidates_max of the training photos' places plus val_gallery_max points without photos.
    val_photos_max: int = 5000
    val_candidates_max: int = 20_000
    val_gallery_max: int = 4096


TUNED = Tuned()
FROZEN_FORWARD_PHOTOS = 8192  # a frozen location encoder's features are computed this many training places at a time


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
        raise ValueError(f"image_init must be 'random', 'geoclip' or 'identity', not {config.image_init!r} "
                         "('auto' is resolved from the backbone by GalleryConfig.train_config)")
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
    emb = compact_rows(emb)  # a float16 sample stays so: batches and the validation photos are cast to float32
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
    va = validation_mask(len(emb), groups, seed=config.seed) if val is None else np.asarray(val, bool)
    rng = np.random.default_rng(config.seed)  # draws, in order: the validation samples, then the rounds' orders
    sample = _Validation.sample(emb, latlon, va, extra_latlon, rng, dev)
    metrics.update(n_train=int((~va).sum()), n_val=int(va.sum()), n_val_candidates=int(len(sample.cand)))
    trainer = _Contrastive(loc, proj, emb, np.flatnonzero(~va), latlon[~va], config, dev)
    check = sample if va.any() else None  # no held-out photos: no early stopping, the last round is kept
    best = _Best(check.score(loc, proj) if check is not None else None, _snapshot(loc, proj))
    t0 = time.perf_counter()
    history = _fit(trainer, check, best, _rounds(int((~va).sum()), config.round_photos, rng), config, log)
    loc.load_state_dict(best.state[0]), proj.load_state_dict(best.state[1])
    metrics.update(epochs_run=len(history), best_epoch=best.epoch, val=best.metrics, history=history,
                   seconds=round(time.perf_counter() - t0, 2), device=str(dev))
    return TrainResult(loc.cpu().eval(), proj.cpu().eval(), metrics)


@dataclass
class _Validation:
    """The held-out check after each round: a bounded sample of held-out photos, each answered with its best
    candidate place (the query-time rule), the candidates carrying the same density prior queries add."""

    emb: torch.Tensor
    latlon: np.ndarray
    cand: np.ndarray
    cand_bias: torch.Tensor
    cand_feat: torch.Tensor | None = None  # the candidates' features, kept while the location encoder is frozen

    @classmethod
    def sample(cls, emb: np.ndarray, latlon: np.ndarray, va: np.ndarray, extra_latlon: np.ndarray | None,
               rng: np.random.Generator, dev: torch.device) -> "_Validation":
        """Validation is a bounded cost per round, not a pass over 20 % of N: photos and candidate places are
        seeded samples above the ``TUNED`` caps (drawn from ``rng`` in this order, which the rounds then continue)."""
        tr = ~va
        va_rows = np.flatnonzero(va)
        if len(va_rows) > TUNED.val_photos_max:
            va_rows = np.sort(rng.choice(va_rows, TUNED.val_photos_max, replace=False))
        cand = np.unique(np.round(latlon[tr], 5), axis=0)
        if len(cand) > TUNED.val_candidates_max:
            cand = cand[np.sort(rng.choice(len(cand), TUNED.val_candidates_max, replace=False))]
        if extra_latlon is not None and len(extra_latlon):
            pick = rng.choice(len(extra_latlon), min(len(extra_latlon), TUNED.val_gallery_max), replace=False)
            cand = np.concatenate([cand, np.asarray(extra_latlon, np.float64)[pick]])
        bias = TUNED.prior_weight * log_density(cand, latlon[tr], TUNED.prior_radius_km)
        return cls(torch.from_numpy(emb[va_rows]).float().to(dev), latlon[va_rows], cand, torch.from_numpy(bias).to(dev))

    def score(self, loc: LocationEncoder, proj: ImageProjection) -> dict[str, float]:
        """Held-out accuracies and their mean (``score``, what early stopping maximises)."""
        return gallery_accuracy(proj, self.features(loc), self.cand, self.cand_bias, self.emb, self.latlon)

    def features(self, loc: LocationEncoder) -> torch.Tensor:
        """The candidates' normalised location features: encoded once while the encoder is frozen (its default),
        since they cannot change between rounds; re-encoded each round when it trains."""
        if self.cand_feat is not None:
            return self.cand_feat
        feat = torch.from_numpy(loc.encode(self.cand, normalize=True)).to(self.emb.device)
        if not any(p.requires_grad for p in loc.parameters()):
            self.cand_feat = feat
        return feat


class _Contrastive:
    """The training side: the training photos on the device, the optimiser, and the queue of recent location
    features (MoCo style) that outlives each batch and round, so one step encodes only its batch's places."""

    def __init__(self, loc: LocationEncoder, proj: ImageProjection, emb: np.ndarray, rows: np.ndarray,
                 latlon: np.ndarray, config: TrainConfig, dev: torch.device):
        """``rows``: the training photos' rows of ``emb`` (every photo's), gathered per batch: a copy of the
        training rows was 0.6 GB of a 150K x 1280 build's peak. ``latlon``: those photos' places."""
        self.loc, self.proj, self.config, self.dev = loc, proj, config, dev
        self.x = torch.from_numpy(emb).to(dev)
        self.rows = torch.from_numpy(rows).to(dev)
        self.g = torch.from_numpy(latlon.astype(np.float32)).to(dev)
        # Photos shot at one spot share a location id; they must not be each other's negatives.
        _, loc_id = np.unique(np.round(latlon, 3), axis=0, return_inverse=True)
        self.ids = torch.from_numpy(loc_id.reshape(-1)).to(dev)
        params = [{"params": list(proj.parameters()), "lr": config.lr}]
        if config.encoder_lr > 0:
            params.append({"params": list(loc.parameters()), "lr": config.encoder_lr})
        else:
            loc.requires_grad_(False)
        self.opt = torch.optim.AdamW(params, weight_decay=TUNED.weight_decay)
        self.queue = torch.zeros(0, loc.out_dim, device=dev)
        self.queue_ids = torch.zeros(0, dtype=torch.long, device=dev)
        self.gen = torch.Generator().manual_seed(config.seed)  # the jitter's, apart from dropout's global stream

    def round(self, order: np.ndarray) -> float:
        """One training round over these training rows, in batches; its mean loss."""
        self.loc.train(self.config.encoder_lr > 0)
        self.proj.train()
        order_t = torch.from_numpy(order).to(self.dev)
        # A lone photo has no in-batch negative to learn from: a batch of one is skipped.
        batches = [b for b in torch.split(order_t, self.config.batch_size) if len(b) >= 2]
        total = 0.0
        per_group = max(1, FROZEN_FORWARD_PHOTOS // self.config.batch_size)
        for g in range(0, len(batches), per_group):
            group = batches[g:g + per_group]
            for idx, locf in zip(group, self.places(group)):
                total += self.step(idx, locf)
        return total / max(len(batches), 1)

    def places(self, batches: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """A frozen encoder's features of these batches' jittered places (drawn in step order, as the steps would),
        from one forward without a graph: large batches use the CPU better than 256-row ones. None for each batch
        while the encoder trains: its step encodes its places through the graph."""
        if self.config.encoder_lr > 0:
            return [None] * len(batches)
        jittered = [jitter(self.g[idx], self.config.jitter_km, self.gen) for idx in batches]
        with torch.no_grad():
            feats = F.normalize(self.loc(torch.cat(jittered)), dim=1)
        return list(torch.split(feats, [len(b) for b in batches]))

    def step(self, idx: torch.Tensor, locf: torch.Tensor | None = None) -> float:
        """One image-to-GPS InfoNCE step against the batch's places (features ``locf``, or encoded here from the
        next jitter draw while the encoder trains) and the queue; its loss."""
        img = F.normalize(self.proj(self.x[self.rows[idx]].float()), dim=1)
        if locf is None:
            locf = F.normalize(self.loc(jitter(self.g[idx], self.config.jitter_km, self.gen)), dim=1)
        logits = self.proj.logit_scale.exp() * img @ torch.cat([locf, self.queue]).T
        target = torch.arange(len(idx), device=self.dev)
        ids = self.ids[idx]
        same = ids[:, None] == torch.cat([ids, self.queue_ids])[None, :]
        same[target, target] = False
        loss = F.cross_entropy(logits.masked_fill(same, float("-inf")), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            # The learnable temperature stays within CLIP's bound (a scale of at most 100), which keeps training stable.
            self.proj.logit_scale.clamp_(0.0, math.log(100.0))
            self.queue = torch.cat([locf.detach(), self.queue])[:TUNED.queue_size]
            self.queue_ids = torch.cat([ids, self.queue_ids])[:TUNED.queue_size]
        return loss.item()


@dataclass
class _Best:
    """Early stopping's record: the best held-out metrics so far, the weights and round that gave them."""

    metrics: dict | None
    state: list[dict]
    epoch: int = 0
    stale: int = 0

    def offer(self, m: dict, epoch: int, *modules: nn.Module) -> None:
        """Keep this round's weights when it scores better; else count one more round without progress."""
        if m["score"] > self.metrics["score"]:
            self.metrics, self.state, self.epoch, self.stale = m, _snapshot(*modules), epoch, 0
        else:
            self.stale += 1


def _fit(trainer: _Contrastive, check: _Validation | None, best: _Best, rounds, config: TrainConfig,
         log) -> list[dict]:
    """Rounds until ``config.epochs``, or until ``patience`` rounds without a better held-out score; each
    round's metrics row. ``best`` ends with the round to keep: the best scored, or the last without ``check``."""
    loc, proj = trainer.loc, trainer.proj
    history: list[dict] = []
    progress = bar(config.epochs, "gallery rounds (early stopping ends sooner)", unit="round")
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        row = {"epoch": epoch, "loss": trainer.round(next(rounds)), "logit_scale": proj.logit_scale.exp().item()}
        if check is not None:
            m = check.score(loc, proj)
            row.update(m)
            best.offer(m, epoch, loc, proj)
        row["seconds"] = time.perf_counter() - started  # training and validation: what each further epoch costs
        history.append(row)
        progress.update()
        progress.set_postfix_str(", ".join(f"{k} {row[k]:.3g}" for k in ("score", "loss") if k in row))
        detail(log, f"gallery epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if check is not None and best.stale >= config.patience:
            break
    progress.close()
    if check is None:
        best.state, best.epoch = _snapshot(loc, proj), len(history)
    return history


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
    """A copy of the modules' weights on the CPU, which later steps cannot change."""
    return [copy.deepcopy({k: v.detach().cpu() for k, v in m.state_dict().items()}) for m in modules]
