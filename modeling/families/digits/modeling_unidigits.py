"""The embedded reference unified model: one Qwen2-style decoder that answers questions about
two-digit scenes and draws scenes from prompts by rectified flow.

Module names match real checkpoints so every adapter and hook is exercised on the real thing:
`model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`; the `mot` variant adds BAGEL's generation copies
`self_attn.q_proj_moe_gen`, ..., `mlp_moe_gen`, `input_layernorm_moe_gen`, ... and `model.norm_moe_gen`.

Sequences (positions count only non-pad tokens):
  understanding: [32 clean image tokens][question (left-padded)][answer][eos]  -> CE on the answer
  generation:    [prompt (left-padded)][32 noisy image tokens + timestep emb]  -> MSE on v = eps - x0
Attention is causal over text; image tokens attend to each other bidirectionally; pads are never keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from unislim.modeling.surgery.scope import task_scope

from .configuration_unidigits import UniDigitsConfig

GEN_SUFFIX = "_moe_gen"


def _route(und: nn.Module, gen: nn.Module | None, x: torch.Tensor, gen_mask: torch.Tensor | None) -> torch.Tensor:
    """Applies `und` to understanding tokens and `gen` to generation tokens (mixture-of-transformers).

    x (B, T, d_in); gen_mask (B, T) bool or None (all understanding). Both copies are always
    called (possibly on zero rows) so DDP sees every parameter used.
    """
    if gen is None or gen_mask is None:
        return und(x)
    y_und, y_gen = und(x[~gen_mask]), gen(x[gen_mask])  # (N_und, d_out), (N_gen, d_out)
    out = x.new_empty(*x.shape[:-1], y_und.shape[-1])  # (B, T, d_out)
    out[~gen_mask] = y_und
    out[gen_mask] = y_gen
    return out


def _keep_tokens(keep: torch.Tensor, hidden: torch.Tensor, allowed: torch.Tensor, gen_mask: torch.Tensor | None,
                 cos_sin: tuple[torch.Tensor, ...]):
    """The rows `keep` (B, T') of hidden (B, T, d), the mask (B, T, T), gen_mask (B, T) and cos/sin (B, T, hd)."""

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, T', ...)
        index = keep.view(*keep.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    allowed = rows(allowed).gather(2, keep[:, None, :].expand(-1, keep.shape[1], -1))  # (B, T', T')
    return rows(hidden), allowed, None if gen_mask is None else rows(gen_mask), tuple(rows(c) for c in cos_sin)


class UniDigitsAttention(nn.Module):
    """Qwen2 attention (GQA, RoPE, biased q/k/v) with an explicit mask through torch SDPA."""

    def __init__(self, config: UniDigitsConfig, mot: bool):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        d, hd = config.hidden_size, config.head_dim
        shapes = {"q_proj": (d, self.num_heads * hd, True), "k_proj": (d, self.num_kv_heads * hd, True),
                  "v_proj": (d, self.num_kv_heads * hd, True), "o_proj": (self.num_heads * hd, d, False)}  # fmt: skip
        for name, (i, o, bias) in shapes.items():
            setattr(self, name, nn.Linear(i, o, bias=bias))
            if mot:
                setattr(self, name + GEN_SUFFIX, nn.Linear(i, o, bias=bias))
        self.mot = mot

    def _proj(self, name: str, x: torch.Tensor, gen_mask: torch.Tensor | None) -> torch.Tensor:
        return _route(getattr(self, name), getattr(self, name + GEN_SUFFIX, None), x, gen_mask)

    def forward(self, hidden: torch.Tensor, cos_sin, mask: torch.Tensor, gen_mask: torch.Tensor | None):
        # hidden (B, T, d); mask (B, 1, T, T) bool, True = may attend
        B, T, _ = hidden.shape
        q = self._proj("q_proj", hidden, gen_mask).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self._proj("k_proj", hidden, gen_mask).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self._proj("v_proj", hidden, gen_mask).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * hd)
        return self._proj("o_proj", out, gen_mask)


class UniDigitsDecoderLayer(nn.Module):
    """A Qwen2 decoder layer; in `mot` every norm/attention/MLP has a `_moe_gen` twin.

    A sublayer listed in `config.drop_attention_layers` / `drop_mlp_layers` is not built (its
    residual branch is gone), so a pruned checkpoint holds no weights for it.
    """

    def __init__(self, config: UniDigitsConfig, layer_idx: int):
        super().__init__()
        mot = config.variant == "mot"
        norm = lambda: Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        if layer_idx not in config.drop_attention_layers:
            self.self_attn = UniDigitsAttention(config, mot)
            self.input_layernorm = norm()
            if mot:
                self.input_layernorm_moe_gen = norm()
        if layer_idx not in config.drop_mlp_layers:
            self.mlp = Qwen2MLP(config)
            self.post_attention_layernorm = norm()
            if mot:
                gen_width = SimpleNamespace(hidden_size=config.hidden_size, hidden_act=config.hidden_act,
                                            intermediate_size=config.intermediate_size_gen)  # fmt: skip
                self.mlp_moe_gen = Qwen2MLP(gen_width)
                self.post_attention_layernorm_moe_gen = norm()

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, name + GEN_SUFFIX, None)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, gen_mask=None, **kwargs):
        """Called Llama-style (keywords), so generic layer surgery (MoD routing) can gather every
        per-token argument. hidden_states (B, T, d); attention_mask (B, 1, T, T) bool, True = may
        attend; position_embeddings (cos, sin) each (B, T, hd); gen_mask (B, T) bool or None."""
        hidden = hidden_states
        if hasattr(self, "self_attn"):
            h = _route(self.input_layernorm, self._gen("input_layernorm"), hidden, gen_mask)
            hidden = hidden + self.self_attn(h, position_embeddings, attention_mask, gen_mask)
        if hasattr(self, "mlp"):
            h = _route(self.post_attention_layernorm, self._gen("post_attention_layernorm"), hidden, gen_mask)
            hidden = hidden + _route(self.mlp, self._gen("mlp"), h, gen_mask)
        return hidden


