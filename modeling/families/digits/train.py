"""The plain single-process training loop of the reference model.

Distributed trainers (the Ray Train stage) reuse the same pieces: `make_batch`, `model(**batch)`
and `make_optimizer`, so a run there and a run here follow the same recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .scenes import UND_FRACTION, make_batch


def make_optimizer(
    model: torch.nn.Module, lr: float, steps: int, weight_decay: float = 0.01, warmup_frac: float = 0.05
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms, biases, embeddings) + linear warmup + cosine decay to 10% of lr."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )  # fmt: skip
    warmup = max(1, int(warmup_frac * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_reference(
    model: torch.nn.Module,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 50,
    on_log: Callable[[int, dict], None] | None = None,
    grad_clip: float = 1.0,
    und_fraction: float = UND_FRACTION,
) -> list[dict]:
    """Trains `model` in place on fresh `make_batch` batches; returns the logged metrics.

    Each log entry averages the losses since the previous one: {"step", "loss", "und_loss",
    "gen_loss", "lr", "elapsed_s", "cpu_s"}; `cpu_s` is this process's CPU time, which stays
    meaningful when other jobs share the cores. The data stream is fixed by `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    opt, sched = make_optimizer(model, lr, steps)
    cfg_dropout = getattr(model.config, "cfg_dropout", 0.1)
    model.train()
    logs, acc, n = [], {"loss": 0.0, "und_loss": 0.0, "gen_loss": 0.0}, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        batch = {k: v.to(model.device) for k, v in make_batch(batch_size, g, "train", cfg_dropout, und_fraction).items()}
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        for k in acc:
            acc[k] += float(getattr(out, k).detach())
        n += 1
        if step % log_every == 0 or step == steps:
            entry = {"step": step, **{k: v / n for k, v in acc.items()}, "lr": sched.get_last_lr()[0],
                     "elapsed_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}  # fmt: skip
            logs.append(entry)
            if on_log is not None:
                on_log(step, entry)
            acc, n = dict.fromkeys(acc, 0.0), 0
    model.eval()
    return logs
