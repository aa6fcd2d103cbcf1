"""Two versions of one network timed call by call in one process, for the benchmarks that compare a change to
its forward pass (bench_fold.py, bench_same_pad.py): interleaving makes machine load touch both alike."""
from __future__ import annotations

import statistics
import time

import torch


def compare(before: tuple[str, torch.nn.Module], after: tuple[str, torch.nn.Module], reps: int) -> None:
    """At batches of 1, 8 and 32 (``reps`` calls at 1, fewer at the larger), on the same random channels-last
    input: each version's ms a photo (median and least), after / before, and the largest difference of their
    features."""
    (a_name, a_net), (b_name, b_net) = before, after
    for batch, n in ((1, reps), (8, max(2, reps // 5)), (32, max(2, reps // 12))):
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {a_name: [], b_name: []}
        with torch.inference_mode():
            diff = (a_net(x) - b_net(x)).abs().max().item()
            for _ in range(n):
                for name, net in ((a_name, a_net), (b_name, b_net)):
                    t = time.perf_counter()
                    net(x)
                    times[name].append((time.perf_counter() - t) / batch * 1e3)
        a, b = statistics.median(times[a_name]), statistics.median(times[b_name])
        print(f"batch {batch}: {a_name} {a:.2f} ms a photo (least {min(times[a_name]):.2f}), {b_name} {b:.2f} "
              f"(least {min(times[b_name]):.2f}): {b / a:.3f}; features differ by at most {diff:.1e}")
