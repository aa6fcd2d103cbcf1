"""Training the cell heads on stored embeddings: one head per partition, one shared input.

The images are never re-embedded: heads train on the embedding shards.
Loss = mean over partitions of the cross-entropy (Müller-Budack et al.'s
multi-partition loss), optionally against haversine-smoothed targets (PIGEON:
a photo near a cell border is not all wrong in the neighbouring cell).
Validation photos are whole groups (photographers) held out, so early
stopping measures places, not one trip's near-duplicates.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz
from geo.core.memory import compact_rows
from geo.core.progress import bar
from geo.core.runtime import resolve_device
from geo.core.splits import validation_mask
from geo.models.heads import CellHeads


VAL_LOSS_PHOTOS = 10_000
# Validation photos scored at once: their [photos, cells] logits and log-softmax for all 10,000 together were
# +0.6 GB over the training batches at 150K x 1280 (4,172 cells), the cells stage's peak.
VAL_BLOCK = 2048


@dataclass
class HeadConfig:
    head: str = "linear"
    hidden: int = 512
    dropout: float = 0.2
    max_epochs: int = 100
    patience: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    smoothing_km: float = 0.0
    val_fraction: float = 0.2  # geo.core.splits: the same held-out photographers as gallery and fusion
    # Compute cap (multiply-adds x 6 for forward+backward): bounds CPU builds like a time limit would,
    # but deterministically, so a seeded build gives the same weights on any machine.
    flop_budget: float = 1.5e12
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainResult:
    model: "CellHeads"
    val_index: np.ndarray
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def train_heads(emb: np.ndarray, targets: np.ndarray, cell_latlon: list[tuple[np.ndarray, np.ndarray]],
                photo_latlon: tuple[np.ndarray, np.ndarray], config: HeadConfig, groups: np.ndarray | None = None,
                scene: np.ndarray | None = None, n_scenes: int = 0, val: np.ndarray | None = None) -> TrainResult:
    """Train the heads; keep the weights of the epoch with the lowest validation loss.

    ``targets``: int [n, partitions], -1 where a photo lies in no cell of that
    partition (ignored there). ``scene``: int [n], -1 unknown. ``val``: bool [n], the
    held-out photographers (default: :func:`geo.core.splits.validation_mask` over ``groups``).
    Early stopping scores at most ``VAL_LOSS_PHOTOS`` of them (a seeded sample), so an
    epoch's validation costs the same at any gallery size.
    """
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    dev = resolve_device(config.device)
    n = len(emb)
    held = validation_mask(n, groups, config.val_fraction, config.seed) if val is None else np.asarray(val, bool)
    val, train = np.flatnonzero(held), np.flatnonzero(~held)
    scored = val if len(val) <= VAL_LOSS_PHOTOS else np.sort(
        np.random.default_rng(config.seed).choice(val, VAL_LOSS_PHOTOS, replace=False))
    model = CellHeads(emb.shape[1], [len(c[0]) for c in cell_latlon], config.head, config.hidden,
                      config.dropout, n_scenes)
    x = torch.from_numpy(compact_rows(emb)).to(dev)  # a float16 sample stays so; each batch is cast to float32
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(dev)
    s = torch.from_numpy(np.asarray(scene if scene is not None else np.full(n, -1), dtype=np.int64)).to(dev)
    pxyz = torch.from_numpy(latlon_to_xyz(*photo_latlon)).float().to(dev)
    cxyz = [torch.from_numpy(latlon_to_xyz(la, lo)).float().to(dev) for la, lo in cell_latlon]
    if config.head == "linear":
        _prototype_init(model, emb, train, np.asarray(targets))
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    best, best_state, history, stale = float("inf"), None, [], 0
    train_t = torch.from_numpy(train)
    val_t = torch.from_numpy(scored).to(dev)
    # The compute cap in photos seen; when it is less than one pass (a large gallery's many cells), the one
    # epoch is that many photos of a shuffled pass, so the heads cost the same at any gallery size.
    width = sum(p.numel() for p in model.parameters())
    budget = int(config.flop_budget // (6 * width))
    epoch_photos = min(len(train), max(budget, config.batch_size))
    max_epochs = min(config.max_epochs, max(1, budget // max(len(train), 1)))
    # Big galleries take bigger batches (at most ~100 steps an epoch): the prototype start needs few epochs, not many steps.
    batch_size = max(config.batch_size, -(-epoch_photos // 100))
    progress = bar(max_epochs + 1, "cell heads (early stopping ends sooner)", unit="epoch")
    for epoch in range(max_epochs + 1):
        model.train()
        perm = train_t[torch.randperm(len(train_t), generator=gen)[:epoch_photos]].to(dev)
        total = 0.0
        # Epoch 0 only scores the initial (prototype) heads: on a small gallery they can beat any trained epoch.
        for b in range(0, len(perm) if epoch else 0, batch_size):
            idx = perm[b:b + batch_size]
            loss = _loss(model, x[idx].float(), y[idx], s[idx], pxyz[idx], cxyz, config.smoothing_km, n_scenes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        vloss = _val_loss(model, x, y, s, val_t, n_scenes)
        history.append({"epoch": epoch, "train_loss": total / max(len(perm), 1), "val_loss": vloss})
        progress.update()
        progress.set_postfix_str(f"val loss {vloss:.4g}")
        if vloss < best - 1e-4:
            best, stale = vloss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    progress.close()
    model.load_state_dict(best_state)
    model.eval()
    best_epoch = min(range(len(history)), key=lambda e: history[e]["val_loss"])
    return TrainResult(model.cpu(), val, history, best_epoch, time.perf_counter() - t0)


@torch.no_grad()
def _prototype_init(model: CellHeads, emb: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                    scale: float = 10.0) -> None:
    """Start each linear head as a nearest-centroid classifier on centred features.

    With a few photos per cell, a randomly initialised head over-fits its
    photographers before it learns places; the centroid of a cell's photos
    (minus the gallery mean, which every ImageNet feature shares) is the
    estimate that needs no fitting. ``rows`` are the training photos of
    ``emb``: their sums (sum of x - mu over a cell = sum of x - count * mu)
    are taken a float64 block of rows at a time, so no copy of the embeddings is made.
    """
    sums, counts, total = _cell_sums(emb, rows, targets, [head.weight.shape[0] for head in model.heads])
    mu = total / max(len(rows), 1)
    for head, s, c in zip(model.heads, sums, counts):
        centred = s - c[:, None] * mu[None, :]
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        w = np.where(norms > 0, centred / np.maximum(norms, 1e-12), 0.0) * scale
        head.weight.zero_()
        head.weight[:, : emb.shape[1]] = torch.from_numpy(w).float()
        head.bias.copy_(torch.from_numpy(-(w @ mu)).float())


SUM_ROWS = 8192  # rows per float64 block of the prototype sums: [SUM_ROWS, dim] at a time, whatever the gallery


def _cell_sums(emb: np.ndarray, rows: np.ndarray, targets: np.ndarray,
               n_cells: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(per partition: each cell's float64 sum of its photos' embeddings, their counts; the sum of all
    ``rows``), one pass over ``emb`` a block at a time."""
    from scipy import sparse  # scikit-learn's dependency; only the build trains heads

    sums = [np.zeros((k, emb.shape[1])) for k in n_cells]
    counts = [np.zeros(k) for k in n_cells]
    total = np.zeros(emb.shape[1])
    for s in range(0, len(rows), SUM_ROWS):
        block = rows[s:s + SUM_ROWS]
        x = emb[block].astype(np.float64)
        total += x.sum(axis=0)
        for p, k in enumerate(n_cells):
            label = targets[block, p]
            ok = label >= 0
            onehot = sparse.csr_matrix((np.ones(int(ok.sum())), (label[ok], np.flatnonzero(ok))), shape=(k, len(block)))
            sums[p] += onehot @ x
            counts[p] += np.bincount(label[ok], minlength=k)
    return sums, counts, total


def smoothed_targets(pxyz: torch.Tensor, cxyz: torch.Tensor, smoothing_km: float) -> torch.Tensor:
    """PIGEON's haversine label smoothing [photos, cells]: target ∝ exp(-distance to the cell's photo mean /
    scale), so the nearest cell takes the most mass and a near miss costs little. The cell heads and
    ``geo finetune`` both train against it. 2R·asin(chord/2) is the haversine."""
    chord = torch.cdist(pxyz, cxyz).clamp(max=2.0)
    return (-(2 * EARTH_RADIUS_KM * torch.asin(chord / 2)) / smoothing_km).softmax(-1)


def _scene_input(s: torch.Tensor, n_scenes: int, device) -> torch.Tensor | None:
    """The heads' scene input: one-hot where the scene is known, uniform where not; None without scenes."""
    if not n_scenes:
        return None
    known = s >= 0
    scene_in = torch.full((len(s), n_scenes), 1.0 / n_scenes, device=device)
    scene_in[known] = nn.functional.one_hot(s[known], n_scenes).float()
    return scene_in


@torch.no_grad()
def _val_loss(model: CellHeads, x, y, s, rows: torch.Tensor, n_scenes: int) -> float:
    """The validation loss early stopping compares, always against hard labels: per partition the mean
    cross-entropy over its photos in a cell, averaged over partitions, plus the scenes' (as :func:`_loss` with
    no smoothing), scored :data:`VAL_BLOCK` photos at a time."""
    sums, counts = torch.zeros(y.shape[1] + 1, dtype=torch.float64), torch.zeros(y.shape[1] + 1, dtype=torch.float64)
    for b in range(0, len(rows), VAL_BLOCK):
        idx = rows[b:b + VAL_BLOCK]
        yb, sb = y[idx], s[idx]
        logits, scene_logits = model(x[idx].float(), _scene_input(sb, n_scenes, x.device))
        pairs = [(z, yb[:, p]) for p, z in enumerate(logits)] + ([(scene_logits, sb)] if scene_logits is not None else [])
        for k, (z, label) in enumerate(pairs):
            ok = label >= 0
            sums[k] += float(nn.functional.cross_entropy(z[ok], label[ok], reduction="sum")) if ok.any() else 0.0
            counts[k] += int(ok.sum())
    heads = [sums[k] / counts[k] for k in range(y.shape[1]) if counts[k] > 0]
    loss = float(torch.stack(heads).mean()) if heads else 0.0
    return loss + (float(sums[-1] / counts[-1]) if counts[-1] > 0 else 0.0)


def _loss(model: CellHeads, x, y, s, pxyz, cxyz, smoothing_km: float, n_scenes: int) -> torch.Tensor:
    logits, scene_logits = model(x, _scene_input(s, n_scenes, x.device))
    losses = []
    for p, z in enumerate(logits):
        ok = y[:, p] >= 0
        if not ok.any():
            continue
        if smoothing_km > 0:
            q = smoothed_targets(pxyz[ok], cxyz[p], smoothing_km)
            losses.append(-(q * z[ok].log_softmax(-1)).sum(-1).mean())
        else:
            losses.append(nn.functional.cross_entropy(z[ok], y[ok, p]))
    # a batch whose photos all lie outside every kept cell (small galleries drop most cells under tau_min)
    # teaches the cell heads nothing: a zero that keeps the graph, not an error
    loss = torch.stack(losses).mean() if losses else logits[0].sum() * 0.0
    if scene_logits is not None and (s >= 0).any():
        loss = loss + nn.functional.cross_entropy(scene_logits[s >= 0], s[s >= 0])
    return loss


def config_dict(config: HeadConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
