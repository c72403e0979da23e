"""The embedded reference unified model ("digits"): trained from scratch on `load_digits` scenes.

Importing this package registers `unidigits` with `AutoConfig`/`AutoModel`, so a saved
checkpoint reloads with `AutoModel.from_pretrained(path)` (surgery on it — pruning, MoE, MoD —
reloads through `unislim.modeling.loading.load_model`). `DigitsFamily` is what the stages see.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unidigits import UniDigitsConfig, reference_config
from .evaluate import evaluate_reference
from .family import DigitsFamily
from .judge import DigitJudge
from .modeling_unidigits import DenoiseStep, UniDigitsModel
from .scenes import GEN_CATEGORIES, QUESTION_TYPES, make_batch
from .vocab import TOKENIZER

AutoConfig.register(UniDigitsConfig.model_type, UniDigitsConfig, exist_ok=True)
AutoModel.register(UniDigitsConfig, UniDigitsModel, exist_ok=True)

__all__ = [
    "GEN_CATEGORIES",
    "QUESTION_TYPES",
    "TOKENIZER",
    "DenoiseStep",
    "DigitJudge",
    "DigitsFamily",
    "UniDigitsConfig",
    "UniDigitsModel",
    "evaluate_reference",
    "make_batch",
    "reference_config",
]
