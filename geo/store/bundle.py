"""The index bundle: one directory, one ``manifest.json``, every file's size and sha256.

Layout (each stage owns a sub-directory and can be run, resumed and tested alone;
docs/ARCHITECTURE.md describes every file)::

    manifest.json                 format, backbone, dim, counts, stages, sha256 of every file
    errors.parquet                one row per input that failed: path, stage, reason
    embeddings/part-00000.parquet id, path, lat, lon, <manifest extras>, embedding (fixed_size_list<float32>)
    embeddings/part-00000.json    shard completion marker + stats (rows, failed, seconds)
    index/knn.faiss, index/index_infos.json
    cells/..., heads/...          cell partitions and classification heads
    gallery/...                   location encoder and encoded GPS gallery
    fusion/fusion.json            tuned fusion weights and calibration

Stages write only their own files (atomically: :mod:`geo.store.atomic`) and
never the manifest; the pipeline records a finished stage's files and info in
one step (:meth:`Bundle.commit`), so the manifest never names a file it holds
no size and hash for, and future parallel workers need write only their own
files. Opening a bundle checks the format and every listed file's size (fast);
the full sha256 check runs at build and in ``geo info --verify``.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from geo.core.files import NO_CAP, FileRefused, printable, read_capped, regular_size
from geo.store.atomic import ROLLBACK_DIR, atomic_write_json, sha256_file
from geo.store.lock import LOCK_FILE

# manifest.json of a 5M-photo bundle is a few MB; nothing geo writes as JSON comes near this
JSON_MAX_BYTES = 256 << 20
FORMAT_NAME = "geo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INTERRUPTED_ADD = ("; a `geo add` was killed while rewriting it: re-run that `geo add` (it puts the bundle's files "
                   "back first, then resumes)")


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message says which file and why."""


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(read_capped(path, JSON_MAX_BYTES))
    except FileRefused as e:
        raise BundleError(f"{path}: missing" if e.reason == "file not found" else f"{path}: {e.reason}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None


def software_versions() -> dict[str, str]:
    out = {}
    for dist in ("geo", "torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "numpy", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- the bundle
SUMMARY_KEYS = ("format_version", "created", "backbone", "dim", "counts", "stages", "software", "stale", "additions",
                "build")


class Bundle:
    """A bundle directory and its manifest.

    The pipeline calls :meth:`commit` once a stage's files are in place.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root).absolute()  # stage files are registered relative to it
        self.manifest = manifest
        self._held = False  # inside one_commit: saves wait for its end

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
        if self._held:
            return
        self.manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.root / MANIFEST, self.manifest)

    @contextmanager
    def one_commit(self) -> Iterator["Bundle"]:
        """Every commit and save inside the block reaches ``manifest.json`` as one atomic rewrite at its end, so
        readers see all of it or none; if the block raises, nothing is written and the manifest in memory is
        what it was before (``geo add``: new shards are read by nobody until the addition is whole)."""
        before, self._held = copy.deepcopy(self.manifest), True
        try:
            yield self
            self._held = False
            self.save()
        except BaseException:
            self.manifest = before
            raise
        finally:
            self._held = False

    def path(self, rel: str) -> Path:
        return self.root / rel

    def commit(self, stage: str, files: Iterable[str | os.PathLike], info: dict[str, Any] | None = None,
               replace: Iterable[str] = ()) -> None:
        """Record a finished stage: ``files`` (relative to the root, or absolute inside it) with their size and
        sha256, and its ``info``, in one atomic rewrite of the manifest.

        ``replace`` (folder prefixes such as "cells/") first drops files recorded
        earlier under them, so a re-run stage leaves no stale entries behind.
        """
        prefixes = tuple(replace)
        if prefixes:
            self.manifest["files"] = {k: v for k, v in self.manifest["files"].items() if not k.startswith(prefixes)}
        for f in files:
            p = Path(f)
            rel = p.relative_to(self.root).as_posix() if p.is_absolute() else p.as_posix()
            full = self.root / rel
            self.manifest["files"][rel] = {"sha256": sha256_file(full), "bytes": full.stat().st_size}
        if info is not None:
            self.manifest["stages"][stage] = info
        self.save()

    # -- completeness: what the build set out to make, and what of it is committed
    def begin_build(self, stages: Iterable[str], settings: dict[str, Any] | None = None) -> None:
        """Record the stages this build will commit, before it commits any: until each is committed (or
        recorded as skipped), readers refuse the bundle as unfinished instead of answering with what is there.

        ``settings`` (JSON-able: :func:`geo.settings.build_record`) are how it is built, recorded so that a
        refit, a forced stage or a resumed build uses them again and ``geo info`` shows them."""
        build = self.manifest.setdefault("build", {})
        build["stages"] = list(dict.fromkeys([*build.get("stages", []), *stages]))
        if settings is not None:
            build["settings"] = settings
        build.setdefault("skipped", {})
        build.pop("finished", None)
        self.save()

    def skip_stage(self, stage: str, reason: str) -> None:
        """A planned stage that the build decided not to fit (e.g. too few photos): complete without it."""
        self.manifest.setdefault("build", {}).setdefault("skipped", {})[stage] = reason
        self.save()

    def end_build(self) -> None:
        self.manifest.setdefault("build", {})["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds")
        self.save()

    def missing_stages(self) -> list[str]:
        """Planned stages neither committed nor skipped (a bundle from before this record needs its kNN index)."""
        build = self.manifest.get("build")
        planned = build.get("stages", []) if isinstance(build, dict) else ["embeddings", "knn_index"]
        skipped = build.get("skipped", {}) if isinstance(build, dict) else {}
        return [s for s in planned if not self.has_stage(s) and s not in skipped]

    def require_complete(self) -> None:
        """Refuse an unfinished bundle (a build killed or still running) with what is done and how to finish."""
        missing = self.missing_stages()
        if missing:
            done = [s for s in self.manifest.get("stages", {}) if s != "errors"]
            raise BundleError(
                f"{self.root}: unfinished build: {', '.join(done) or 'no stage'} done, {', '.join(missing)} not "
                "yet. Re-run the same `geo build-index` command to finish it (it resumes where it stopped).")

    def has_stage(self, stage: str) -> bool:
        return stage in self.manifest.get("stages", {})

    def stage(self, stage: str) -> dict[str, Any]:
        try:
            return self.manifest["stages"][stage]
        except KeyError:
            raise BundleError(f"{self.root}: stage {stage!r} was not built (run `geo build-index` with it)") from None

    def summary(self, sha256_checked: bool) -> dict[str, Any]:
        """What ``geo info --json`` and the server's ``/info`` print: the manifest without its file list, the
        stages still missing, and the files in the folder that the manifest does not list."""
        m = {k: self.manifest[k] for k in SUMMARY_KEYS if k in self.manifest}
        return {**m, "verified": {"files": len(self.manifest.get("files", {})), "sha256": sha256_checked},
                "unfinished": self.missing_stages(), "unlisted": self.unlisted_files()}

    def unlisted_files(self) -> list[str]:
        """Files in the bundle's folder that the manifest does not list (a stray copy, a killed run's temp
        file): no reader opens them; ``geo info`` names them."""
        listed = {*self.manifest.get("files", {}), MANIFEST, LOCK_FILE}
        found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if not p.is_dir())
        return sorted(printable(f) for f in found if f not in listed)

    def verify(self, hashes: bool = True) -> int:
        """Refuse a bundle whose files are missing, truncated or (with ``hashes``) altered; returns the files checked."""
        for rel in self.manifest.get("files", {}):
            self.check_file(rel, hashes)
        return len(self.manifest.get("files", {}))

    def check_file(self, rel: str, hashes: bool = True) -> Path:
        """One listed file's path, once it is present, a regular file of its recorded size and (with ``hashes``)
        its recorded sha256; else a BundleError naming it."""
        meta, p = self.manifest["files"][rel], self.root / rel
        if not p.exists():
            raise BundleError(f"{p}: listed in {MANIFEST} but missing")
        try:
            size = regular_size(p, cap=NO_CAP)  # a FIFO or device is refused here, never opened
        except FileRefused as e:
            raise BundleError(f"{p}: {e.reason}; {MANIFEST} says {meta['bytes']} bytes") from None
        if size != meta["bytes"]:
            raise BundleError(f"{p}: {size} bytes, {MANIFEST} says {meta['bytes']} (truncated or altered)"
                              + (INTERRUPTED_ADD if (self.root / ROLLBACK_DIR / rel).exists() else ""))
        if hashes and sha256_file(p) != meta["sha256"]:
            raise BundleError(f"{p}: sha256 does not match {MANIFEST} (file altered since the build)")
        return p


def _check_format(manifest: Any, mpath: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{mpath}: not a geo index bundle")
    v = manifest.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise BundleError(f"{mpath}: format_version {v!r} is not a format geo wrote (a positive integer)")
    for key, kind in (("stages", dict), ("files", dict), ("counts", dict), ("backbone", dict)):
        if not isinstance(manifest.get(key, {}), kind):
            raise BundleError(f"{mpath}: {key!r} is not a JSON object")
    bad = [k for k, v in manifest.get("stages", {}).items() if not isinstance(v, dict)]
    if bad:
        raise BundleError(f"{mpath}: the record of stage {bad[0]!r} is not a JSON object")
    _check_files(manifest.get("files", {}), mpath)
    ok, embedded = manifest.get("counts", {}).get("ok"), manifest.get("stages", {}).get("embeddings", {}).get("ok")
    if ok is not None and embedded is not None and ok != embedded:
        raise BundleError(f"{mpath}: counts.ok is {ok} but the embeddings stage recorded {embedded} photos "
                          "(the manifest was edited)")
    if v > FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format {v} is newer than this geo understands ({FORMAT_VERSION}); upgrade geo"
        )
    return manifest


_SHA256 = frozenset("0123456789abcdef")


def _check_files(files: dict[str, Any], mpath: Path) -> None:
    """Every ``files`` entry names a file inside the bundle (a relative path without ``..``, not a symlink that
    leads out) and records its ``bytes`` and ``sha256``: a manifest cannot make geo read, or vouch for, a file
    elsewhere (``/etc/passwd`` with its real hash passed ``geo info --verify``)."""
    root = mpath.parent.resolve()
    for rel, meta in files.items():
        where = f"{mpath}: files entry {printable(rel)!r}"
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel != Path(rel).as_posix():
            raise BundleError(f"{where} is not a relative path inside the bundle")
        if not isinstance(meta, dict):
            raise BundleError(f"{where} is not a JSON object with bytes and sha256")
        size, sha = meta.get("bytes"), meta.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{where} has no valid bytes ({size!r})")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _SHA256:
            raise BundleError(f"{where} has no valid sha256 ({printable(str(sha))[:80]!r})")
        if not (root / rel).resolve().is_relative_to(root):
            raise BundleError(f"{where} leads outside the bundle (a symlink to {(root / rel).resolve()})")


def bundle_containing(path: str | os.PathLike) -> Path | None:
    """The bundle directory ``path`` would land in (itself or an ancestor holds a geo manifest), or None: an
    output path there would overwrite or litter the bundle's own files."""
    for d in Path(os.path.abspath(path)).parents:
        m = d / MANIFEST
        if m.is_file():
            try:
                if json.loads(m.read_text()).get("format") == FORMAT_NAME:
                    return d
            except (OSError, ValueError, AttributeError):
                continue
    return None


def open_bundle(root: str | os.PathLike, verify: bool = True, hashes: bool = False) -> Bundle:
    """Open a bundle and check its files' sizes (and, with ``hashes``, their sha256);
    raises :class:`BundleError` with the file and reason."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such index directory")
    b = Bundle(root, _check_format(read_json(mpath), mpath))
    if verify:
        b.verify(hashes=hashes)
    return b
