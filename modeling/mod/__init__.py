"""Task-aware Mixture-of-Depths (UniMoD, arXiv 2502.06474) for the reference model family.

    mod = UniDigitsModModel.from_dense(dense, mod_capacity={"und": [...], "gen": [...]}, mod_routing="task")
    schedule = auto_schedule(cosines, budget=0.75)          # capacities per task and layer from the scores

Importing this package registers `unidigits_mod` with `AutoConfig`/`AutoModel`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_mod import UniDigitsModConfig
from .modeling_mod import ModDecoderLayer, RoutingRecord, UniDigitsModModel, fit_routers
from .routing import capacity_tokens, layer_flops

AutoConfig.register(UniDigitsModConfig.model_type, UniDigitsModConfig, exist_ok=True)
AutoModel.register(UniDigitsModConfig, UniDigitsModModel, exist_ok=True)

__all__ = ["ModDecoderLayer", "RoutingRecord", "UniDigitsModConfig", "UniDigitsModModel", "capacity_tokens",
           "fit_routers", "layer_flops"]
