"""Configuration of the reference model with Mixture-of-Experts MLPs (Slim & Sparse §4.2).

`UniDigitsMoEConfig` is `UniDigitsConfig` plus one field, `moe`, that says which generation-path
MLPs are sparse and how (see `MOE_DEFAULTS`). With `moe=None` the model is the dense reference model.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_unidigits import UniDigitsConfig

MOE_DEFAULTS = {
    "layers": None,  # decoder layers whose generation MLP becomes a MoE; None: every layer but the first and last
    "component": "gen",  # the generation path: `mot` -> `mlp_moe_gen`; `shared` -> `mlp` (dense for understanding)
    "num_experts": 64,  # experts per MLP, shared ones included (the MLP width must be a multiple)
    "num_shared": 8,  # always-active experts holding the top cumulative-score neurons
    "top_k": 24,  # routed experts per token (of num_experts - num_shared)
    "aux_loss_coef": 0.01,  # weight of the Switch load-balancing loss added to `loss` in training
    "impl": "auto",  # auto | loop | grouped (see MoEMLP)
    "und_frozen": False,  # `shared`: understanding forwards (dense) send no gradient into the experts
}
COMPONENTS = ("gen",)
IMPLS = ("auto", "loop", "grouped")


@strict
class UniDigitsMoEConfig(UniDigitsConfig):
    r"""`UniDigitsConfig` + `moe`: a dict of the keys of `MOE_DEFAULTS` (missing keys get the default).

    moe.layers: decoder layers whose generation-path MLP is a `MoEMLP`.
    moe.component: `gen` — in `mot` the `mlp_moe_gen` copies; in `shared` the one `mlp`, sparse for
        generation forwards and dense (every expert, gate 1) for understanding forwards.
    moe.num_experts / num_shared / top_k: E experts of width ff / E; S shared; k of the E - S routed
        experts active per token (Eq. 9).
    moe.aux_loss_coef: weight of the load-balancing loss; moe.impl: `auto` | `loop` | `grouped`.
    moe.und_frozen: in `shared`, understanding forwards use detached expert weights (§5.4: understanding
        stays dense and frozen while generation trains the sparse path).
    """

    model_type = "unidigits_moe"

    moe: dict | None = None

    def __post_init__(self, **kwargs):
        if self.moe is not None:
            moe = {**MOE_DEFAULTS, **self.moe}
            if moe["layers"] is None:
                moe["layers"] = list(range(1, self.num_hidden_layers - 1))
            if isinstance(moe["layers"], (list, tuple)):
                moe["layers"] = sorted(moe["layers"])
            self.moe = moe
        super().__post_init__(**kwargs)

    @property
    def moe_width(self) -> int:
        """Width of the MLPs that become MoEs (`mot`: the generation copies')."""
        return self.intermediate_size_gen if self.variant == "mot" else self.intermediate_size

    def validate_architecture(self):
        """Part of `@strict` validation: each error names the `moe` key and its bad value."""
        super().validate_architecture()
        if self.moe is None:
            return
        m = self.moe
        unknown = sorted(set(m) - set(MOE_DEFAULTS))
        if unknown:
            raise ValueError(f"moe: unknown key(s) {unknown} (known: {sorted(MOE_DEFAULTS)})")
        for key in ("num_experts", "num_shared", "top_k"):
            if not isinstance(m[key], int) or isinstance(m[key], bool):
                raise ValueError(f"moe.{key} must be an integer, got {m[key]!r}")
        E, S, k = m["num_experts"], m["num_shared"], m["top_k"]
        if E < 2:
            raise ValueError(f"moe.num_experts must be >= 2, got {E}")
        if not 0 <= S < E:
            raise ValueError(f"moe.num_shared must be in 0..num_experts - 1 = {E - 1}, got {S}")
        if not 1 <= k <= E - S:
            raise ValueError(f"moe.top_k must be in 1..num_experts - num_shared = {E - S}, got {k}")
        if self.moe_width % E:
            raise ValueError(f"moe.num_experts={E} must divide the MLP width {self.moe_width}")
        layers = m["layers"]
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
            raise ValueError(f"moe.layers must be a non-empty list of layer indices, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"moe.layers must be distinct layers in 0..{self.num_hidden_layers - 1}, got {layers}")
        no_mlp = [i for i in layers if i in self.drop_mlp_layers]
        if no_mlp:
            raise ValueError(f"moe.layers {no_mlp} have no MLP (drop_mlp_layers={self.drop_mlp_layers})")
        if m["component"] not in COMPONENTS:
            raise ValueError(f"moe.component must be one of {COMPONENTS}, got {m['component']!r}")
        if m["impl"] not in IMPLS:
            raise ValueError(f"moe.impl must be one of {IMPLS}, got {m['impl']!r}")
        coef = m["aux_loss_coef"]
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
            raise ValueError(f"moe.aux_loss_coef must be a number >= 0, got {coef!r}")
        if not isinstance(m["und_frozen"], bool):
            raise ValueError(f"moe.und_frozen must be true or false, got {m['und_frozen']!r}")
