"""Where one cold ``geo query`` spends its time, step by step, in one process (wall and CPU seconds).

    python benchmarks/bench_cold_steps.py --index B --photo examples/osv5m/queries/1373307973052511.jpg

Run it in a fresh process each time (the steps are only cold once). ``bench_cold_start.py`` times whole
processes against a bare ``import torch``; this says what is inside the difference.
"""
from __future__ import annotations

import argparse
import resource
import time

T0 = time.perf_counter()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--photo", required=True)
    a = ap.parse_args()
    marks = [("start", time.perf_counter() - T0, _cpu())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter() - T0, _cpu()))

    import torch  # noqa: F401
    mark("import torch")
    from geo.cli import app  # noqa: F401
    mark("import geo.cli (the rest)")
    from geo.query.index import open_index
    index = open_index(a.index)
    mark("open_index")
    backbone = index.backbone
    mark("backbone load")
    from geo.data.images import ImageDataset
    _, tensor, _ = ImageDataset([a.photo], backbone.preprocess)[0]
    mark("decode")
    emb = index.embed_tensors([tensor])
    mark("first forward")
    from geo.data.countries import _shapes
    _shapes()
    mark("country shapes")
    from geo.data.places import _table
    _table()
    mark("place table")
    import numpy as np
    index.locate_embeddings(np.stack(emb)[:, 0])
    mark("answer (first)")
    index.locate_embeddings(np.stack(emb)[:, 0])
    mark("answer (second)")
    for (_, w0, c0), (name, w1, c1) in zip(marks, marks[1:]):
        print(f"{name:26s} wall {w1 - w0:6.2f} s  cpu {c1 - c0:6.2f} s")


if __name__ == "__main__":
    main()
