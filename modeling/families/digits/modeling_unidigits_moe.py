"""The reference model with Mixture-of-Experts MLPs (Slim & Sparse, arXiv 2512.02351 §4.2).

A dense gated MLP of width ff is cut into E experts of f = ff / E neurons (a partition of its
neurons, `partition.py`); S of them are shared (always on), R = E - S are routed, k per token:

    MoE(x) = f_S(x) + sum_{j in TopK(router(x))} G_j f_Rj(x)                          (Eq. 9)

with the residual (straight-through) gate G = 1 + (p - p.detach()), p = softmax over the k selected
logits: every selected expert contributes with weight exactly 1 in the forward, so with k = R the
MoE *is* the dense MLP, while the router still receives the gradient of p. The experts are the
dense weights, sliced and stacked: `w_gate`, `w_up` (E, f, d) and `w_down` (E, d, f).

`UniDigitsMoEModel` puts a `MoEMLP` in place of the generation-path MLP of `config.moe["layers"]`;
`convert_to_moe` (in `convert.py`) builds one from a trained dense model and neuron scores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import initialization as init

from .modeling_unidigits import GEN_SUFFIX, UniDigitsModel, UniDigitsOutput
from .configuration_unidigits_moe import UniDigitsMoEConfig

from unislim.modeling.surgery.moe.mlp import MoEMLP, grouped_mm_supported  # noqa: F401


@dataclass
class UniDigitsMoEOutput(UniDigitsOutput):
    aux_loss: torch.Tensor | None = None  # mean load-balancing loss of the MoE MLPs (training forwards)


class UniDigitsMoEModel(UniDigitsModel):
    """The reference model whose generation-path MLPs in `config.moe["layers"]` are `MoEMLP`s.

    `mot`: `mlp_moe_gen` is the MoE, the understanding `mlp` stays dense. `shared`: the one `mlp`
    is the MoE; `und_logits` runs it dense (every expert, gate 1), generation forwards sparse.
    In training, `forward` adds `aux_loss_coef * aux_loss` to `loss` (`aux_loss`: the mean
    load-balancing loss over the MoE MLPs of that forward).
    """

    config_class = UniDigitsMoEConfig
    config: UniDigitsMoEConfig

    def __init__(self, config: UniDigitsMoEConfig):
        super().__init__(config)  # the dense model (initialised)
        moe = config.moe
        if moe is not None:
            name = "mlp" + (GEN_SUFFIX if config.variant == "mot" else "")
            for i in moe["layers"]:
                setattr(self.model.layers[i], name, MoEMLP(
                    config.hidden_size, config.moe_width, moe["num_experts"], moe["num_shared"], moe["top_k"],
                    impl=moe["impl"], hidden_act=config.hidden_act))
            self.post_init()  # initialises only the new modules (the rest carry `_is_hf_initialized`)

    def _init_weights(self, module):
        if isinstance(module, MoEMLP):
            for w in (module.w_gate, module.w_up, module.w_down):
                init.normal_(w, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)

    def moe_mlps(self) -> dict[str, MoEMLP]:
        """Qualified name -> MoEMLP (e.g. `model.layers.1.mlp_moe_gen`)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MoEMLP)}

    @contextmanager
    def dense_experts(self):
        """Inside: every MoE MLP runs dense (gate 1), with detached experts if `moe.und_frozen`."""
        mlps = list(self.moe_mlps().values())
        frozen = bool(self.config.moe and self.config.moe["und_frozen"])
        saved = [(m.run_dense, m.freeze_dense) for m in mlps]
        for m in mlps:
            m.run_dense, m.freeze_dense = True, frozen
        try:
            yield
        finally:
            for m, (run, freeze) in zip(mlps, saved):
                m.run_dense, m.freeze_dense = run, freeze

    def und_logits(self, *args, **kwargs) -> torch.Tensor:
        """Understanding stays dense. (`mot` never reaches its MoE copies here anyway.)"""
        with self.dense_experts():
            return super().und_logits(*args, **kwargs)

    def forward(self, *args, **kwargs) -> UniDigitsMoEOutput:
        mlps = list(self.moe_mlps().values())
        for m in mlps:
            m.aux_loss = None
        out = UniDigitsMoEOutput(**super().forward(*args, **kwargs))
        aux = [m.aux_loss for m in mlps if m.aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).mean()
            if out.loss is not None:
                out.loss = out.loss + self.config.moe["aux_loss_coef"] * out.aux_loss
        return out

    def num_active_parameters(self, task: str = "gen") -> int:
        """Parameters one token of `task` passes through. A sparse MoE MLP counts its shared and
        top-k routed experts and its router; understanding runs the MoE dense (no router).

        `mot` counts one of each twin pair: the understanding copy for `und` (as the dense model
        does), the generation copy for `gen`.
        """
        if task not in ("und", "gen"):
            raise ValueError(f"task must be 'und' or 'gen', got {task!r}")
        mot = self.config.variant == "mot"
        named = dict(self.named_parameters())
        if mot:
            gen_side = lambda n: GEN_SUFFIX in n  # noqa: E731
            twin = lambda n: n.startswith(("model.layers.", "model.norm.")) and not gen_side(n)  # noqa: E731
            drop = gen_side if task == "und" else twin
            total = sum(p.numel() for n, p in named.items() if not drop(n))
        else:
            total = sum(p.numel() for p in named.values())
        for m in self.moe_mlps().values():
            if task == "gen":
                total -= (m.num_routed - m.top_k) * 3 * m.hidden_size * m.expert_size
            elif not mot:
                total -= m.router.weight.numel()
        return total
