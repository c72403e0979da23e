"""Latency on a shared machine: interleaved rounds, medians, wall clock and this process's CPU time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_latency(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, dict[str, float]]:
    """{name: {"wall": median seconds per call, "cpu": median CPU seconds of this process per call}}.

    Every round runs each fn once (the order rotates by one each round), so a change in the
    machine's load during the measurement hits every fn alike; `warmup` rounds are discarded.
    The CPU time counts only this process's work, so on a machine shared with other jobs it moves
    less with their load than the wall clock does (on a GPU it misses the device's work: use wall).
    CUDA work is synchronised before the clocks stop.
    """
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            _sync()
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            _sync()
            if r >= warmup:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n])} for n in names}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
