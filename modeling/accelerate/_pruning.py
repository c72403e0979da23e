"""Task-specific MLP widths for one model: sliced copies of the MLPs, swapped in per task.

The copies are cut by `modeling.prune.keep_neurons` (the same surgery as the `prune` stage) with
each task's own neuron scores. In a `shared` model one MLP serves both tasks, so acceleration
holds two extra weight sets (the understanding cut and the generation cut) besides the full one
that the last generation steps use; `params/total` counts all three.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from unislim.modeling.adapters import Adapter
from unislim.modeling.surgery.prune import keep_neurons


def sliced_mlps(model: nn.Module, adapter: Adapter, component: str, scores: dict[str, torch.Tensor],
                keep: float) -> dict[str, nn.Module]:
    """{qualified MLP name: a copy of that MLP keeping the top `keep` of its neurons by `scores`}.

    Works on a deep copy (the model itself is untouched); only the sliced MLPs are kept.
    """
    clone = copy.deepcopy(model)
    kept = keep_neurons(clone, adapter, component, scores, keep)
    return {name: clone.get_submodule(name) for name in kept}


class ModuleSwap:
    """Puts other modules in place of named submodules, and always puts the originals back.

        with ModuleSwap(model) as swap:
            swap.use(und_mlps)      # {qualified name: module}
            ...
            swap.use({})            # the originals again
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._originals: dict[str, tuple[nn.Module, str, nn.Module]] = {}

    def use(self, modules: dict[str, nn.Module]) -> None:
        self.restore()
        for name, module in modules.items():
            parent, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            self._originals[name] = (owner, attr, getattr(owner, attr))
            setattr(owner, attr, module)

    def restore(self) -> None:
        for owner, attr, module in self._originals.values():
            setattr(owner, attr, module)
        self._originals.clear()

    def __enter__(self) -> ModuleSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def param_count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