class UniDigitsBackbone(nn.Module):
    """Token embedding + decoder layers + final norm (the `model.` prefix of a Qwen2 checkpoint)."""

    def __init__(self, config: UniDigitsConfig):
        super().__init__()
        mot = config.variant == "mot"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(UniDigitsDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if mot:
            self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def forward(
        self,
        embeds: torch.Tensor,
        key_mask: torch.Tensor,
        is_image: torch.Tensor,
        gen_mask: torch.Tensor | None,
        skip_layers: Collection[int] = (),
        token_filter: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """embeds (B, T, d); key_mask (B, T) bool (False = pad); is_image (T,) bool; gen_mask (B, T) bool.

        Returns the final-normed hidden states (B, T, d). `skip_layers` leaves those layers out
        (identity), for layer-skipping accelerations. `token_filter(i, hidden)`, called after layer
        i, may return indices (B, T') of the tokens the later layers keep (token pruning); then
        fewer than T rows come back.
        """
        T = embeds.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
        allowed = (causal | (is_image[:, None] & is_image[None, :]))[None] & key_mask[:, None, :]  # (B, T, T)
        allowed |= torch.eye(T, dtype=torch.bool, device=embeds.device)  # a pad query sees itself: no NaN rows
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads do not advance positions
        cos_sin = self.rotary_emb(embeds, positions)
        hidden = embeds
        for i, layer in enumerate(self.layers):
            if i not in skip_layers:
                hidden = layer(hidden, attention_mask=allowed[:, None], position_embeddings=cos_sin, gen_mask=gen_mask)
            keep = token_filter(i, hidden) if token_filter is not None else None
            if keep is not None:
                hidden, allowed, gen_mask, cos_sin = _keep_tokens(keep, hidden, allowed, gen_mask, cos_sin)
        return _route(self.norm, getattr(self, "norm_moe_gen", None), hidden, gen_mask)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the flow time t in [0, 1] -> MLP -> (B, d)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(hidden_size, hidden_size), nn.Linear(hidden_size, hidden_size)
        self.dim = hidden_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t (B,)
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
        args = 1000.0 * t[:, None].float() * freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, d)
        return self.linear_2(F.silu(self.linear_1(emb)))


@dataclass
class UniDigitsOutput(ModelOutput):
    loss: torch.Tensor | None = None
    und_loss: torch.Tensor | None = None
    gen_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B_und, T_text, V)
    velocity: torch.Tensor | None = None  # (B_gen, 8, 16)


