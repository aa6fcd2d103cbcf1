"""Build and search the GPS gallery stored in a bundle.

The gallery points are encoded once here and stored as a FAISS inner-product
index over L2-normalised location features, so a query costs one projection
and one search — GeoCLIP's ``predict()`` re-encodes its 100K points per query.

Bundle files (all under ``gallery/``)::

    location_encoder.safetensors   LocationEncoder weights + config metadata
    image_projection.safetensors   ImageProjection weights (incl. logit_scale) + config metadata
    gallery.json                   config, sources, counts, training metrics
    points.parquet                 lat, lon, source (row i = FAISS id i)
    gallery.faiss                  inner-product index over [L2-normalised location feature, log prior / logit_scale]:
                                   exact (Flat) up to EXACT_POINTS points, IVF-Flat above (see gallery_index)
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import faiss
import numpy as np
import pyarrow as pa

from geo.core.geodesy import valid_latlon
from geo.core.priors import photos_within
from geo.core.runtime import resolve_device
from geo.core.names import find_column
from geo.core.splits import group_column
from geo.core.tables import positions, read_columns
from geo.data.columns import LAT_COLUMNS, LON_COLUMNS
from geo.models.location import (
    ImageProjection,
    LocationEncoder,
    geoclip_gallery_csv,
    load_module,
    save_module,
)
from geo.stages.gallery.train import TUNED, TrainConfig, train_gallery
from geo.stages.knn import TRAIN_PER_LIST, ivf_layout, selected
from geo.store.atomic import atomic_write_faiss, atomic_write_json, atomic_write_parquet
from geo.store.bundle import Bundle, BundleError
from geo.store.schema import read_checked

if TYPE_CHECKING:
    import pandas as pd

GALLERY_DIR = "gallery"
FILES = {
    "location_encoder": "gallery/location_encoder.safetensors",
    "image_projection": "gallery/image_projection.safetensors",
    "json": "gallery/gallery.json",
    "points": "gallery/points.parquet",
    "faiss": "gallery/gallery.faiss",
}
GEOCLIP_GALLERY = "geoclip"
DEDUP_DECIMALS = 5  # ~1 m: photos shot at one spot become one gallery point
# A gallery of up to this many points is searched exactly (4 ms a query at 20K points on a 2-core CPU); a larger
# one through an IVF index, which visits a quarter of its lists (PROBE_SHARE). One exact search of the 100K points
# that ``max_points`` allows took 19.5 ms, half a forward pass (benchmarks/RESULTS.md, issue 25).
EXACT_POINTS = 20_000
# The share of an IVF gallery's lists a search visits. A photo's projection is far from every point's feature
# (its best cosine is low), so its 32 best points spread over many lists: on the realistic testbed a quarter of the
# lists found 98 % of them and the same fused answer for 99.3 % of photos, accuracy unchanged at every threshold.
PROBE_SHARE = 4


@dataclass
class GalleryConfig(TrainConfig):
    """The gallery stage's settings: its training (:class:`TrainConfig`) and where its points come from."""

    # Extra gallery points beyond the gallery photos' own: a CSV with lat/lon (or LAT/LON) columns, or
    # 'geoclip' for GeoCLIP's 100K points (the default with the geoclip backbone).
    gps_gallery: str | None = None
    # Metadata column whose groups never straddle the train/validation split
    # (default: the first of AUTHOR, author, owner, ... present, else each photo is its own group).
    group_column: str | None = None
    # Most gallery points taken from the photos' distinct places (a uniform sample above; GeoCLIP uses 100K).
    max_points: int = 100_000

    def train_config(self, backbone_name: str, dim: int) -> TrainConfig:
        """The training config with 'auto' resolved for this bundle's backbone."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        if cfg.image_init == "auto":
            cfg.image_init = resolve_image_init(backbone_name, dim)
        return cfg


def resolve_image_init(backbone_name: str, dim: int) -> str:
    """What image_init 'auto' starts from for embeddings of this backbone: GeoCLIP's image MLP where the
    features are the ones it was trained on, no MLP where the backbone already applied it."""
    name = backbone_name.lower()
    if name.startswith("geoclip"):
        return "identity"  # the geoclip backbone already applies GeoCLIP's image MLP
    if dim == 768 and ("vit-l-14" in name or "vit-l/14" in name):
        return "geoclip"
    return "random"


def read_gps_csv(path: str | Path) -> np.ndarray:
    """float64 [n, 2] valid (lat, lon) rows of a CSV; columns lat/lon in any case, or latitude/longitude."""
    import pandas as pd  # the build's: a query reads no GPS file

    path = geoclip_gallery_csv() if str(path) == GEOCLIP_GALLERY else Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: --gps-gallery file not found") from None
    lat_c, lon_c = find_column(df.columns, LAT_COLUMNS), find_column(df.columns, LON_COLUMNS)
    if lat_c is None or lon_c is None:
        raise ValueError(f"{path}: needs lat and lon columns (found {list(df.columns)[:8]})")
    ll = df[[lat_c, lon_c]].to_numpy(np.float64)
    ok = valid_latlon(ll[:, 0], ll[:, 1])
    if not ok.any():
        raise ValueError(f"{path}: no valid coordinates")
    return ll[ok]


def gallery_points(photo_latlon: np.ndarray, extra: str | None, max_points: int = 0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated (latlon [m, 2], source [m]): the photos' distinct places first, then extra points not present.

    A gallery point per distinct place (photos within about a metre pooled), not per photo. Above
    ``max_points`` places (0: no cap) a seeded uniform sample of them is kept: each place is as likely
    as any other, so the sample keeps the places' density, where the photos are.
    """
    photo = np.unique(np.round(np.asarray(photo_latlon, np.float64), DEDUP_DECIMALS), axis=0)
    if 0 < max_points < len(photo):
        photo = photo[np.sort(np.random.default_rng(seed).choice(len(photo), max_points, replace=False))]
    if not extra:
        return photo, np.full(len(photo), "photos", dtype=object)
    ext = np.unique(np.round(read_gps_csv(extra), DEDUP_DECIMALS), axis=0)
    seen = {tuple(p) for p in photo.tolist()}
    ext = ext[[tuple(p) not in seen for p in ext.tolist()]]
    label = GEOCLIP_GALLERY if extra == GEOCLIP_GALLERY else f"extra:{Path(extra).name}"
    src = np.concatenate([np.full(len(photo), "photos", dtype=object), np.full(len(ext), label, dtype=object)])
    return np.concatenate([photo, ext]), src


