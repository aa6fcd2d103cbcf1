"""GeoIndex: a loaded bundle that answers "where was this photo taken?".

The CLI is a thin layer over this class, so scripts get the same answers as
``geo query``. Models load once per GeoIndex; the backbone is loaded on the
first call that needs pixels, so scoring stored embeddings (benchmarks,
tuning) never pays for it.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from geo.bundle import Bundle, open_bundle
from geo.cells.support import DECISION_RADII_KM
from geo.geodesy import haversine_km
from geo.retrieval.inputs import expand_images
from geo.retrieval.knn import KnnParams, kde_vote, neighbour_weights

MODES = ("fused", "knn", "gallery", "cells")


def _softmax1(z: np.ndarray) -> np.ndarray:
    return neighbour_weights(z[np.isfinite(z)], 1.0)


class GeoIndex:
    def __init__(self, bundle: Bundle, device: str = "auto"):
        import pandas as pd
        import pyarrow.parquet as pq

        from geo.index_build.knn_index import load_knn_index

        self.bundle = bundle
        self.device = device
        self.knn_index = load_knn_index(bundle)
        metas = [pq.read_table(p, columns=["id", "path", "lat", "lon"]) for p in bundle.embedding_shards()]
        meta = pd.concat([t.to_pandas() for t in metas], ignore_index=True)
        self.ids = meta["id"].astype(str).to_numpy()
        self.paths = meta["path"].astype(str).to_numpy()
        self.lat = meta["lat"].to_numpy(np.float64)
        self.lon = meta["lon"].to_numpy(np.float64)
        self.knn_params = KnnParams()

    @classmethod
    def open(cls, path: str | Path, device: str = "auto", verify: bool = True) -> "GeoIndex":
        return cls(open_bundle(path, verify=verify), device=device)

    # ------------------------------------------------------------ components
    @cached_property
    def backbone(self):
        from geo.backbones import backbone_from_spec

        return backbone_from_spec(self.bundle.manifest["backbone"], device=self.device)

    @cached_property
    def cells(self):
        from geo.cells.predict import CellPredictor

        return CellPredictor.load(self.bundle) if self.bundle.has_stage("cells") else None

    @cached_property
    def gallery(self):
        from geo.gallery.stage import GpsGallery

        return GpsGallery.load(self.bundle) if self.bundle.has_stage("gallery") else None

    @cached_property
    def prior(self) -> tuple[np.ndarray, np.ndarray]:
        """The gallery's photo distribution as a few weighted points (see fusion.prior_summary)."""
        from geo.retrieval.fusion import prior_summary

        return prior_summary(self.lat, self.lon)

    @cached_property
    def fusion(self):
        from geo.retrieval.fusion import FusionParams

        return FusionParams.from_dict(self.bundle.stage("fusion")["params"]) if self.bundle.has_stage("fusion") else None

    @property
    def modes(self) -> list[str]:
        """Modes this bundle can answer in (stages that were built)."""
        have = {"knn"}
        if self.bundle.has_stage("cells"):
            have.add("cells")
        if self.bundle.has_stage("gallery"):
            have.add("gallery")
        if self.bundle.has_stage("fusion"):
            have.add("fused")
        return [m for m in MODES if m in have]

    @property
    def default_mode(self) -> str:
        return "fused" if "fused" in self.modes else "knn"

    # ------------------------------------------------------------ embedding
    def embed(self, images: Sequence[str], crops: int = 1, batch_size: int = 32) -> tuple[np.ndarray, dict[int, str]]:
        """Embeddings [n, crops, dim] (rows of failed images are zero) and {position: reason} for failures."""
        from geo.images import ImageDataset

        bb = self.backbone
        ds = ImageDataset(list(images), bb.preprocess, crops=crops)
        out = np.zeros((len(images), crops, bb.dim), np.float32)
        errors: dict[int, str] = {}
        for start in range(0, len(images), batch_size):
            items = [ds[i] for i in range(start, min(start + batch_size, len(images)))]
            ok = [(i, t) for i, t, err in items if err is None]
            errors.update({i: err for i, _, err in items if err is not None})
            if ok:
                x = torch.stack([t.reshape(crops, *t.shape[-3:]) for _, t in ok]).reshape(-1, *ok[0][1].shape[-3:])
                e = bb.embed(x.to(bb.device)).reshape(len(ok), crops, bb.dim)
                out[[i for i, _ in ok]] = e
        return out, errors

    # ------------------------------------------------------------ answering
    def search(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour similarities and row numbers [n, k] for query embeddings [n, dim] or [n, crops, dim].

        Crops are averaged in embedding space: the mean embedding's inner product
        is the mean of the crops' similarities, as the multi-crop papers average.
        """
        q = np.ascontiguousarray(emb.mean(axis=1) if emb.ndim == 3 else emb, np.float32)
        return self.knn_index.search(q, min(k, self.knn_index.ntotal))

    def cell_probs(self, emb: np.ndarray) -> np.ndarray:
        """Hierarchical fine-cell probabilities [n, C], averaged over crops (Müller-Budack's multi-crop)."""
        e = emb if emb.ndim == 3 else emb[:, None]
        _, fine = self.cells.log_probs(e.reshape(-1, e.shape[-1]))
        return np.exp(fine).reshape(e.shape[0], e.shape[1], -1).mean(axis=1)

    def evidence(self, emb: np.ndarray, k: int = 50, top: int = 32, knn=None, cell_probs=None, gallery=None):
        """Every built signal for a batch, as fusion consumes it (see :class:`geo.retrieval.fusion.Evidence`).

        Signals already computed for the same batch (``knn`` = (sims, rows),
        ``cell_probs``, ``gallery`` = (latlon, scores)) are reused, not recomputed.
        """
        from geo.retrieval.fusion import Evidence

        n = len(emb)
        sims, rows = self.search(emb, k) if knn is None else knn
        ok = rows >= 0
        knn_latlon = np.stack([np.where(ok, self.lat[rows], 0.0), np.where(ok, self.lon[rows], 0.0)], -1)
        knn_sim = np.where(ok, sims, -np.inf)
        if gallery is None:
            gallery = self.gallery_search(emb, top)
        if self.cells is not None:
            probs = self.cell_probs(emb) if cell_probs is None else cell_probs
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
            t = self.cells.tables[-1]
            c_latlon = np.stack([t["lat"].to_numpy()[order], t["lon"].to_numpy()[order]], -1)
            c_prob = np.take_along_axis(probs, order, axis=1)
        else:
            c_latlon, c_prob = np.zeros((n, 0, 2)), np.zeros((n, 0))
        p_pts, p_w = self.prior
        return Evidence(knn_latlon, knn_sim, *gallery, c_latlon, c_prob,
                        np.broadcast_to(p_pts, (n, *p_pts.shape)), np.broadcast_to(p_w, (n, len(p_w))))

    def gallery_search(self, emb: np.ndarray, k: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Top gallery points (latlon [n, k, 2], scores [n, k]); empty when the gallery was not built."""
        if self.gallery is None:
            return np.zeros((len(emb), 0, 2)), np.zeros((len(emb), 0))
        return self.gallery.search(emb.mean(axis=1) if emb.ndim == 3 else emb, k)

    def locate_embeddings(self, emb: np.ndarray, mode: str | None = None, k: int = 50) -> list[dict[str, Any]]:
        """Answers for embeddings [n, dim] (or [n, crops, dim]); each mode computes only the signals it needs,
        plus the top cells that every answer lists."""
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available in {self.bundle.root}; built: {', '.join(self.modes)}")
        sims, rows = self.search(emb, k)
        probs = self.cell_probs(emb) if self.cells is not None else None
        gallery = self.gallery_search(emb) if mode in ("gallery", "fused") else None
        if mode == "knn":
            answers = [self._answer_knn(s[r >= 0], r[r >= 0]) for s, r in zip(sims, rows)]
        elif mode == "gallery":
            answers = [{"lat": float(g[0, 0]), "lon": float(g[0, 1]), "mode": "gallery",
                        "confidence": round(float(_softmax1(sc)[0]), 4), "confidence_radius_km": 0.0}
                       for g, sc in zip(*gallery)]
        elif mode == "cells":  # the photo spot with most f* mass within 750, then 200, then 25 km (see RESULTS.md)
            lat, lon, mass = self.cells.decide(probs)
            answers = [{"lat": float(lat[i]), "lon": float(lon[i]), "mode": "cells", "confidence": round(float(mass[i]), 4),
                        "confidence_radius_km": DECISION_RADII_KM[0]} for i in range(len(emb))]
        else:
            answers = self._answer_fused(self.evidence(emb, k, knn=(sims, rows), cell_probs=probs, gallery=gallery))
        for i, a in enumerate(answers):
            r = rows[i][rows[i] >= 0]
            a.setdefault("neighbors", self._neighbours(sims[i][rows[i] >= 0], r,
                                                       haversine_km(self.lat[r], self.lon[r], a["lat"], a["lon"])))
            a["top_cells"] = self._top_cells(probs[i]) if probs is not None else []
            if gallery is not None:
                a["gallery"] = [{"lat": float(la), "lon": float(lo), "score": round(float(sc), 4)}
                                for sc, (la, lo) in zip(gallery[1][i, :5], gallery[0][i, :5])]
        return answers

    @cached_property
    def _fine_cells(self) -> tuple[str, list[str], np.ndarray, np.ndarray]:
        t = self.cells.tables[-1]
        return self.cells.names[-1], t["token"].astype(str).tolist(), t["lat"].to_numpy(), t["lon"].to_numpy()

    def _top_cells(self, probs: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
        name, tokens, lat, lon = self._fine_cells
        top = np.argpartition(-probs, min(k, len(probs) - 1))[:k]
        top = top[np.argsort(-probs[top], kind="stable")]
        return [{"partition": name, "token": tokens[j], "prob": round(float(probs[j]), 5),
                 "lat": float(lat[j]), "lon": float(lon[j])} for j in top]

    def _answer_fused(self, ev) -> list[dict[str, Any]]:
        from geo.retrieval.fusion import calibrated, decide

        out = []
        for d in decide(ev, self.fusion):
            p = calibrated(d.mass, self.fusion.calibration)
            out.append({"lat": d.lat, "lon": d.lon, "mode": "fused", "confidence": p["25"], "confidence_radius_km": 25.0,
                        "p_within": p, "alternatives": d.alternatives})
        return out

    def locate(self, images: str | Sequence[str], mode: str | None = None, k: int = 50, crops: int = 1) -> Any:
        """Answer for each image; a single path (not a list) gives a single dict."""
        single = isinstance(images, (str, Path))
        paths = expand_images([str(images)] if single else [str(i) for i in images])
        emb, errors = self.embed(paths, crops=crops)
        good = [i for i in range(len(paths)) if i not in errors]
        answers: list[dict[str, Any]] = [{} for _ in paths]
        for i, ans in zip(good, self.locate_embeddings(emb[good], mode=mode, k=k) if good else []):
            answers[i] = ans
        for i, p in enumerate(paths):
            answers[i] = {"image": p, **answers[i], "error": errors.get(i)}
            if i in errors:
                answers[i].update({"lat": None, "lon": None, "confidence": None, "neighbors": []})
        return answers[0] if single and len(answers) == 1 else answers

    def _neighbours(self, sims: np.ndarray, rows: np.ndarray, dist_km: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"id": i, "path": p, "lat": la, "lon": lo, "similarity": round(s, 6), "distance_km": round(d, 3)}
            for i, p, la, lo, s, d in zip(self.ids[rows].tolist(), self.paths[rows].tolist(), self.lat[rows].tolist(),
                                          self.lon[rows].tolist(), np.asarray(sims, float).tolist(),
                                          np.asarray(dist_km, float).tolist())
        ]

    def _answer_knn(self, sims: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        vote = kde_vote(self.lat[rows], self.lon[rows], sims, self.knn_params)
        return {
            "lat": vote.lat, "lon": vote.lon, "mode": "knn",
            "confidence": round(vote.confidence, 4), "confidence_radius_km": self.knn_params.radius_km,
            "neighbors": self._neighbours(sims, rows, vote.distance_km),
        }
