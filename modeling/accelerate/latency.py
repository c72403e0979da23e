"""Wall-clock latency on a shared machine: interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_latency(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn.

    Every round runs each fn once (the order rotates by one each round), so a change in the
    machine's load during the measurement hits every fn alike; `warmup` rounds are discarded.
    CUDA work is synchronised before the clock stops.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync()
            start = time.perf_counter()
            fns[name]()
            _sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
