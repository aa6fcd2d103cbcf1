"""The training itself: the backbone, its heads and one AdamW over both, an epoch at a time, and validation.

The objective is PIGEON's: cross-entropy over the cells of every partition against haversine-smoothed targets,
plus the optional regression and GeoCLIP contrastive terms. Validation measures what a bundle will do with the
embeddings (the heads are discarded): each held-out photo located by a kNN vote among the training photos.
Everything random is seeded by (seed, epoch), so a run resumed after epoch k ends where an uninterrupted one does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.knn_vote import kde_vote
from geo.core.progress import bar
from geo.finetune.config import FinetuneConfig
from geo.finetune.data import TrainingData
from geo.finetune.model import Heads, augment, freeze, keep_batchnorm_statistics
from geo.models.backbones import Backbone
from geo.models.location import LocationEncoder

SCORED_KM = (25, 200, 750, 2500)  # the thresholds whose mean accuracy picks the epoch kept


def knn_scores(train_emb: np.ndarray, val_emb: np.ndarray, lat: np.ndarray, lon: np.ndarray,
               train: np.ndarray, val: np.ndarray) -> dict[str, float]:
    """Each validation photo located by a KDE vote among its 10 nearest training photos, as a bundle's kNN mode
    would: the median error, accuracy at every threshold, and ``score``, the mean accuracy at 25/200/750/2500 km."""
    sims = val_emb @ train_emb.T
    top = np.argsort(-sims, 1)[:, :10]
    d = np.empty(len(val))
    for i, nb in enumerate(top):
        v = kde_vote(lat[train][nb], lon[train][nb], sims[i, nb])
        d[i] = haversine_km(v.lat, v.lon, lat[val[i]], lon[val[i]])
    scores = {"knn_median_km": float(np.median(d))}
    scores.update({f"knn_acc_{t}km": float((d <= t).mean()) for t in THRESHOLDS_KM})
    scores["score"] = float(np.mean([scores[f"knn_acc_{t}km"] for t in SCORED_KM]))
    return scores


class Trainer:
    """The model, its heads, the optimiser (heads at 10x the backbone's learning rate) and the loss, over one
    :class:`TrainingData`. Checkpointing reads and restores ``model``, ``heads`` and ``opt``."""

    def __init__(self, bb: Backbone, data: TrainingData, cfg: FinetuneConfig, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = bb.model.to(device).float()
        self.trainable = freeze(self.model, cfg.freeze_until)
        with torch.random.fork_rng(devices=[]):  # the heads start the same in every run of this config
            torch.manual_seed(cfg.seed)
            self.heads = Heads(bb.dim, [p.n_cells for p in data.parts], cfg.regression_weight > 0,
                               cfg.contrastive_weight > 0).to(device)
        self.train_pos = np.full(len(data.photos.df), -1, np.int64)  # row -> place among the training photos
        self.train_pos[data.train] = np.arange(len(data.train))
        self.train_gps = None
        if cfg.contrastive_weight > 0:  # every training photo's location in GeoCLIP's space (frozen, encoded once)
            lat, lon = data.photos.lat[data.train], data.photos.lon[data.train]
            self.train_gps = torch.from_numpy(LocationEncoder.from_geoclip().encode(
                np.stack([lat, lon], 1), normalize=True)).to(device)
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.lr},
             {"params": list(self.heads.parameters()), "lr": cfg.lr * 10}], weight_decay=cfg.weight_decay)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features of a batch (bf16 autocast on CUDA), as float32."""
        with self.amp:
            return self.model(x.to(self.device).float()).flatten(1).float()

    def loss_of_features(self, feats: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The training loss of the photos ``rows`` (manifest rows) given their features."""
        cfg, device = self.cfg, self.device
        logits, xyz, gps = self.heads(feats)
        idx = torch.from_numpy(rows)
        loss = torch.stack([-(t[idx].to(device) * F.log_softmax(lg.float(), 1)).sum(1).mean()
                            for lg, t in zip(logits, self.data.targets)]).mean()
        if xyz is not None:
            loss = loss + cfg.regression_weight * (1 - (xyz.float() * self.data.xyz[idx].to(device)).sum(1)).mean()
        if gps is not None:
            own = torch.from_numpy(self.train_pos[rows])
            mine = own >= 0  # validation photos have no place among the training locations
            if mine.any():
                scores = self.heads.proj.logit_scale.exp() * gps[mine.to(gps.device)].float() @ self.train_gps.T
                loss = loss + cfg.contrastive_weight * F.cross_entropy(scores, own[mine].to(device))
        return loss

    def probe(self, steps_per_photo: int = 30) -> None:
        """Train the new heads on the frozen network's features (computed once) before the network moves:
        fine-tuning then starts from sensible heads instead of random ones, which would push noise back into
        the pretrained layers (LP-FT, Kumar et al. 2022)."""
        cfg, train = self.cfg, self.data.train
        self.model.eval()
        with torch.no_grad():
            feats = torch.cat([self.model(self.data.images[train[s:s + cfg.batch_size]].to(self.device).float())
                               .flatten(1).float() for s in range(0, len(train), cfg.batch_size)])
        opt = torch.optim.AdamW(self.heads.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng([cfg.seed, 0])
        batch = min(64, len(train))
        for _ in range(max(1, steps_per_photo * len(train) // batch)):
            pick = rng.choice(len(train), batch, replace=False)
            loss = self.loss_of_features(feats[pick], train[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def train_epoch(self, epoch: int) -> None:
        """One pass over the training photos in an order (and with crops) drawn from (seed, epoch)."""
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, epoch])
        order = data.train[rng.permutation(len(data.train))]
        self.model.train()
        keep_batchnorm_statistics(self.model)
        progress = bar(len(order), f"epoch {epoch}/{cfg.epochs}", "img")
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            x = data.images[rows].float()
            loss = self.loss_of_features(self.features(augment(x, rng) if cfg.augment else x), rows)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            progress.update(len(rows))
            progress.set_postfix_str(f"loss {loss.item():.3f}")
        progress.close()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The held-out loss and :func:`knn_scores` of the current embeddings (``score`` selects the epoch kept,
        since a bundle retrieves with the embeddings and discards the heads)."""
        data, size = self.data, self.cfg.batch_size
        self.model.eval()
        losses, feats = [], []
        for s in range(0, len(data.usable), size):
            rows = data.usable[s:s + size]
            f = self.features(data.images[rows])
            feats.append(F.normalize(f, dim=1).cpu())
            inval = np.isin(rows, data.val)
            if inval.any():
                loss = self.loss_of_features(f[torch.from_numpy(inval)], rows[inval])
                losses.append(float(loss) * int(inval.sum()))
        emb = torch.cat(feats).numpy()
        pos = {r: i for i, r in enumerate(data.usable)}
        scores = {"loss": sum(losses) / len(data.val)}
        scores.update(knn_scores(emb[[pos[r] for r in data.train]], emb[[pos[r] for r in data.val]],
                                 data.photos.lat, data.photos.lon, data.train, data.val))
        return scores