def extra_points(config: GalleryConfig, backbone: str) -> str | None:
    """The GPS points a gallery adds to the photos' places: the configured file, or GeoCLIP's 100K for GeoCLIP's own
    backbone (whose location encoder was trained on them)."""
    if config.gps_gallery is None and backbone.lower().startswith("geoclip"):
        return GEOCLIP_GALLERY
    return config.gps_gallery


def fit_gallery(meta: pd.DataFrame, emb: np.ndarray, config: GalleryConfig = GalleryConfig(), backbone: str = "",
                log: Callable[[str], None] = print, val: np.ndarray | None = None,
                photos: np.ndarray | None = None) -> "GpsGallery":
    """Train the gallery modules on the embeddings, encode the gallery points once: the stage's artifact, in memory.

    ``backbone`` is the name of the model that made the embeddings (GeoCLIP's own gets GeoCLIP's 100K points
    and an identity start for the image projection). ``meta``/``emb`` are the photos training sees (the whole
    gallery, or the pipeline's bounded sample of a large one, with ``val`` marking its held-out photographers);
    ``photos`` are every gallery photo's (lat, lon) [n, 2], whose places become the points (default: ``meta``'s).
    """
    config = dataclasses.replace(config, gps_gallery=extra_points(config, backbone))
    latlon = meta[["lat", "lon"]].to_numpy(np.float64)
    ok = valid_latlon(latlon[:, 0], latlon[:, 1])
    if not ok.any():
        raise ValueError("no embedding has valid coordinates; the gallery needs some")
    group_col = group_column(meta.columns, config.group_column)
    groups = meta[group_col].astype(str).to_numpy()[ok] if group_col else None
    every = latlon[ok] if photos is None else np.asarray(photos, np.float64)
    every = every[valid_latlon(every[:, 0], every[:, 1])]
    points, sources = gallery_points(every, config.gps_gallery, config.max_points, config.seed)

    t0 = time.perf_counter()
    tcfg = config.train_config(backbone, emb.shape[1])
    result = train_gallery(emb[ok] if not ok.all() else emb, latlon[ok], groups, tcfg,
                           extra_latlon=points[sources != "photos"], log=log, val=val[ok] if val is not None else None)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = encode_points(result.location_encoder, result.image_projection, points, every, config)
    t_encode = time.perf_counter() - t0
    logit_scale = result.image_projection.logit_scale.exp().item()
    info = {
        "config": {**dataclasses.asdict(config), "image_init": tcfg.image_init, "group_column": group_col},
        "n_points": int(len(points)),
        "sources": {str(s): int(n) for s, n in zip(*np.unique(sources.astype(str), return_counts=True))},
        "dim": int(index.d - 1),
        "index_dim": int(index.d),
        **index_info(index),
        "embedding_dim": int(emb.shape[1]),
        "logit_scale": logit_scale,
        "train": result.metrics,
        "seconds": {"train": round(t_train, 2), "encode_gallery": round(t_encode, 2)},
    }
    return GpsGallery(result.image_projection, index, points, sources, info, result.location_encoder)


