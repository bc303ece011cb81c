"""Parameter-efficient finetuning: LoRA by hand, and the one freeze/unfreeze helper.

LoRA (Hu et al. 2021, eq. 3): a frozen linear map W gets a trainable low-rank update,
h = W x + (alpha / r) * B A x, with A (r x in) initialized like a Linear (Kaiming uniform) and
B (out x r) zero, so training starts from exactly the base model. LLaVA-1.5's LoRA recipe (the
official scripts/v1_5/finetune_lora.sh; the dissertation
itself does not describe it): rank 128, alpha 256, dropout 0.05, on all linear layers of the LLM
(LLAVA15_LORA_TARGETS), projector trained fully, lr 2e-4.

Checkpoints: `MLLM.save_pretrained` always writes merged weights (`merged_state_dict`), so a
LoRA-finetuned model is saved as a plain LLaVA checkpoint that any loader, transformers included,
reads; the LoRA factors themselves are not written there.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# Every linear layer of the LLaMA decoder (attention and MLP projections), not the head.
LLAVA15_LORA_TARGETS = [r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"]


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update. The base weight stays at `.weight` / `.bias`, so the
    state-dict keys of the base model (and every checkpoint table) are unchanged; the factors are
    `lora_A.weight` and `lora_B.weight`, as in the peft library."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.train(base.training)  # wrapping an eval-mode model must not switch dropout on

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, the update in the shape of the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A into the base weight (inference at the base model's speed)."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take B A back out of the base weight (to continue training the factors)."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, target_patterns: list[str], rank: int = 128, alpha: float = 256,
               dropout: float = 0.05) -> list[str]:
    """Replace every nn.Linear whose full module name matches one of the regexes (re.search) by a
    LoRALinear; returns the wrapped names. Defaults are LLaVA-1.5's recipe (r 128, alpha 256,
    dropout 0.05). Freezing is separate: see set_trainable."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(re.search(p, name) for p in target_patterns)]
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear matches {target_patterns}")
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA update into its base weight."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every (unmerged) LoRA update folded into its `.weight` and the
    factors dropped: the keys and values of the equivalent plain model. The model is unchanged."""
    state = model.state_dict()
    for name, layer in lora_layers(model):
        if not layer.merged:
            state[f"{name}.weight"] = layer.weight.detach() + layer.delta_weight().detach().to(layer.weight.dtype)
        del state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
    return state


def set_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Train exactly the parameters whose name matches one of the regexes (re.search); freeze the
    rest. Returns the trainable names. Stage 1 of LLaVA: [r"^multi_modal_projector\\."]; LoRA:
    [r"lora_", r"^multi_modal_projector\\."]."""
    compiled = [re.compile(p) for p in patterns]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p.search(name) for p in compiled))
        if parameter.requires_grad:
            trainable.append(name)
    if patterns and not trainable:
        raise ValueError(f"set_trainable: no parameter name matches {patterns}")
    return trainable
