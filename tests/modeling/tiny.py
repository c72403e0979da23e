"""The tiny reference model the modeling tests build (random init, seeded, eval mode), and a few
seconds of training with the pipeline's own recipe (optimizer, family loss) for tests that need a
model that has learnt something."""

from __future__ import annotations

import torch

from unislim.modeling.families.digits import UniDigitsModel, make_batch, reference_config


def tiny(variant: str = "shared", seed: int = 0) -> UniDigitsModel:
    torch.manual_seed(seed)
    return UniDigitsModel(reference_config("tiny", variant)).eval()


def trained_tiny(variant: str = "shared", steps: int = 150, batch_size: int = 32, lr: float = 1e-2) -> UniDigitsModel:
    """`tiny(variant)` trained in this process on fresh seeded batches: `make_optimizer` and the
    digits family's loss, as the training loop uses them (without Ray or DeepSpeed)."""
    from unislim.modeling.families.digits import DigitsFamily
    from unislim.pipelines.training import make_optimizer

    model, family = tiny(variant).train(), DigitsFamily()
    optimizer, scheduler = make_optimizer(model, lr, steps, warmup_steps=max(1, steps // 20))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = family.loss(model, make_batch(batch_size, g))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval()
