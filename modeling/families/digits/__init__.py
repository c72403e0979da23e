"""The embedded reference unified model ("digits"): trained from scratch on `load_digits` scenes.

Importing this package registers `unidigits` with `AutoConfig`/`AutoModel`, so a saved
checkpoint reloads with `AutoModel.from_pretrained(path)`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unidigits import UniDigitsConfig, reference_config
from .configuration_unidigits_mod import UniDigitsModConfig
from .configuration_unidigits_moe import MOE_DEFAULTS, UniDigitsMoEConfig
from .convert_moe import convert_to_moe, freeze_experts
from .evaluate import evaluate_reference
from .judge import DigitJudge
from .modeling_unidigits import DenoiseStep, UniDigitsModel
from .modeling_unidigits_mod import ModDecoderLayer, RoutingRecord, UniDigitsModModel, fit_routers
from .modeling_unidigits_moe import UniDigitsMoEModel, UniDigitsMoEOutput
from .scenes import GEN_CATEGORIES, QUESTION_TYPES, make_batch
from .train import make_optimizer, train_reference
from .vocab import TOKENIZER

AutoConfig.register(UniDigitsConfig.model_type, UniDigitsConfig, exist_ok=True)
AutoModel.register(UniDigitsConfig, UniDigitsModel, exist_ok=True)
for _config, _model in ((UniDigitsMoEConfig, UniDigitsMoEModel), (UniDigitsModConfig, UniDigitsModModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "MOE_DEFAULTS",
    "GEN_CATEGORIES",
    "ModDecoderLayer",
    "RoutingRecord",
    "UniDigitsModConfig",
    "UniDigitsModModel",
    "UniDigitsMoEConfig",
    "UniDigitsMoEModel",
    "UniDigitsMoEOutput",
    "convert_to_moe",
    "fit_routers",
    "freeze_experts",
    "QUESTION_TYPES",
    "TOKENIZER",
    "DenoiseStep",
    "DigitJudge",
    "UniDigitsConfig",
    "UniDigitsModel",
    "evaluate_reference",
    "make_batch",
    "make_optimizer",
    "reference_config",
    "train_reference",
]