def encode_points(location_encoder: LocationEncoder, projection: ImageProjection, points: np.ndarray,
                  photo_latlon: np.ndarray, config: GalleryConfig, known: "GpsGallery | None" = None) -> faiss.Index:
    """The searchable gallery: each point's location feature and, in one extra column, its log photo prior.

    [q, 1] . [p, b / s] = cos + b / s, so s * IP = logit + log prior: one inner-product
    search gives the model's logits plus the photo-density prior. ``known``: a gallery built by this same
    encoder; the points it holds are copied from its index, only the others are encoded (the encoder is
    ~60 % of a 250K-point gallery's encoding on a CPU). The vectors are written into one matrix, a block
    at a time, so the features exist once beside the index's own copy.
    """
    rows = positions(_keys(known.points), _keys(points)) if known is not None else np.full(len(points), -1)
    new = np.flatnonzero(rows < 0)
    feats = None
    if len(new) or known is None:
        feats = location_encoder.to(resolve_device(config.device)).encode(points[new], normalize=True)
        location_encoder.cpu()
    dim = feats.shape[1] if feats is not None else known.index.d - 1
    vectors = np.empty((len(points), dim + 1), np.float32)
    if feats is not None:
        vectors[new, :dim] = feats
        del feats
    hit = np.flatnonzero(rows >= 0)
    for b in range(0, len(hit), 16384):
        vectors[hit[b:b + 16384]] = known.index.reconstruct_batch(rows[hit[b:b + 16384]])
    logit_scale = projection.logit_scale.exp().item()
    log_prior = TUNED.prior_weight * np.log1p(
        photos_within(points, photo_latlon, TUNED.prior_radius_km, seed=config.seed)).astype(np.float32)
    vectors[:, dim] = log_prior / logit_scale
    return gallery_index(vectors, config.seed)


