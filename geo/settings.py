"""How a bundle is built: every stage's config, the skipped stages, and their JSON form.

A bundle records its build settings in ``manifest.json`` (``build.settings``) so that ``geo add --refit``,
``geo build-index --force STAGE`` and a resumed build refit with them, and ``geo info`` shows them. The same
shape is what ``geo build-index --config FILE`` reads (JSON or TOML), so a bundle's settings can be copied
into another build. Precedence: the dataclasses' defaults < the bundle's recorded settings < ``--config``
< the options given explicitly on the command line (:func:`layered`).

The conversion is generic over the dataclasses' fields: a field added to a stage's config is recorded and
settable without a change here. Reading a record is lenient (keys from another version are ignored, missing
ones take their defaults: a bundle from before this record refits with defaults); reading a ``--config``
file is strict (an unknown key or a value of the wrong type names the file and the key).

Machine-specific fields (:data:`MACHINE`: the device, decoding workers, the embedding batch, precision) are
not build settings: a ``--config`` file may set them for this run, but they are never recorded, so the
current machine's values win when a bundle is refitted elsewhere.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from geo.core.settings_file import read_settings_file
from geo.stages.cells.partition import PARTITIONERS
from geo.stages.cells.stage import CellsConfig
from geo.stages.embed import EmbedConfig
from geo.stages.fusion.stage import FusionConfig
from geo.stages.gallery.stage import GalleryConfig
from geo.stages.knn import KnnConfig

SKIPPABLE = ("cells", "gallery", "fusion")
# Dotted paths (a bare name matches at any depth) of the fields that describe this machine, not the build.
MACHINE = ("device", "workers", "precision", "embed.batch_size")


class SettingsError(ValueError):
    """A settings file (``--config``) that cannot be used; the message names the file and the key."""


@dataclass
class StageConfigs:
    """Every fitted stage's options; ``group_column`` (photographers) is the one split all of them hold out."""

    knn: KnnConfig = field(default_factory=KnnConfig)
    cells: CellsConfig = field(default_factory=CellsConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    group_column: str | None = None
    # The most photos whose embeddings the trained stages hold: above, a seeded uniform sample of the gallery
    # is what the heads and the location encoder train and validate on (their compute caps see fewer photos
    # than this anyway), while partitions, cell counts, gallery points and the kNN index use every photo.
    train_photos: int = 200_000

    def resolved(self) -> "StageConfigs":
        """The configs with the shared group column (when given) set in each stage that splits by it."""
        if self.group_column is None:
            return self
        g = self.group_column
        return dataclasses.replace(self, cells=dataclasses.replace(self.cells, group_column=g),
                                   gallery=dataclasses.replace(self.gallery, group_column=g),
                                   fusion=dataclasses.replace(self.fusion, group_column=g))


@dataclass
class BuildSettings:
    """Everything a build is told beyond its input and output. In the JSON form the fields of ``stages``
    sit at the top level beside ``embed``, ``skip`` and ``precision``."""

    stages: StageConfigs = field(default_factory=StageConfigs)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    skip: tuple[str, ...] = ()  # of SKIPPABLE: stages this build leaves out
    precision: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16: machine-specific

    def stage_names(self, all_stages: Iterable[str]) -> tuple[str, ...]:
        return tuple(s for s in all_stages if s not in self.skip)


def _machine(path: str) -> bool:
    return path in MACHINE or path.rsplit(".", 1)[-1] in MACHINE


def _dump(obj: Any, prefix: str, machine: bool) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        path, value = prefix + f.name, getattr(obj, f.name)
        if not machine and _machine(path):
            continue
        if dataclasses.is_dataclass(value):
            out[f.name] = _dump(value, path + ".", machine)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def to_dict(settings: BuildSettings, machine: bool = False) -> dict[str, Any]:
    """The JSON form; without ``machine``, what a bundle records (no machine-specific field)."""
    d = _dump(settings, "", machine)
    return {**d.pop("stages"), **d}


def build_record(configs: StageConfigs, embed: EmbedConfig, stages: Iterable[str]) -> dict[str, Any]:
    """What ``manifest.json`` records for a build of ``stages`` (the skippable ones left out are ``skip``)."""
    stages = set(stages)
    return to_dict(BuildSettings(configs, embed, tuple(s for s in SKIPPABLE if s not in stages)))


def recorded(manifest: dict[str, Any]) -> dict[str, Any]:
    """A bundle's recorded settings ({} for a bundle built before they were recorded)."""
    build = manifest.get("build")
    settings = build.get("settings") if isinstance(build, dict) else None
    return settings if isinstance(settings, dict) else {}


# ---------------------------------------------------------------- from the JSON form
def _fit(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does ``value`` fit the type ``hint``, the value converted to it: lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = _fit(value, arg)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_fit(v, inner[0]) if inner else (True, v) for v in value]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) \
            if isinstance(value, (int, float)) else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (str, bool):
        return isinstance(value, hint), value
    return True, value


