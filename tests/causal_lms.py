"""Tiny causal LMs for the tests, built from their config classes, trained for a few seconds on a
synthetic language (so that pruning has something to lose), saved to a folder: nothing is downloaded.

The language: a sequence starts at a random token s and steps by k ∈ {1, 2, 3, 5} (mod V), so the
model must read k off its first tokens; held-out NLL goes from log V (chance) to well under 1 nat.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig, Qwen2Config

V, T, STEPS = 64, 24, (1, 2, 3, 5)

# GPT-J: ungated MLP (fc_in -> act -> fc_out), decoder stack `transformer.h`, no GQA — described only here
GPTJ_ADAPTER = {"layers": "transformer.h", "mlp_proj": {"gate": None, "up": "fc_in", "down": "fc_out"},
                "mlp_act": "act", "attention": "attn",
                "attn_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}}


def config(kind: str):
    if kind == "llama":
        return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gptj":
        return GPTJConfig(vocab_size=V, n_embd=32, n_inner=64, n_layer=4, n_head=4, rotary_dim=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


def sequences(n: int, seed: int, length: int = T) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, V, (n,), generator=g)
    steps = torch.tensor(STEPS)[torch.randint(0, len(STEPS), (n,), generator=g)]
    return ((starts[:, None] + steps[:, None] * torch.arange(length)) % V).tolist()


def write_text(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": sequences(n, seed)}), path)
    return path


def trained_lm(kind: str, folder: Path, steps: int = 250, seed: int = 0) -> Path:
    """A tiny `kind` model trained on the synthetic language, saved to `folder`."""
    from unislim.modeling.families import get_family
    from unislim.pipelines.training import make_optimizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind)).train()
    family = get_family("causal_lm")
    optimizer, scheduler = make_optimizer(model, 3e-3, steps, warmup_steps=10)
    for step in range(steps):
        batch = family.collate({"text": {"input_ids": sequences(32, 10_000 + step)}}, torch.Generator())
        loss, _ = family.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval().save_pretrained(folder)
    return folder
