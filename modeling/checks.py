"""Is a folder a checkpoint unislim can load? Checked before any weights are read.

`check_checkpoint(path)` reads only `config.json` and the safetensors headers (a few KB), so
`unislim validate` can run it on every `model.path` and the loader before `from_pretrained`:

- the folder exists and holds `config.json`, a JSON object with a `model_type`;
- the weights are safetensors (`model.safetensors`, or an index and its shards). Pickled weights
  (`pytorch_model.bin`, `*.pt`) are refused, never opened: unpickling runs arbitrary code;
- each safetensors header is readable and consistent: its length fits the file, it is JSON, every
  tensor's byte range matches its dtype and shape and lies inside the file (a truncated download
  or a random file fails here, naming the file);
- the tensors have the shapes the config builds, where transformers knows the `model_type`: the
  model is built on the meta device (no memory, no init) and compared name by name.

Every failure is a `CheckpointError` naming the file and what was expected and found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from unislim.errors import CheckpointError

_HEADER_MAX = 100_000_000  # bytes; safetensors itself refuses headers over 100 MB
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.bin")

TensorInfo = tuple[str, tuple[int, ...]]  # (dtype, shape)


def check_checkpoint(path: str | Path, *, trust_remote_code: bool = False, shapes: bool = True) -> dict[str, Any]:
    """Raise `CheckpointError` unless `path` is a loadable checkpoint folder; return its config.

    With `shapes=False` the (slower: it imports transformers) shape comparison is skipped.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(str(folder), "does not exist; expected a checkpoint folder (config.json + "
                              "model.safetensors)")
    if not folder.is_dir():
        raise CheckpointError(str(folder), "is a file; expected a checkpoint folder (config.json + model.safetensors)")
    config = _read_config(folder / "config.json")
    tensors = _read_weights(folder)
    if shapes:
        _check_shapes(folder, config, tensors, trust_remote_code)
    return config


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(str(file.parent), "has no config.json; expected a Hugging Face checkpoint folder "
                              "(save_pretrained writes config.json and model.safetensors)")
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except PermissionError:
        raise CheckpointError(str(file), "not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(str(file), f"is not UTF-8 text (byte offset {e.start}); expected JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(str(file), f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise CheckpointError(str(file), f"expected a JSON object, found a {type(config).__name__}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CheckpointError(str(file), f"has no 'model_type' (found keys {sorted(config)[:8]}); "
                              "expected the config save_pretrained writes")
    return config


def _read_weights(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor's (dtype, shape), from `model.safetensors` or the index and its shards."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_header(single)
    if index.is_file():
        return _read_index(index)
    pickles = sorted({p.name for pattern in _PICKLES for p in folder.glob(pattern) if p.is_file()})
    if pickles:
        raise CheckpointError(str(folder / pickles[0]), "holds pickled PyTorch weights; unislim loads safetensors "
                              "only and never unpickles (it runs code). Convert where you trust the file: "
                              "from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    found = f" (found {others[:4]}; expected model.safetensors)" if others else ""
    raise CheckpointError(str(folder), f"has no weights: no model.safetensors or model.safetensors.index.json{found}")


def _read_index(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(str(index), 'expected JSON with a "weight_map" of tensor name → shard file') from None
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(str(index), f"names a shard outside the folder ({shard!r})")
        if not file.is_file():
            raise CheckpointError(str(index), f"names the shard {shard}, which does not exist")
        tensors.update(_read_header(file))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(str(index), f"maps {len(missing)} tensor(s) to shards that do not hold them "
                              f"(first: {missing[0]} → {weight_map[missing[0]]})")
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header: 8-byte little-endian length, then JSON."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
            raw = fh.read(n) if 0 < n <= min(size - 8, _HEADER_MAX) else b""
    except PermissionError:
        raise CheckpointError(str(file), "not readable (permission denied)") from None
    if n < 0:
        raise CheckpointError(str(file), f"is {size} bytes, too short for a safetensors file (truncated?)")
    if not 0 < n <= min(size - 8, _HEADER_MAX):
        raise CheckpointError(str(file), f"is not a readable safetensors file: its header length ({n:,} bytes) does "
                              f"not fit the file ({size:,} bytes); truncated, or another format")
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(str(file), "is not a readable safetensors file: its header is not a JSON object "
                              "(corrupted, or another format)") from None
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            assert isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError, AssertionError):
            raise CheckpointError(str(file), f"tensor {name!r}: expected dtype, shape and data_offsets in the header, "
                                  f"found {json.dumps(info)[:120]}") from None
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(str(file), f"tensor {name!r}: {dtype} {list(shape)} needs "
                                  f"{math.prod(shape) * _ITEMSIZE[dtype]:,} bytes, its offsets span {end - begin:,}")
        tensors[name] = (dtype, shape)
        end_max = max(end_max, end)
    if end_max > data_size:
        raise CheckpointError(str(file), f"is truncated: its tensors need {end_max:,} bytes of data, the file holds "
                              f"{max(data_size, 0):,} ({size:,} bytes in all)")
    return tensors


def _check_shapes(folder: Path, config: dict[str, Any], tensors: dict[str, TensorInfo],
                  trust_remote_code: bool) -> None:
    """Compare the tensors with the parameters the config builds (meta device: nothing allocated)."""
    import torch
    from transformers import AutoConfig

    import unislim.modeling.families  # noqa: F401  (families register their model classes with the Auto classes)

    model_type = config["model_type"]
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        if trust_remote_code or "auto_map" in config:
            return  # the checkpoint's own code builds it: not run in a check
        raise CheckpointError(str(folder / "config.json"), f"model_type {model_type!r} is not one transformers "
                              f"or unislim knows ({' '.join(str(e).split())[:150]})") from None
    except Exception as e:  # noqa: BLE001 - a config class rejecting its values
        raise CheckpointError(str(folder / "config.json"), f"does not load as a {model_type!r} config "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    from unislim.modeling.families import family_for
    from unislim.modeling.loading import model_class, _rebuilding
    from unislim.modeling.surgery.record import ops

    try:
        family = family_for(hf_config)
        cls = model_class(family.auto_class(hf_config), hf_config)
        if ops(hf_config):
            cls = _rebuilding(cls)  # the recorded surgery's shapes (per-layer widths, experts, routers)
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception as e:  # noqa: BLE001 - whatever the config's values make the model code raise
        raise CheckpointError(str(folder / "config.json"), f"does not build a {model_type!r} model "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = _align(tensors, expected, getattr(model, "base_model_prefix", "") or "")
    if expected and tensors and not names:
        raise CheckpointError(str(folder), f"none of the {len(tensors)} tensors in the weights is a parameter of the "
                              f"{model_type!r} model config.json builds (e.g. {next(iter(tensors))!r} vs "
                              f"{next(iter(expected))!r})")
    wrong = [(f, m) for f, m in names.items() if tensors[f][1] != expected[m]]
    if wrong:
        f, m = wrong[0]
        raise CheckpointError(str(folder), f"{len(wrong)} tensor(s) do not match config.json's shapes, e.g. {f}: "
                              f"weights {list(tensors[f][1])}, config builds {list(expected[m])}")


def _align(tensors: dict[str, TensorInfo], expected: dict[str, tuple], prefix: str) -> dict[str, str]:
    """file tensor name → model parameter name, allowing the base-model prefix on either side."""
    names = {k: k for k in tensors if k in expected}
    if names or not prefix:
        return names
    p = prefix + "."
    added = {k: p + k for k in tensors if p + k in expected}
    stripped = {k: k[len(p):] for k in tensors if k.startswith(p) and k[len(p):] in expected}
    return max(added, stripped, key=len)
