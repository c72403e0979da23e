"""The causal-LM family: any checkpoint `AutoModelForCausalLM` builds (Qwen2, Llama, Mistral, Phi,
and any architecture an adapter can describe), with one task kind, `text`.

Rows hold token ids (`input_ids`: list<int>); calibration runs one forward per batch (right
padding, masked out of the statistics); training is next-token cross-entropy on every real token;
held-out metrics are the same per-token NLL and, against the source model, top-1 agreement and KL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from unislim.modeling.surgery.scope import task_scope

from .base import Family, RowProblems, Rows, TaskKind, TokenOutputs


def _vocab_size(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "vocab_size", None)


def _context(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


class CausalLMFamily(Family):
    name = "causal_lm"
    primary_task = "text"
    default_task = "text"
    causal_kinds = ("text",)
    kinds = {"text": TaskKind("text", {"input_ids": "list<int> (token ids of one sequence, 2..context tokens)"},
                              {"text": "string (ignored; for reference)"}, description="next-token prediction")}

    @classmethod
    def matches(cls, config) -> bool:
        from transformers import AutoModelForCausalLM

        return type(config) in AutoModelForCausalLM._model_mapping

    def describe(self, model: nn.Module) -> str:
        c = model.config
        return f"{c.model_type}-L{getattr(c, 'num_hidden_layers', '?')}-d{getattr(c, 'hidden_size', '?')}"

    # ------------------------------------------------------------ data
    def check_table(self, kind: str, table, where: str, model_config=None) -> None:
        """Every row: at least 2 tokens, ids in the model's vocabulary, no longer than its context."""
        super().check_table(kind, table, where, model_config)
        vocab, context = _vocab_size(model_config), _context(model_config)
        problems = RowProblems()
        for i, ids in enumerate(table.column("input_ids").to_pylist()):
            if ids is None or len(ids) < 2:
                problems.add("with fewer than 2 tokens", i, f"{0 if ids is None else len(ids)} tokens")
                continue
            low, high = min(ids), max(ids)
            if low < 0 or (vocab is not None and high >= vocab):
                problems.add(f"with token ids outside 0..{(vocab or 0) - 1} (the model's vocabulary)", i,
                             f"found {low}..{high}")
            if context is not None and len(ids) > context:
                problems.add(f"longer than the model's context of {context} tokens", i, f"{len(ids)} tokens")
        problems.raise_if_any(where, table.num_rows)

    # ------------------------------------------------------------ batches
    @staticmethod
    def _pad(column) -> tuple[torch.Tensor, torch.Tensor]:
        """A column of id lists → right-padded ids (B, T) and the real-token mask (B, T) bool."""
        seqs = [torch.as_tensor(np.asarray(r, dtype=np.int64)) for r in column]
        length = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, True
        return ids, mask

    def _forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with task_scope(model, "text", token_mask=mask):  # no KV cache: one forward, and MoD layers route
            return model(input_ids=ids, attention_mask=mask.long(), use_cache=False, **kwargs)

    # ------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, model: nn.Module, kind: str, batch: Rows, recorder, **_) -> int:
        self.task_kind(kind)
        ids, mask = self._pad(batch["input_ids"])
        recorder.token_mask = mask.to(next(model.parameters()).device)
        run = getattr(recorder, "run", None)
        if run is not None:  # ends the forward after the last decoder layer: the LM head is never read
            run(lambda: self._forward(model, ids, mask), stop_early=True)
        else:
            self._forward(model, ids, mask)
        return len(ids)

    # ------------------------------------------------------------ training
    def collate(self, rows: dict[str, Rows], generator: torch.Generator, model_config=None) -> dict[str, Any]:
        ids, mask = self._pad(rows["text"]["input_ids"])
        return {"input_ids": ids, "attention_mask": mask}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        labels = ids.masked_fill(~mask, -100).to(next(model.parameters()).device)
        out = self._forward(model, ids, mask, labels=labels)
        return out.loss, {"text_loss": out.loss}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_batch(self, model: nn.Module, kind: str, rows: Rows, generator: torch.Generator) -> TokenOutputs:
        self.task_kind(kind)
        ids, mask = self._pad(rows["input_ids"])
        logits = self._forward(model, ids, mask).logits  # (B, T, V)
        keep = (mask[:, 1:] & mask[:, :-1]).to(logits.device)  # positions whose next token is real
        return TokenOutputs(logits[:, :-1][keep].float(), ids[:, 1:].to(logits.device)[keep])

    @torch.no_grad()
    def generate(self, model: nn.Module, kind: str, inputs: dict[str, Any], *, step_hook=None,
                 max_new_tokens: int = 16, **options):
        """Greedy continuation of `inputs["input_ids"]` (B, T) with HF `generate`."""
        if step_hook is not None:
            raise ValueError("the causal_lm family decodes with HF generate, which has no per-step hook")
        ids = inputs["input_ids"].to(next(model.parameters()).device)
        with task_scope(model, "text"):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, **options)

    # ------------------------------------------------------------ acceleration
    NOT_APPLICABLE = {
        "layer_skip": "FlashU re-measures layer redundancy across the denoising steps of one image; text decoding "
                      "has no such steps, and a layer skipped for a decoded token would leave no keys/values in its "
                      "KV cache for later tokens",
        "cfg_schedule": "text decoding runs no classifier-free guidance",
        "head_cache": "there is no diffusion head whose input could be cached between steps",
        "token_pruning": "a text-only model has no visual tokens to prune",
    }

    @torch.no_grad()
    def accelerate(self, model: nn.Module, acceleration, scores, *, heldout=None, tasks=None, latency: dict,
                   evaluate: dict, out_dir=None, progress=print, **_) -> dict[str, Any]:
        """Task pruning for `text` (each MLP cut to its top `keep_text` neurons by the text task's
        scores); the other techniques have no counterpart in text decoding (`NOT_APPLICABLE`)."""
        import copy

        from unislim.modeling.accelerate import interleaved_latency
        from unislim.modeling.evaluation import heldout_rows, task_metrics
        from unislim.modeling.surgery.prune import keep_neurons

        not_applicable = {t: self.NOT_APPLICABLE[t] for t in acceleration.enabled if t in self.NOT_APPLICABLE}
        variants = {"baseline": model}
        if acceleration.task_pruning is not None:
            if not scores or "text" not in scores:
                raise ValueError("accelerate.task_pruning needs the text task's neuron scores (score stage)")
            pruned = copy.deepcopy(model)
            adapter = self.adapter(pruned)
            keep_neurons(pruned, adapter, "und", scores["text"], keep=acceleration.task_pruning.keep_text)
            variants["task_pruning"] = pruned
        if len(variants) == 1:
            raise ValueError(f"accelerate: none of {acceleration.enabled} applies to a causal LM: "
                             + "; ".join(f"{t}: {why}" for t, why in not_applicable.items()))
        rows = heldout_rows(self, heldout, tasks, 64, evaluate["seed"])
        table: dict[str, dict[str, Any]] = {}
        for name, m in variants.items():
            table[name] = {"model": "baseline" if name == "baseline" else f"accelerate:{name}"}
            for task, (kind, task_rows) in rows.items():
                table[name].update(task_metrics(self, m, model, task, kind, task_rows, evaluate["seed"], 1))
            table[name]["params/total"] = float(m.num_parameters())
            table[name]["params/active_text"] = table[name]["params/active"] = float(self.active_parameters(m, "text"))
        for task, (kind, task_rows) in rows.items():  # prefill and greedy decode, interleaved rounds
            sample = {k: v[:latency["und"]] for k, v in task_rows.items()}
            prompts, _ = self._pad([r[:16] for r in sample["input_ids"]])
            prefill = {n: (lambda m=m: self.eval_batch(m, kind, sample, torch.Generator())) for n, m in variants.items()}
            decode = {n: (lambda m=m: self.generate(m, kind, {"input_ids": prompts}, max_new_tokens=8))
                      for n, m in variants.items()}
            for label, fns in ((task, prefill), (f"{task}_decode", decode)):
                times = interleaved_latency(fns, latency["repeats"])
                for n in variants:
                    table[n][f"latency_ms/{label}_per_sample"] = 1000 * times[n]["wall"] / len(prompts)
                    table[n][f"speedup/{label}"] = times["baseline"]["wall"] / times[n]["wall"]
                    table[n][f"speedup_cpu/{label}"] = times["baseline"]["cpu"] / times[n]["cpu"]
        lines = ["| variant | " + " | ".join(k for k in table["baseline"] if k != "model") + " |",
                 "|---" * len(table["baseline"]) + "|"]
        for name, r in table.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for k, v in r.items() if k != "model") + " |")
        return {"rows": table, "reported": "task_pruning", "table": "\n".join(lines) + "\n",
                "not_applicable": not_applicable, "work": {}}
