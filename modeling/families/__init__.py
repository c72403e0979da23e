"""Model families: what the stages know about a kind of checkpoint (see `base.Family`).

    family = family_for(config)                      # by the checkpoint's config
    family = get_family("causal_lm", adapter={...})  # by name (pipeline.yaml's model.family)
    model = family.load(path)

A checkpoint that unislim wrote names its family (`config.unislim.family`); otherwise the first
family whose `matches(config)` holds, most specific first (`janus` and `emu3` by model_type; `causal_lm`
takes whatever `AutoModelForCausalLM` builds).
"""

from __future__ import annotations

from typing import Any

from .base import ContinuousOutputs, DataError, Family, TaskKind, TokenOutputs
from .causal_lm import CausalLMFamily
from .digits.family import DigitsFamily
from .emu3 import Emu3Family
from .janus import JanusFamily

# most specific first: `family_for` takes the first whose `matches(config)` holds
FAMILIES: dict[str, type[Family]] = {"digits": DigitsFamily, "janus": JanusFamily, "emu3": Emu3Family,
                                     "causal_lm": CausalLMFamily}


def get_family(name: str, *, adapter: dict[str, Any] | None = None, trust_remote_code: bool = False) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r} (known: {sorted(FAMILIES)})")
    return FAMILIES[name](adapter=adapter, trust_remote_code=trust_remote_code)


def family_for(config, *, name: str = "auto", adapter: dict[str, Any] | None = None,
               trust_remote_code: bool = False) -> Family:
    """The family of a checkpoint's config (`name` other than auto forces one)."""
    if name == "auto":
        name = (getattr(config, "unislim", None) or {}).get("family") or next(
            (n for n, cls in FAMILIES.items() if cls.matches(config)), None)
        if name is None:
            raise ValueError(f"no model family handles model_type {config.model_type!r} (families: "
                             f"{sorted(FAMILIES)}; causal_lm takes anything AutoModelForCausalLM builds)")
    return get_family(name, adapter=adapter, trust_remote_code=trust_remote_code)


def family_of_checkpoint(path, *, name: str = "auto", adapter: dict[str, Any] | None = None,
                         trust_remote_code: bool = False) -> Family:
    """The family of the checkpoint folder at `path` (reads only its config.json)."""
    from unislim.modeling.loading import read_config

    return family_for(read_config(path, trust_remote_code), name=name, adapter=adapter,
                      trust_remote_code=trust_remote_code)


def from_model_config(path, model_cfg) -> Family:
    """The family for `path` as pipeline.yaml's `model` section says (family, adapter, remote code)."""
    return family_of_checkpoint(path, name=model_cfg.family, adapter=model_cfg.adapter,
                                trust_remote_code=model_cfg.trust_remote_code)


__all__ = ["FAMILIES", "CausalLMFamily", "ContinuousOutputs", "DataError", "DigitsFamily", "Emu3Family", "Family",
           "JanusFamily", "TaskKind", "TokenOutputs", "family_for", "family_of_checkpoint", "from_model_config", "get_family"]