@dataclass
class DenoiseStep:
    """One Euler step of `generate_images`, handed to `step_callback` before the model runs.

    A callback may change `cfg_scale` or `skip_layers` for this step, or set `velocity` to skip
    the model (e.g. reuse `prev_velocity`: a diffusion-head cache). After the step `velocity`
    holds the velocity that was used.
    """

    index: int
    steps: int
    t: float
    t_next: float
    x: torch.Tensor  # (B, 32, 4) current noisy tokens
    cfg_scale: float
    skip_layers: set[int] = field(default_factory=set)
    velocity: torch.Tensor | None = None  # (B, 32, 4)
    prev_velocity: torch.Tensor | None = None


class UniDigitsModel(PreTrainedModel):
    """The reference unified model (see module docstring)."""

    config_class = UniDigitsConfig
    config: UniDigitsConfig
    base_model_prefix = "model"
    main_input_name = "und_input_ids"
    _supports_sdpa = True
    _no_split_modules = ["UniDigitsDecoderLayer"]

    def __init__(self, config: UniDigitsConfig):
        super().__init__(config)
        d, n_img, p = config.hidden_size, config.num_image_tokens, config.patch_dim
        self.model = UniDigitsBackbone(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.und_image_proj = nn.Linear(p, d)  # clean patches -> tokens (understanding encoder)
        self.gen_image_proj = nn.Linear(p, d)  # noisy patches -> tokens (generation input)
        self.image_pos_embed = nn.Embedding(n_img, d)  # where each patch sits on the canvas
        self.time_embed = TimestepEmbedder(d)
        self.gen_head = nn.Sequential(nn.Linear(d, config.head_hidden_size), nn.SiLU(), nn.Linear(config.head_hidden_size, p))
        self.post_init()

    # ------------------------------------------------------------ patches
    def patchify(self, canvas: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, 32, 4): 2x2 patches in row-major order."""
        B, H, W = canvas.shape
        p = self.config.patch_size
        x = canvas.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)  # (B, H/p, W/p, p, p)
        return x.reshape(B, -1, p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 32, 4) -> (B, H, W)."""
        c, p = self.config, self.config.patch_size
        B = tokens.shape[0]
        x = tokens.reshape(B, c.image_height // p, c.image_width // p, p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(B, c.image_height, c.image_width)

    # ------------------------------------------------------------ task forwards
    def und_logits(self, images: torch.Tensor, input_ids: torch.Tensor, skip_layers: Collection[int] = (),
                   token_filter: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """images (B, 8, 16) in [-1, 1]; input_ids (B, L) text (pads anywhere) -> logits (B, L, V).

        Runs past `skip_layers` and `config.skip_layers_und`; `token_filter` as in the backbone
        (it may drop image tokens; the text tokens are the last L rows either way).
        """
        n_img = self.config.num_image_tokens
        img = self.und_image_proj(self.patchify(images)) + self.image_pos_embed.weight  # (B, 32, d)
        embeds = torch.cat([img, self.model.embed_tokens(input_ids)], dim=1)  # (B, 32 + L, d)
        key_mask = torch.cat([torch.ones_like(input_ids[:, :1].expand(-1, n_img), dtype=torch.bool),
                              input_ids != self.config.pad_token_id], dim=1)  # fmt: skip
        is_image = torch.arange(embeds.shape[1], device=embeds.device) < n_img  # (T,)
        skip = set(skip_layers) | set(self.config.skip_layers_und)
        with task_scope(self, "und", token_mask=key_mask):
            hidden = self.model(embeds, key_mask, is_image, gen_mask=None, skip_layers=skip, token_filter=token_filter)
        return self.lm_head(hidden[:, -input_ids.shape[1]:])

    def gen_velocity(
        self, prompt_ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, skip_layers: Collection[int] = ()
    ) -> torch.Tensor:
        """prompt_ids (B, P) left-padded; x_t (B, 32, 4) noisy tokens; t (B,) -> predicted v (B, 32, 4).

        Runs past `skip_layers` and `config.skip_layers_gen`.
        """
        hidden, t_emb = self.gen_hidden(prompt_ids, x_t, t, skip_layers)
        return self.gen_head(hidden + t_emb)  # (B, 32, 4)

    def gen_hidden(
        self, prompt_ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, skip_layers: Collection[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone half of `gen_velocity`: image hidden states (B, 32, d) and the timestep
        embedding (B, 1, d); the diffusion head maps their sum to v (a cache may reuse the former)."""
        n_img, P = self.config.num_image_tokens, prompt_ids.shape[1]
        t_emb = self.time_embed(t)[:, None]  # (B, 1, d)
        img = self.gen_image_proj(x_t) + self.image_pos_embed.weight + t_emb  # (B, 32, d)
        embeds = torch.cat([self.model.embed_tokens(prompt_ids), img], dim=1)  # (B, P + 32, d)
        key_mask = torch.cat([prompt_ids != self.config.pad_token_id,
                              torch.ones_like(prompt_ids[:, :1].expand(-1, n_img), dtype=torch.bool)], dim=1)  # fmt: skip
        is_image = torch.arange(P + n_img, device=embeds.device) >= P  # (T,)
        gen_mask = is_image[None].expand(len(prompt_ids), -1) if self.config.variant == "mot" else None
        skip = set(skip_layers) | set(self.config.skip_layers_gen)
        with task_scope(self, "gen", token_mask=key_mask):
            hidden = self.model(embeds, key_mask, is_image, gen_mask=gen_mask, skip_layers=skip)
        return hidden[:, P:], t_emb

    def forward(
        self,
        und_images: torch.Tensor | None = None,
        und_input_ids: torch.Tensor | None = None,
        und_labels: torch.Tensor | None = None,
        gen_prompt_ids: torch.Tensor | None = None,
        gen_images: torch.Tensor | None = None,
        gen_noise: torch.Tensor | None = None,
        gen_t: torch.Tensor | None = None,
    ) -> UniDigitsOutput:
        """Training forward over either task or both (the batch of `make_batch`); loss = und + gen.

        Understanding: next-token CE on labelled (answer) positions. Generation: rectified flow,
        x_t = (1 - t) x0 + t eps, target v = eps - x0, MSE.
        """
        out = UniDigitsOutput()
        losses = []
        if und_input_ids is not None:
            out.logits = self.und_logits(und_images, und_input_ids)  # (B, L, V)
            if und_labels is not None:
                out.und_loss = F.cross_entropy(
                    out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), und_labels[:, 1:].reshape(-1), ignore_index=-100
                )
                losses.append(out.und_loss)
        if gen_prompt_ids is not None:
            x0, eps = self.patchify(gen_images), self.patchify(gen_noise)  # (B, 32, 4)
            t = gen_t[:, None, None]
            v = self.gen_velocity(gen_prompt_ids, (1 - t) * x0 + t * eps, gen_t)
            out.velocity = self.unpatchify(v)
            out.gen_loss = F.mse_loss(v, eps - x0)
            losses.append(out.gen_loss)
        if losses:
            out.loss = sum(losses)
        return out

    # ------------------------------------------------------------ inference entry points
    @torch.no_grad()
    def answer(self, images: torch.Tensor, question_ids: torch.Tensor, max_new_tokens: int = 3,
               token_filter: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """Greedy decode. images (B, 8, 16) in [-1, 1]; question_ids (B, L) left-padded.

        Returns (B, max_new_tokens) token ids, `<pad>` after each `<eos>`. No KV cache: a
        sequence is ~45 tokens and the whole prefix is re-run per token. `token_filter`: see
        `und_logits`.
        """
        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        ids = question_ids
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(max_new_tokens):
            nxt = self.und_logits(images, ids, token_filter=token_filter)[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return torch.stack(new, dim=1)

    def null_prompt_like(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The unconditional prompt: `<null>` left-padded to the same length (as in training)."""
        null = torch.full_like(prompt_ids, self.config.pad_token_id)
        null[:, -1] = self.config.vocab.index("<null>")
        return null

    def denoise_velocity(
        self, x: torch.Tensor, t: float, prompt_ids: torch.Tensor, cfg_scale: float, skip_layers: Collection[int] = ()
    ) -> torch.Tensor:
        """Guided velocity for one step: v_u + s (v_c - v_u); s == 1 runs the conditional pass only.

        x (B, 32, 4). Override (or use `step_callback`) to change behaviour per step.
        """
        B = x.shape[0]
        if cfg_scale == 1.0:
            return self.gen_velocity(prompt_ids, x, x.new_full((B,), t), skip_layers)
        both = self.gen_velocity(
            torch.cat([prompt_ids, self.null_prompt_like(prompt_ids)]), torch.cat([x, x]), x.new_full((2 * B,), t), skip_layers
        )  # (2B, 32, 4)
        v_c, v_u = both[:B], both[B:]
        return v_u + cfg_scale * (v_c - v_u)

    @torch.no_grad()
    def generate_images(
        self,
        prompt_ids: torch.Tensor,
        steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        step_callback: Callable[[DenoiseStep], None] | None = None,
    ) -> torch.Tensor:
        """Euler sampling of the flow from t = 1 (noise) to t = 0; prompt_ids (B, P) left-padded.

        Returns canvases (B, 8, 16) in model units (values may overshoot [-1, 1]). The noise is
        drawn on the CPU from `generator`, so a seed gives the same scenes on any device.
        """
        steps = steps or self.config.sample_steps
        cfg = float(self.config.cfg_scale if cfg_scale is None else cfg_scale)
        shape = (len(prompt_ids), self.config.num_image_tokens, self.config.patch_dim)
        x = torch.randn(shape, generator=generator).to(self.device, self.dtype)  # (B, 32, 4)
        prompt_ids = prompt_ids.to(self.device)
        prev = None
        for i in range(steps):
            t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
            step = DenoiseStep(index=i, steps=steps, t=t, t_next=t_next, x=x, cfg_scale=cfg, prev_velocity=prev)
            if step_callback is not None:
                step_callback(step)
            if step.velocity is None:
                step.velocity = self.denoise_velocity(x, t, prompt_ids, step.cfg_scale, step.skip_layers)
            x = x + (t_next - t) * step.velocity
            prev = step.velocity
        return self.unpatchify(x)

    # ------------------------------------------------------------ structure
    def components(self) -> dict[str, list[str]]:
        """Which parameterised leaf modules serve understanding, generation, or both.

        `mot`: the `_moe_gen` copies (and the generation input/time/head modules) are generation,
        their twins are understanding. `shared`: the decoder is shared by both tasks.
        """
        und_only = ("lm_head", "und_image_proj")
        gen_only = ("gen_image_proj", "time_embed", "gen_head")
        mot = self.config.variant == "mot"
        out: dict[str, list[str]] = {"understanding": [], "generation": [], "shared": []}
        for name, module in self.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            top = name.split(".")[0]
            if top in und_only:
                out["understanding"].append(name)
            elif top in gen_only or GEN_SUFFIX in name:
                out["generation"].append(name)
            elif mot and name.startswith("model.") and name != "model.embed_tokens":
                out["understanding"].append(name)  # the twin of a `_moe_gen` copy
            else:
                out["shared"].append(name)
        return out

    def num_active_parameters(self, task: str = "und") -> int:
        """Parameters one token of `task` passes through (`DigitsFamily.active_parameters`): in `mot`
        one of each twin pair, the understanding copy for `und`, the `_moe_gen` copy for `gen`; with
        MoE surgery, the experts a token of the task actually runs."""
        from .family import DigitsFamily

        return DigitsFamily().active_parameters(self, task)
