"""Architecture adapters: where a model keeps its decoder layers, MLPs and attention — as data.

An adapter is a handful of module-name patterns relative to the model, so a new architecture is
a new entry in `ADAPTERS`, or a `model.adapter: {...}` block in `pipeline.yaml` (same keys):

    layers: model.layers                 # the ModuleList of decoder layers (any dotted path)
    mlp: mlp                             # the MLP module in a layer ("" = the layer itself);
                                         #   a mixture-of-transformers model: {und: mlp, gen: mlp_moe_gen}
    mlp_proj: {gate: gate_proj, up: up_proj, down: down_proj}   # relative to the MLP, dots allowed;
                                         #   an ungated MLP (fc1 → act → fc2) has gate: null
    mlp_act: act_fn                      # the MLP's activation attribute (read by dense → MoE)
    attention: self_attn
    attn_proj: {q: q_proj, k: k_proj, v: v_proj, o: o_proj}
    proj_suffix: {und: "", gen: ""}      # MoT: the generation copies' suffix, e.g. "_moe_gen"
    config: null                         # sub-config holding the sizes, e.g. text_config (Janus, Emu3)
    heads: {num_heads: num_attention_heads, num_kv_heads: num_key_value_heads, head_dim: head_dim,
            intermediate_size: intermediate_size, num_layers: num_hidden_layers}   # config attribute names

Components: `und` (understanding) and `gen` (generation). A model with one weight set for every
token (Qwen2, Llama, Janus, the `shared` digits model) maps both to the same modules; a
mixture-of-transformers model (BAGEL, the `mot` digits model) maps `gen` to its generation copies.

    adapter = adapter_for(model)                 # by model_type, or the user's override
    for mlp in adapter.mlps(model, "gen"):       # MLPRef(layer=3, name="model.layers.3.mlp", ...)
        mlp.down.weight                           # (d, ff)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

COMPONENTS = ("und", "gen")
_SIZES = {"num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
          "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers"}


class AdapterError(ValueError):
    """An adapter does not describe the model it is applied to; the message names the key."""


@dataclass(frozen=True)
class MLPRef:
    layer: int
    name: str  # qualified module name of the MLP, e.g. "model.layers.3.mlp"
    gate: nn.Linear | None  # None for an ungated MLP
    up: nn.Linear
    down: nn.Linear
    down_name: str = ""  # qualified name of the down projection (its input is the activation h)
    proj_names: tuple[str | None, str, str] = (None, "", "")  # gate, up, down relative to the MLP

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def gated(self) -> bool:
        return self.gate is not None


@dataclass(frozen=True)
class AttentionRef:
    layer: int
    name: str  # qualified name of the attention module, e.g. "model.layers.3.self_attn"
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    o_name: str  # qualified name of the output projection (its input is the concatenated heads)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    proj_names: tuple[str, str, str, str] = ("", "", "", "")  # q, k, v, o relative to the attention


@dataclass(frozen=True)
class Adapter:
    """Module-name patterns of one architecture (see the module docstring)."""

    name: str
    layers: str = "model.layers"
    mlp: dict[str, str] = field(default_factory=lambda: {"und": "mlp", "gen": "mlp"})
    mlp_proj: dict[str, str | None] = field(default_factory=lambda: {"gate": "gate_proj", "up": "up_proj",
                                                                    "down": "down_proj"})
    mlp_act: str = "act_fn"
    attention: str = "self_attn"
    attn_proj: dict[str, str] = field(default_factory=lambda: {"q": "q_proj", "k": "k_proj", "v": "v_proj",
                                                               "o": "o_proj"})
    proj_suffix: dict[str, str] = field(default_factory=lambda: {"und": "", "gen": ""})
    config: str | None = None
    heads: dict[str, str] = field(default_factory=lambda: dict(_SIZES))

    # ------------------------------------------------------------ from data
    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Adapter | None = None, where: str = "model.adapter") -> Adapter:
        """An adapter from `pipeline.yaml` data, over `base`'s values (the built-in defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"{where}: unknown key(s) {unknown} (known: {sorted(known - {'name'})})")
        values = asdict(base) if base is not None else {"name": "custom"}
        for key, value in data.items():
            if key in ("mlp", "proj_suffix") and isinstance(value, str):
                value = {"und": value, "gen": value}  # one module for both components
            if isinstance(values.get(key), dict) and isinstance(value, dict):
                extra = sorted(set(value) - set(values[key])) if key != "heads" else sorted(set(value) - set(_SIZES))
                if extra:
                    raise AdapterError(f"{where}.{key}: unknown key(s) {extra} (known: {sorted(values[key])})")
                value = {**values[key], **value}
            values[key] = value
        values.setdefault("name", "custom")
        if data and base is not None and "name" not in data:
            values["name"] = f"{base.name}+custom"
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """Short hash of the adapter's data (part of every cache key that reads a model)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    # ------------------------------------------------------------ reading a model
    @property
    def is_mot(self) -> bool:
        return self.mlp["und"] != self.mlp["gen"]

    def sizes(self, model: nn.Module):
        """The config that holds the layer sizes (`config.text_config` for Janus / Emu3)."""
        config = model.config
        if self.config:
            for part in self.config.split("."):
                if not hasattr(config, part):
                    raise AdapterError(f"model.adapter.config: {type(model.config).__name__} has no sub-config "
                                       f"{self.config!r}")
                config = getattr(config, part)
        return config

    def size(self, model: nn.Module, key: str, default: Any = None) -> Any:
        """A size from the (sub-)config by its adapter name (`num_heads`, `num_kv_heads`, ...)."""
        return getattr(self.sizes(model), self.heads[key], default)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            raise AdapterError(f"model.adapter.layers: {type(model).__name__} has no module {self.layers!r}") from None
        if not isinstance(layers, nn.ModuleList):
            raise AdapterError(f"model.adapter.layers: {self.layers!r} is a {type(layers).__name__}, not the "
                               "ModuleList of decoder layers")
        return layers

    def layer_name(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_name(self, i: int, component: str) -> str:
        name = self.mlp[component]
        return f"{self.layers}.{i}" + (f".{name}" if name else "")

    def mlps(self, model: nn.Module, component: str) -> list[MLPRef]:
        _check_component(component)
        g, u, d = (self.mlp_proj.get(k) for k in ("gate", "up", "down"))
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            name = self.mlp[component]
            if name and not hasattr(layer, name.split(".")[0]):  # a pruned-away sublayer
                continue
            mlp = layer.get_submodule(name) if name else layer
            if not hasattr(mlp, (u or "").split(".")[0]):  # converted (e.g. an MoE MLP): not a dense MLP any more
                continue
            try:
                gate, up, down = (mlp.get_submodule(p) if p else None for p in (g, u, d))
            except AttributeError as e:
                raise AdapterError(f"model.adapter.mlp_proj: {self.mlp_name(i, component)} has no {e}") from None
            qualified = self.mlp_name(i, component)
            out.append(MLPRef(i, qualified, gate, up, down, f"{qualified}.{d}", (g, u, d)))
        return out

    def attentions(self, model: nn.Module, component: str) -> list[AttentionRef]:
        _check_component(component)
        n_heads = self.size(model, "num_heads")
        if n_heads is None:
            raise AdapterError(f"model.adapter.heads.num_heads: the config has no {self.heads['num_heads']!r}"
                               + (f" (in {self.config})" if self.config else ""))
        head_dim = self.size(model, "head_dim") or self.sizes(model).hidden_size // n_heads
        suffix = self.proj_suffix[component]
        names = tuple(self.attn_proj[k] + suffix for k in ("q", "k", "v", "o"))
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            if not hasattr(layer, self.attention.split(".")[0]):  # a pruned-away sublayer
                continue
            attn = layer.get_submodule(self.attention)
            try:
                q, k, v, o = (attn.get_submodule(p) for p in names)
            except AttributeError as e:
                raise AdapterError(f"model.adapter.attn_proj: {self.layer_name(i)}.{self.attention} has no {e}") from None
            name = f"{self.layers}.{i}.{self.attention}"
            heads = q.out_features // head_dim  # per layer: KV-group pruning may have removed some
            kv = k.out_features // head_dim
            out.append(AttentionRef(i, name, q, k, v, o, f"{name}.{names[3]}", heads, kv, head_dim, names))
        return out

    def check(self, model: nn.Module) -> None:
        """Raise `AdapterError` naming the key if this adapter does not describe `model`."""
        self.decoder_layers(model)
        for c in COMPONENTS:
            if not self.mlps(model, c):
                raise AdapterError(f"model.adapter.mlp: no layer of {type(model).__name__} has an MLP "
                                   f"{self.mlp[c]!r} with projections {self.mlp_proj}")
            self.attentions(model, c)


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")


_MOT = dict(mlp={"und": "mlp", "gen": "mlp_moe_gen"}, proj_suffix={"und": "", "gen": "_moe_gen"})
_LLAMA = Adapter("llama")

ADAPTERS: dict[str, Adapter] = {
    "qwen2": Adapter("qwen2"),
    "qwen3": Adapter("qwen3"),
    "llama": _LLAMA,
    "mistral": Adapter("mistral"),
    "phi": Adapter("phi", mlp_proj={"gate": None, "up": "fc1", "down": "fc2"}, mlp_act="activation_fn",
                   attn_proj={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense"}),
    "bagel": Adapter("bagel", layers="language_model.model.layers", **_MOT),  # BAGEL's Qwen2-MoT naming
}  # families add their own (the digits family: its shared and mot variants)

MOT = _MOT  # the mixture-of-transformers naming, for families that register a MoT adapter


def builtin_key(config) -> str:
    """The built-in table's key for a config: `config.adapter_key` where a config defines one (a
    model type with variants), else its `model_type`."""
    return getattr(config, "adapter_key", None) or config.model_type


def adapter_for(model: nn.Module, override: dict[str, Any] | None = None) -> Adapter:
    """The adapter for a model: `override` (pipeline.yaml's `model.adapter`) over the built-in
    entry for its `model_type`; a checkpoint that unislim wrote carries the adapter it was made with."""
    config = model.config
    recorded = (getattr(config, "unislim", None) or {}).get("adapter")
    key = builtin_key(config)
    base = ADAPTERS.get(key)
    if recorded is not None:  # what the surgery was recorded against: the same names on reload
        base = Adapter(**recorded)
    if override:
        return Adapter.from_dict(override, base)
    if base is None:
        raise AdapterError(f"no adapter for model_type {config.model_type!r} (built in: {sorted(ADAPTERS)}): "
                           "describe the architecture in pipeline.yaml under model.adapter (see README, "
                           "'Compress your own checkpoint')")
    return base
