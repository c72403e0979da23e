"""Load any checkpoint unislim handles, from a path: `load_model(path)`.

The checkpoint's family (`modeling.families.family_for`) picks the Auto class; safetensors only,
no remote code unless the caller turns it on. Surgery recorded in `config.json` (`config.unislim`,
see `surgery.record`) is re-applied to the freshly built model *before* the weights load: the model
class is subclassed (same name, same module, so transformers' key renaming still applies) with an
`__init__` that rebuilds the recorded structure, and `from_pretrained` then fills every weight — a
pruned, MoE or MoD checkpoint reloads with outputs identical to the model that was saved.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from .surgery import record


def read_config(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's config (nothing else is read); raises FileNotFoundError for a non-checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    import unislim.modeling.families  # noqa: F401  (families register their model classes with the Auto classes)

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str | Path, trust_remote_code: bool = False, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, *, family: Any = None, adapter: dict | None = None) -> torch.nn.Module:
    """The checkpoint at `path`, in eval mode, through its family (detected unless given)."""
    from .families import family_for

    if family is None:
        family = family_for(read_config(path, trust_remote_code), adapter=adapter,
                            trust_remote_code=trust_remote_code)
    return family.load(path, device=device, dtype=dtype)


def load_pretrained(path: str | Path, family, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`family.auto_class(config)`'s model class, with recorded surgery rebuilt, from `path`."""
    config = read_config(path, family.trust_remote_code)
    cls = model_class(family.auto_class(config), config)
    if record.ops(config):
        cls = _rebuilding(cls)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model, info = cls.from_pretrained(path, config=config, use_safetensors=True, output_loading_info=True,
                                          trust_remote_code=family.trust_remote_code, **kwargs)
    except Exception:  # name the file and what is wrong with it (truncated, wrong shapes, ...) where we can
        from .checks import check_checkpoint

        check_checkpoint(path, trust_remote_code=family.trust_remote_code)
        raise
    missing = [k for k in info.get("missing_keys", []) if k not in _tied(model)]
    bad = {"missing": missing, "unexpected": list(info.get("unexpected_keys", [])),
           "mismatched": [str(m) for m in info.get("mismatched_keys", [])]}
    if any(bad.values()):  # a weight initialised at random is not the checkpoint's model
        from unislim.errors import CheckpointError

        raise CheckpointError(str(path), "its weights do not fill the model its config.json (and recorded surgery) "
                              "builds: " + "; ".join(f"{k} {v[:3]}{'...' if len(v) > 3 else ''}"
                                                    for k, v in bad.items() if v))
    return model.to(device).eval()


def _tied(model) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): saved once."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, (list, set, tuple)) else tied.keys())


def model_class(auto: type, config) -> type:
    """The concrete class an Auto class builds for `config` (remote code included)."""
    from transformers.models.auto.auto_factory import _get_model_class, get_class_from_dynamic_module

    if type(config) in auto._model_mapping:
        return _get_model_class(config, auto._model_mapping)
    ref = (getattr(config, "auto_map", None) or {}).get(auto.__name__)
    if ref is None:
        raise ValueError(f"{auto.__name__} cannot build a {config.model_type!r} model (and the checkpoint has no "
                         f"auto_map entry for it)")
    return get_class_from_dynamic_module(ref, config._name_or_path)


@functools.cache
def _rebuilding(cls: type) -> type:
    """`cls` whose `__init__` also rebuilds the surgery recorded in its config."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        record.rebuild(self)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def apply_recorded(model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild recorded surgery on a model built from its config (e.g. `Model(config)` in a test)."""
    record.rebuild(model)
    return model


_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "unislim.json")


def carry_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy what a checkpoint folder holds besides the model — tokenizer, processor, chat template,
    README — from `source` into the checkpoint written at `dest`, where `dest` has no such file:
    a pruned or adapted checkpoint stays usable with its own tokenizer and processor."""
    import shutil

    source, dest = Path(source), Path(dest)
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _MODEL_FILES and not f.name.startswith("model-") and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied
