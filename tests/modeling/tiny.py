"""The tiny reference model the modeling tests build (random init, seeded, eval mode)."""

from __future__ import annotations

import torch

from unislim.modeling.families.digits import UniDigitsModel, reference_config


def tiny(variant: str = "shared", seed: int = 0) -> UniDigitsModel:
    torch.manual_seed(seed)
    return UniDigitsModel(reference_config("tiny", variant)).eval()
