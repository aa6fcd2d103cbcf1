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
from geo.retrieval.inputs import expand_images
from geo.retrieval.knn import KnnParams, kde_vote

MODES = ("fused", "knn", "gallery", "cells")


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
        self.knn_params = KnnParams(**bundle.manifest.get("stages", {}).get("knn_vote", {}))

    @classmethod
    def open(cls, path: str | Path, device: str = "auto", verify: bool = True) -> "GeoIndex":
        return cls(open_bundle(path, verify=verify), device=device)

    # ------------------------------------------------------------ components
    @cached_property
    def backbone(self):
        from geo.backbones import backbone_from_spec

        return backbone_from_spec(self.bundle.manifest["backbone"], device=self.device)

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
        q = emb.mean(axis=1) if emb.ndim == 3 else emb
        return self.knn_index.search(np.ascontiguousarray(q, np.float32), min(k, self.knn_index.ntotal))

    def locate_embeddings(self, emb: np.ndarray, mode: str | None = None, k: int = 50) -> list[dict[str, Any]]:
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available in {self.bundle.root}; built: {', '.join(self.modes)}")
        sims, rows = self.search(emb, k)
        return [self._answer_knn(s[r >= 0], r[r >= 0]) for s, r in zip(sims, rows)]

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
            {"id": self.ids[r], "path": self.paths[r], "lat": float(self.lat[r]), "lon": float(self.lon[r]),
             "similarity": round(float(s), 6), "distance_km": round(float(d), 3)}
            for s, r, d in zip(sims, rows, dist_km)
        ]

    def _answer_knn(self, sims: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        vote = kde_vote(self.lat[rows], self.lon[rows], sims, self.knn_params)
        return {
            "lat": vote.lat, "lon": vote.lon, "mode": "knn",
            "confidence": round(vote.confidence, 4), "confidence_radius_km": self.knn_params.radius_km,
            "neighbors": self._neighbours(sims, rows, vote.distance_km),
        }