def _load(cls: type, data: Any, prefix: str, strict: bool, where: str, extra: dict[str, Any] | None = None) -> Any:
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: {prefix.rstrip('.') or 'the settings'} must be a table/object, "
                            f"not {data!r}")
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    kwargs = dict(extra or {})
    for key, value in data.items():
        path = prefix + key
        if key not in names or key in kwargs:
            if strict:
                raise SettingsError(f"{where}: unknown key {path!r} ({prefix.rstrip('.') or 'the top level'} "
                                    f"takes {', '.join(n for n in names if n not in kwargs)})")
            continue
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _load(hints[key], value, path + ".", strict, where)
            continue
        ok, value = _fit(value, hints[key])
        if ok:
            kwargs[key] = value
        elif strict:
            raise SettingsError(f"{where}: {path} must be {_type_name(hints[key])}, not {value!r}")
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(data: dict[str, Any], strict: bool = False, where: str = "settings") -> BuildSettings:
    """Settings from their JSON form, defaults filling what it lacks. Lenient (a recorded form from another
    version): unknown keys and ill-typed values are ignored. ``strict`` (a ``--config`` file): they are a
    :class:`SettingsError` naming ``where`` and the key, and so are unknown stages and partitioners."""
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: the settings must be a table/object")
    stage_names = {f.name for f in dataclasses.fields(StageConfigs)}
    stages = _load(StageConfigs, {k: v for k, v in data.items() if k in stage_names}, "", strict, where)
    rest = {k: v for k, v in data.items() if k not in stage_names}
    settings = _load(BuildSettings, rest, "", strict, where, extra={"stages": stages})
    bad = sorted(set(settings.skip) - set(SKIPPABLE))
    if bad and strict:
        raise SettingsError(f"{where}: skip takes {', '.join(SKIPPABLE)}, not {', '.join(bad)}")
    if settings.stages.cells.partitioner not in PARTITIONERS and strict:
        raise SettingsError(f"{where}: cells.partitioner takes {', '.join(PARTITIONERS)}, "
                            f"not {settings.stages.cells.partitioner!r}")
    return dataclasses.replace(settings, skip=tuple(s for s in settings.skip if s in SKIPPABLE))


def read_config(path: str | Path) -> dict[str, Any]:
    """A ``--config`` file's settings (JSON, or TOML when the name ends in .toml), checked strictly.

    ``geo info --json``'s whole output is accepted too: its recorded ``build.settings`` are taken."""
    path = Path(path)
    data = read_settings_file(path, SettingsError)
    if isinstance(data, dict) and isinstance(data.get("build"), dict) and "format_version" in data:
        data = recorded(data)
    from_dict(data, strict=True, where=str(path))
    return data


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """The layers' union, later ones winning key by key (tables merged, other values replaced)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def layered(record: dict[str, Any], config: dict[str, Any], explicit: dict[str, Any]) -> BuildSettings:
    """The one precedence: defaults < a bundle's ``record`` < a ``--config`` file < options given explicitly."""
    lenient = to_dict(from_dict(record), machine=False)  # keys of another version dropped, machine fields too
    return from_dict(merged(lenient, config, explicit), strict=True, where="the options")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def non_default(record: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings that differ from the defaults, by dotted path (what ``geo info`` prints)."""
    defaults, got = _flat(to_dict(BuildSettings())), _flat(to_dict(from_dict(record)))
    return {k: v for k, v in got.items() if defaults.get(k) != v}


# The stages each setting shapes (the top-level group column and training sample shape every trained stage).
_SHAPES = {"knn": ("knn_index",), "cells": ("cells",), "gallery": ("gallery",), "fusion": ("fusion",),
           "group_column": ("cells", "gallery", "fusion"), "train_photos": ("cells", "gallery")}


def unapplied(record: dict[str, Any], settings: BuildSettings, built: Iterable[str],
              rebuilt: Iterable[str]) -> list[str]:
    """Settings that differ from a bundle's ``record`` but shape a stage that is ``built`` and not ``rebuilt``:
    recording them would misdescribe that stage. (The index budget is left out: it is this run's memory.)"""
    if not record:
        return []
    old, new = _flat(to_dict(from_dict(record))), _flat(to_dict(settings))
    keep = set(built) - set(rebuilt)
    return [f"{k} {old.get(k)!r} -> {v!r} ({'/'.join(_SHAPES[k.split('.')[0]])})" for k, v in new.items()
            if old.get(k) != v and k != "knn.ram_budget" and set(_SHAPES.get(k.split(".")[0], ())) & keep]
