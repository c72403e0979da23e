"""Dense -> Mixture-of-Experts conversion of the reference model (Slim & Sparse §4.2, Eq. 8-9).

Importing this package registers `unidigits_moe` with `AutoConfig`/`AutoModel`, so a saved
checkpoint reloads with `AutoModel.from_pretrained(path)` (and `modeling.loading.load_model`);
a saved checkpoint also carries its code and `auto_map` for `trust_remote_code=True` loading.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unidigits_moe import MOE_DEFAULTS, UniDigitsMoEConfig
from .convert import convert_to_moe, freeze_experts
from .modeling_unidigits_moe import MoEMLP, UniDigitsMoEModel, UniDigitsMoEOutput, grouped_mm_supported
from .partition import cumulative_scores, partition_neurons

AutoConfig.register(UniDigitsMoEConfig.model_type, UniDigitsMoEConfig, exist_ok=True)
AutoModel.register(UniDigitsMoEConfig, UniDigitsMoEModel, exist_ok=True)

__all__ = [
    "MOE_DEFAULTS",
    "MoEMLP",
    "UniDigitsMoEConfig",
    "UniDigitsMoEModel",
    "UniDigitsMoEOutput",
    "convert_to_moe",
    "cumulative_scores",
    "freeze_experts",
    "grouped_mm_supported",
    "partition_neurons",
]