def gallery_index(vectors: np.ndarray, seed: int = 0) -> faiss.Index:
    """The searchable index over the gallery's vectors: exact up to :data:`EXACT_POINTS` points, above them
    IVF-Flat laid out as the kNN index is (:func:`~geo.stages.knn.ivf_layout`: about sqrt(n) lists, k-means on a
    seeded sample), a search visiting :data:`PROBE_SHARE` of them. Its direct map lets ``geo add`` copy a known
    point's vector out."""
    n, dim = vectors.shape
    if n <= EXACT_POINTS:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index
    nlist, quantizer, _ = ivf_layout(n, dim)
    index = faiss.index_factory(dim, f"{quantizer},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False))
    index.cp.seed = seed
    index.train(vectors[sample])
    index.add(vectors)
    index.make_direct_map()
    index.nprobe = max(1, nlist // PROBE_SHARE)
    return index


def index_info(index: faiss.Index) -> dict[str, Any]:
    """What gallery.json records of the index: its kind and, for IVF, its lists and how many a search visits."""
    ivf = faiss.try_extract_index_ivf(index)  # built by gallery_index for its size: the layout names it
    return {"index": "Flat"} if ivf is None else {"index": f"{ivf_layout(index.ntotal, index.d)[1]},Flat",
                                                  "nprobe": int(ivf.nprobe)}


def _keys(points: np.ndarray) -> np.ndarray:
    """A point's two coordinates as one hashable value, equal only where both are (gallery points are unique)."""
    return np.asarray(points, np.float64) @ np.array([1.0, 1.0j])


# what a load and `geo add` read of gallery.json (the rest is the build's record, shown by `geo info`)
INFO_SCHEMA = {"config?": dict, "n_points": int, "dim?": int, "train?": dict, "sources?": {"*": int}}


def with_photos(gallery: "GpsGallery", photo_latlon: np.ndarray) -> "GpsGallery":
    """The same trained modules over the places of these photos (all of the gallery's, old and new):
    points and their density prior recomputed, nothing trained. What ``geo add`` does to the gallery."""
    if gallery.location_encoder is None:
        raise ValueError("load the gallery with its location encoder to add photos")
    stored = gallery.info.get("config", {})
    config = GalleryConfig(**{k: v for k, v in stored.items() if k in {f.name for f in dataclasses.fields(GalleryConfig)}})
    latlon = np.asarray(photo_latlon, np.float64)
    latlon = latlon[valid_latlon(latlon[:, 0], latlon[:, 1])]
    points, sources = gallery_points(latlon, config.gps_gallery, config.max_points, config.seed)
    index = encode_points(gallery.location_encoder, gallery.projection, points, latlon, config, known=gallery)
    kept = {k: v for k, v in gallery.info.items() if k != "nprobe"}  # a gallery grown past EXACT_POINTS turns IVF
    info = {**kept, **index_info(index), "n_points": int(len(points)),
            "sources": {str(s): int(n) for s, n in zip(*np.unique(sources.astype(str), return_counts=True))}}
    return GpsGallery(gallery.projection, index, points, sources, info, gallery.location_encoder)


class GpsGallery:
    """The stored gallery, ready to search with backbone embeddings."""

    def __init__(self, projection: ImageProjection, index, points: np.ndarray, sources: np.ndarray,
                 info: dict[str, Any], location_encoder: LocationEncoder | None = None):
        self.projection = projection.eval()
        self.index = index
        self.points = points
        self.sources = sources
        self.info = info
        self.location_encoder = location_encoder
        self.logit_scale = projection.logit_scale.exp().item()
        self._params = None  # FAISS search parameters (an ID selector: see within)

    def save(self, bundle: Bundle) -> tuple[list[str], dict[str, Any]]:
        """Write the gallery files; returns (files, manifest summary) for the pipeline to commit."""
        if self.location_encoder is None:
            raise ValueError("a gallery loaded without its location encoder cannot be saved")
        root = bundle.root
        save_module(root / FILES["location_encoder"], self.location_encoder)
        save_module(root / FILES["image_projection"], self.projection)
        atomic_write_parquet(root / FILES["points"], pa.table({
            "lat": self.points[:, 0], "lon": self.points[:, 1], "source": pa.array(self.sources.astype(str))}))
        atomic_write_faiss(root / FILES["faiss"], self.index)
        atomic_write_json(root / FILES["json"], self.info)
        summary = {k: v for k, v in self.info.items() if k not in ("train", "config")}
        summary["best_epoch"] = self.info.get("train", {}).get("best_epoch")
        return list(FILES.values()), summary

    @classmethod
    def load(cls, bundle: Bundle, with_location_encoder: bool = False) -> "GpsGallery":
        """Open the gallery files of ``bundle``; errors name the file and the reason."""
        bundle.stage("gallery")
        root = bundle.root
        info = read_checked(root / FILES["json"], INFO_SCHEMA)
        proj = _load(root / FILES["image_projection"], ImageProjection)
        loc = _load(root / FILES["location_encoder"], LocationEncoder) if with_location_encoder else None
        fpath = root / FILES["faiss"]
        if not fpath.exists():
            raise BundleError(f"{fpath}: missing")
        index = faiss.read_index(str(fpath))
        ppath = root / FILES["points"]
        if not ppath.exists():
            raise BundleError(f"{ppath}: missing")
        tab = read_columns(ppath)
        rows = len(tab["lat"])
        if index.ntotal != rows or index.d != proj.out_dim + 1:
            raise BundleError(f"{fpath}: {index.ntotal} points of dim {index.d}, but {ppath.name} has {rows} rows "
                              f"and the projection gives {proj.out_dim}-d features (+1 prior column)")
        points = np.stack([tab["lat"], tab["lon"]], 1).astype(np.float64)
        return cls(proj, index, points, tab["source"], info, loc)

    def search(self, emb: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(latlon [n, k, 2], scores [n, k]) of the k best gallery points per embedding.

        Scores are ``logit_scale * cosine + prior_weight * log p(point)``: the
        model's logits plus the photo-density prior, so a softmax over them is
        its posterior over the gallery (with prior_weight 0, plain logits).
        """
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim == 1:
            emb = emb[None]
        if emb.shape[1] != self.projection.in_dim:
            raise ValueError(f"gallery expects {self.projection.in_dim}-d backbone embeddings, got {emb.shape[1]}-d")
        k = max(1, min(int(k), self.index.ntotal))
        q = np.ones((len(emb), self.projection.out_dim + 1), np.float32)  # the last column reads the prior
        q[:, :-1] = self.projection.encode(emb, normalize=True)
        sims, ids = self.index.search(q, k, params=self._params[0] if self._params else None)
        found = ids >= 0  # fewer than k where a selector (``within``) keeps fewer points: padding, no score
        return (np.where(found[..., None], self.points[ids], np.nan),
                np.where(found, self.logit_scale * np.where(found, sims, 0.0), -np.inf).astype(np.float32))

    def within(self, rows: np.ndarray) -> "GpsGallery":
        """The same gallery, searched as if it held only the points ``rows`` (a query-time constraint). An IVF
        gallery visits as many more lists as the share of points inside is small, as the kNN index does."""
        out = copy.copy(self)
        out._params = selected(self.index, faiss.IDSelectorBatch(np.asarray(rows, np.int64)),
                               self.index.ntotal / max(len(rows), 1))
        return out


def _load(path: Path, kind: type):
    try:
        module = load_module(path)
    except (FileNotFoundError, ValueError) as e:
        raise BundleError(str(e)) from None
    if not isinstance(module, kind):
        raise BundleError(f"{path}: holds a {type(module).__name__}, expected {kind.__name__}")
    return module
