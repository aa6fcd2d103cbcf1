"""Cold ``geo query``: process start to first answer, against a bare ``import torch`` in the same run.

Each round runs, one after another: ``python -c "import torch"``, then
``geo query PHOTO --index BUNDLE`` for every code tree given (``--tree``; the
current one is ``.``), so every variant sees the same machine load. An older
checkout (``git worktree add /tmp/before <commit>``) is run through this
environment with its tree first on ``sys.path`` and the editable install's
finder set aside, so ``import geo`` finds that tree.

    python benchmarks/bench_cold_start.py --index B --photo examples/osv5m/queries/1373307973052511.jpg \
        --tree before=/tmp/before --tree after=. --rounds 5

Beside the wall time it reports each process's CPU time (user + sys, from the children's rusage): on a
busy machine wall time waits for other people's work, CPU time much less. ``benchmarks/bench_cold_steps.py``
breaks one cold query down by step.

``--compiled`` compiles each tree's modules first (``python -m compileall``), as ``pip install`` does: a source
checkout run with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` compiles every geo module it imports again
at each start (0.3-0.4 s here), which no installed copy pays; torch's own modules are always compiled.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


BOOT = ("import sys; sys.path.insert(0, {tree!r}); "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
        "import geo; assert geo.__file__.startswith({tree!r}), geo.__file__; "
        "from geo.cli import app; app()")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + sys) of one process."""
    r0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--photo", required=True)
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a geo source tree (default after=.)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="compile each tree's geo modules first, as an install does")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"after": "."}
    for path in trees.values() if args.compiled else ():
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(path, "geo")], check=True,
                       stdout=subprocess.DEVNULL)
    runs: dict[str, list[tuple[float, float]]] = {"import torch": []} | {f"geo query ({n})": [] for n in trees}
    for _ in range(args.rounds):
        runs["import torch"].append(timed([sys.executable, "-c", "import torch"], dict(os.environ)))
        for name, path in trees.items():
            cmd = [sys.executable, "-c", BOOT.format(tree=os.path.abspath(path)), "query", args.photo,
                   "--index", args.index]
            runs[f"geo query ({name})"].append(timed(cmd, dict(os.environ)))
    base = [statistics.median(r[i] for r in runs["import torch"]) for i in (0, 1)]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.rounds}, seconds; geo's "
          f"modules {'compiled first' if args.compiled else 'as found'} (PYTHONDONTWRITEBYTECODE="
          f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")
    print("| process | median | ratio to import torch | CPU (user + sys) | ratio | runs (wall) |\n|---|---|---|---|---|---|")
    for name, ts in runs.items():
        wall, cpu = (statistics.median(r[i] for r in ts) for i in (0, 1))
        print(f"| `{name}` | {wall:.2f} | {wall / base[0]:.2f}x | {cpu:.2f} | {cpu / base[1]:.2f}x | "
              f"{' '.join(f'{w:.2f}' for w, _ in sorted(ts))} |")


if __name__ == "__main__":
    main()
