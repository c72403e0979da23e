"""Architecture adapters: where a model keeps its layers, MLPs and attention.

An adapter is data, not code: module-name patterns relative to the model, so a new architecture
is a new `Adapter(...)` entry in `ADAPTERS`. Components: `und` (understanding) and `gen`
(generation). A model with one weight set for every token (Qwen2, Llama, the `shared` reference
model) maps both components to the same modules; a mixture-of-transformers model (BAGEL, the `mot`
reference model) maps `gen` to its `_moe_gen` copies.

    adapter = adapter_for(model)
    for mlp in adapter.mlps(model, "gen"):      # MLPRef(layer=3, name="model.layers.3.mlp_moe_gen", ...)
        mlp.down.weight                          # (d, ff)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

COMPONENTS = ("und", "gen")


@dataclass(frozen=True)
class MLPRef:
    layer: int
    name: str  # qualified module name, e.g. "model.layers.3.mlp"
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    down_name: str = ""  # qualified name of the down projection (its input is the activation h)

    @property
    def width(self) -> int:
        return self.down.in_features


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


@dataclass(frozen=True)
class Adapter:
    """Module-name patterns of one architecture (see the module docstring)."""

    name: str
    layers: str = "model.layers"  # the ModuleList of decoder layers
    mlp: dict[str, str] = field(default_factory=lambda: {"und": "mlp", "gen": "mlp"})
    attention: str = "self_attn"
    proj_suffix: dict[str, str] = field(default_factory=lambda: {"und": "", "gen": ""})  # q_proj + suffix
    mlp_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    attn_proj: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    heads: tuple[str, str] = ("num_attention_heads", "num_key_value_heads")  # config attributes

    @property
    def is_mot(self) -> bool:
        return self.mlp["und"] != self.mlp["gen"]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def mlps(self, model: nn.Module, component: str) -> list[MLPRef]:
        _check_component(component)
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            name = self.mlp[component]
            if not hasattr(layer, name):  # a pruned-away sublayer
                continue
            mlp = layer.get_submodule(name)
            gate, up, down = (mlp.get_submodule(p) for p in self.mlp_proj)
            qualified = f"{self.layers}.{i}.{name}"
            out.append(MLPRef(i, qualified, gate, up, down, f"{qualified}.{self.mlp_proj[2]}"))
        return out

    def attentions(self, model: nn.Module, component: str) -> list[AttentionRef]:
        _check_component(component)
        config = model.config
        n_heads, n_kv = (getattr(config, a) for a in self.heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        suffix = self.proj_suffix[component]
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            if not hasattr(layer, self.attention):  # a pruned-away sublayer
                continue
            attn = layer.get_submodule(self.attention)
            q, k, v, o = (attn.get_submodule(p + suffix) for p in self.attn_proj)
            name = f"{self.layers}.{i}.{self.attention}"
            out.append(AttentionRef(i, name, q, k, v, o, f"{name}.{self.attn_proj[3]}{suffix}", n_heads, n_kv, head_dim))
        return out


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")


_MOT = dict(mlp={"und": "mlp", "gen": "mlp_moe_gen"}, proj_suffix={"und": "", "gen": "_moe_gen"})

ADAPTERS: dict[str, Adapter] = {
    "qwen2": Adapter("qwen2"),
    "llama": Adapter("llama"),
    "mistral": Adapter("mistral"),
    "bagel": Adapter("bagel", layers="language_model.model.layers", **_MOT),  # BAGEL's Qwen2-MoT naming
    "unidigits-shared": Adapter("unidigits-shared"),
    "unidigits-mot": Adapter("unidigits-mot", **_MOT),
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a model, by its config's `model_type` (and variant for the reference model)."""
    config = model.config
    key = config.model_type
    if key == "unidigits":
        key = f"unidigits-{config.variant}"
    if key not in ADAPTERS:
        raise ValueError(f"no adapter for model_type {config.model_type!r}; known: {sorted(ADAPTERS)} "
                         "(add an Adapter entry in modeling/adapters/__init__.py)")
    return ADAPTERS[key]
