"""Turn command-line image arguments (paths, globs, directories) into a list of files."""
from __future__ import annotations

import glob
import os
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def expand_images(args: list[str] | str) -> list[str]:
    """Expand in order; a directory yields its images recursively (sorted), a glob its matches.

    Arguments that match nothing are kept as given, so the caller reports each
    as a per-image error instead of losing it silently.
    """
    if isinstance(args, (str, os.PathLike)):
        args = [str(args)]
    out: list[str] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out.extend(sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        elif not p.exists() and glob.has_magic(a):
            matches = sorted(glob.glob(a, recursive=True))
            out.extend(matches if matches else [a])
        else:
            out.append(a)
    return out
