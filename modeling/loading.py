"""Load any checkpoint this project handles: the reference family or a causal LM, from a path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import unislim.modeling.families.digits  # noqa: F401  (registers unidigits* with AutoConfig/AutoModel)


def load_model(path: str | Path, trust_remote_code: bool = False, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`from_pretrained` with the right Auto class, in eval mode; weights via safetensors only."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = AutoModel if config.model_type in ("unidigits", "unidigits_mod", "unidigits_moe") else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    return model.to(device).eval()
