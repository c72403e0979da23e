"""The embedded reference unified model ("digits"): trained from scratch on `load_digits` scenes.

Importing this package registers `unidigits` with `AutoConfig`/`AutoModel`, so a saved
checkpoint reloads with `AutoModel.from_pretrained(path)`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unidigits import UniDigitsConfig, reference_config
from .evaluate import evaluate_reference
from .judge import DigitJudge
from .modeling_unidigits import DenoiseStep, UniDigitsModel
from .scenes import GEN_CATEGORIES, QUESTION_TYPES, make_batch
from .train import make_optimizer, train_reference
from .vocab import TOKENIZER

AutoConfig.register(UniDigitsConfig.model_type, UniDigitsConfig, exist_ok=True)
AutoModel.register(UniDigitsConfig, UniDigitsModel, exist_ok=True)

__all__ = [
    "GEN_CATEGORIES",
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
