"""The index bundle: one directory, one ``manifest.json``, every file hashed.

Layout (each stage owns a sub-directory and can be run, resumed and tested alone)::

    manifest.json                 format, backbone, dim, counts, stages, sha256 of every file
    errors.parquet                one row per input that failed: path, stage, reason
    embeddings/part-00000.parquet id, path, lat, lon, <manifest extras>, embedding (fixed_size_list<float32>)
    embeddings/part-00000.json    shard completion marker + stats (rows, failed, seconds)
    index/knn.faiss, index/index_infos.json
    cells/..., heads/...          cell partitions and classification heads
    gallery/...                   location encoder and encoded GPS gallery
    fusion/fusion.json            tuned fusion weights and calibration

Every write goes through a temp file + ``os.replace`` so an interrupted build
never leaves a half-written file under a final name.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

FORMAT_NAME = "geo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message says which file and why."""


# ---------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename onto ``path``; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def atomic_write_parquet(path: str | os.PathLike, table) -> Path:
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_faiss(path: str | os.PathLike, index) -> Path:
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    return atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("geo", "torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "numpy", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- the bundle
class Bundle:
    """A bundle directory and its manifest.

    Stages call :meth:`register` after their files are in place; the manifest
    is rewritten atomically each time, so the manifest never names a file
    whose hash it does not hold.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root).absolute()  # stage files are registered relative to it
        self.manifest = manifest

    # -- creation / opening
    @classmethod
    def create_or_resume(cls, root: str | os.PathLike, backbone: dict[str, Any], dim: int) -> "Bundle":
        """Start a new bundle, or resume one built with the same backbone."""
        root = Path(root)
        mpath = root / MANIFEST
        if mpath.exists():
            b = cls(root, _check_format(read_json(mpath), mpath))
            if b.manifest.get("backbone", {}).get("name") != backbone.get("name"):
                raise BundleError(
                    f"{mpath}: built with backbone {b.manifest.get('backbone', {}).get('name')!r}, "
                    f"not {backbone.get('name')!r}; choose another --out or delete the directory"
                )
            return b
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "software": software_versions(),
            "backbone": backbone,
            "dim": int(dim),
            "counts": {},
            "stages": {},
            "files": {},
        }
        b = cls(root, manifest)
        b.save()
        return b

    def save(self) -> None:
        self.manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def register(self, stage: str, files: Iterable[str | os.PathLike], info: dict[str, Any] | None = None,
                 replace_prefix: str | None = None) -> None:
        """Record ``files`` (relative to the root, or absolute inside it) with their sha256 under ``stage``.

        ``replace_prefix`` drops previously registered files under that prefix
        first, so a re-run stage does not leave stale entries behind.
        """
        if replace_prefix is not None:
            self.manifest["files"] = {k: v for k, v in self.manifest["files"].items() if not k.startswith(replace_prefix)}
        for f in files:
            p = Path(f)
            rel = p.relative_to(self.root).as_posix() if p.is_absolute() else p.as_posix()
            full = self.root / rel
            self.manifest["files"][rel] = {"sha256": sha256_file(full), "bytes": full.stat().st_size}
        if info is not None:
            self.manifest["stages"][stage] = info
        self.save()

    def has_stage(self, stage: str) -> bool:
        return stage in self.manifest.get("stages", {})

    def stage(self, stage: str) -> dict[str, Any]:
        try:
            return self.manifest["stages"][stage]
        except KeyError:
            raise BundleError(f"{self.root}: stage {stage!r} was not built (run `geo build-index` with it)") from None

    def verify(self, hashes: bool = True) -> None:
        """Refuse a bundle whose files are missing, truncated or altered."""
        for rel, meta in self.manifest.get("files", {}).items():
            p = self.root / rel
            if not p.exists():
                raise BundleError(f"{p}: listed in {MANIFEST} but missing")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise BundleError(f"{p}: {size} bytes, {MANIFEST} says {meta['bytes']} (truncated or altered)")
            if hashes and sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{p}: sha256 does not match {MANIFEST} (file altered since the build)")

    # -- embeddings
    def embedding_shards(self) -> list[Path]:
        """Completed shards in order (a shard counts once its marker JSON exists)."""
        d = self.root / "embeddings"
        return sorted(p for p in d.glob("part-*.parquet") if p.with_suffix(".json").exists())

    def iter_embeddings(self, columns: list[str] | None = None, batch_rows: int = 65536) -> Iterator[tuple[Any, np.ndarray]]:
        """Stream (metadata table, float32 [n, dim]) in pieces, never the whole gallery at once."""
        import pyarrow.parquet as pq

        for shard in self.embedding_shards():
            pf = pq.ParquetFile(shard)
            cols = None if columns is None else list(dict.fromkeys([*columns, "embedding"]))
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                emb = embedding_matrix(batch.column("embedding"))
                yield batch.drop_columns(["embedding"]) if hasattr(batch, "drop_columns") else batch, emb

    def read_embeddings(self, columns: list[str] | None = None) -> tuple[Any, np.ndarray]:
        """All metadata as a pandas DataFrame and all embeddings as float32 [n, dim]."""
        import pyarrow as pa

        metas, embs = [], []
        for meta, emb in self.iter_embeddings(columns):
            metas.append(pa.Table.from_batches([meta]))
            embs.append(emb)
        if not embs:
            raise BundleError(f"{self.root}: no embeddings (did every image fail? see errors.parquet)")
        table = pa.concat_tables(metas)
        return table.to_pandas(), np.concatenate(embs).astype(np.float32, copy=False)


def embedding_matrix(column) -> np.ndarray:
    """float32 [n, dim] from an Arrow fixed_size_list<float32> column without a Python loop."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def _check_format(manifest: Any, mpath: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{mpath}: not a geo index bundle")
    v = manifest.get("format_version")
    if not isinstance(v, int):
        raise BundleError(f"{mpath}: format_version missing or not an integer")
    if v > FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format {v} is newer than this geo understands ({FORMAT_VERSION}); upgrade geo"
        )
    return manifest


def open_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open and (by default) verify a bundle; raises :class:`BundleError` with the file and reason."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such index directory")
    b = Bundle(root, _check_format(read_json(mpath), mpath))
    if verify:
        b.verify()
    return b
