"""Parameter-efficient finetuning: LoRA, LION's mixture of adapters, and the one freeze/unfreeze helper.

LoRA (Hu et al. 2021, eq. 3): a frozen linear map W gets a trainable low-rank update,
h = W x + (alpha / r) * B A x, with A (r x in) initialized like a Linear (Kaiming uniform) and
B (out x r) zero, so training starts from exactly the base model. LLaVA-1.5's LoRA recipe (the
official scripts/v1_5/finetune_lora.sh; the dissertation
itself does not describe it): rank 128, alpha 256, dropout 0.05, on all linear layers of the LLM
(LLAVA15_LORA_TARGETS), projector trained fully, lr 2e-4.

LION's mixture of adapters ("LION: Empowering MLLM with Dual-Level Visual Knowledge", sec.
3.1.2, eqs. 1-3): a bottleneck adapter beside every feed-forward block of the LLM, reading the
block's input X, O = F(X) + H(X) with H(X) = W_u ReLU(W_d X) (eq. 2); one adapter per task level
(region-level: REC / REG; image-level: captions, VQA) and a router of per-channel gate vectors
per task level, O^t = F(X) + sum_k G_k^t * H_k(X) (eq. 3). The batch's task level picks the gate
row (`set_task_level`).

Lynx's adapters ("What Matters in Training a GPT4-Style Language Model with Multimodal Inputs?",
sec. 2.1, Fig. 3b): after every second decoder layer (0, 2, ..., L-2), on the layer's output h,
h + s * W_up SiLU(W_down LN(h)), down to half the width, s a learnable scalar.

LoRA and both adapter kinds are put into a model by one loop over module names (`matching_modules`).

Checkpoints: `MLLM.save_pretrained` always writes merged weights (`merged_state_dict`), so a
LoRA-finetuned model is saved as a plain LLaVA checkpoint that any loader, transformers included,
reads; the LoRA factors themselves are not written there.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import PreNormBlock

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


def matching_modules(model: nn.Module, patterns: list[str], kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every `kind` module whose full name matches one of the regexes (re.search);
    an error when none does, so a typo in a pattern never trains nothing."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, kind) and any(re.search(p, name) for p in patterns)]
    if not found:
        raise ValueError(f"no {kind.__name__} module name matches {patterns}")
    return found


def apply_lora(model: nn.Module, target_patterns: list[str], rank: int = 128, alpha: float = 256,
               dropout: float = 0.05) -> list[str]:
    """Replace every nn.Linear whose full module name matches one of the regexes (re.search) by a
    LoRALinear; returns the wrapped names. Defaults are LLaVA-1.5's recipe (r 128, alpha 256,
    dropout 0.05). Freezing is separate: see set_trainable."""
    names = [name for name, _ in matching_modules(model, target_patterns, nn.Linear)]
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
    # From the state dict's tensors, not the layers' (a sharded model's are gathered there only).
    state = dict(model.state_dict())
    for name, layer in lora_layers(model):
        lora_a, lora_b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        if not layer.merged:
            weight = state[f"{name}.weight"]
            state[f"{name}.weight"] = weight + ((lora_b @ lora_a) * layer.scaling).to(weight.dtype)
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


# ----------------------------------------------------------------------------------------------
# LION's mixture of adapters (sec. 3.1.2)

# The router's task levels, numbered as the official code's `router_idx`.
TASK_LEVELS = {"region": 0, "image": 1}


class BottleneckAdapter(nn.Module):
    """H(X) = W_u ReLU(W_d X) (LION eq. 2), times a learnable scalar `scale` (the official
    "learnable_scalar", 1 at the start). Initialized as LoRA is: the down projection like an
    nn.Linear, the up projection and its bias zero, so an inserted adapter changes nothing until
    it trains."""

    def __init__(self, width: int, bottleneck: int = 64):
        super().__init__()
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(F.relu(self.down_proj(x))) * self.scale


class AdapterRouter(nn.Module):
    """sum_k G_k^t * H_k(X) (LION eq. 3): one adapter per task level and `router_gates` (adapters,
    task levels, width), the per-channel gate G_k^t of adapter k for task level t, one-hot at the
    start (level t reads adapter t alone: the two adapters of stages 1 and 2 meet in stage 3 as
    they were trained). `task_level` is an int for the whole batch or a (batch,) tensor, set by
    `set_task_level`. Without `learned_gates` (or with one adapter), the gates are fixed at one:
    every adapter is added whatever the task (LION's "directly incorporating multiple adapters",
    Table 3's ablation)."""

    def __init__(self, width: int, bottleneck: int = 64, num_adapters: int = 2, learned_gates: bool = True):
        super().__init__()
        self.adapters = nn.ModuleList(BottleneckAdapter(width, bottleneck) for _ in range(num_adapters))
        if learned_gates and num_adapters > 1:
            gates = torch.zeros(num_adapters, len(TASK_LEVELS), width)
            for level in range(len(TASK_LEVELS)):
                gates[level, level] = 1.0
            self.router_gates = nn.Parameter(gates)
        else:  # fixed ones (one adapter: the official code keeps no gates): a buffer no pattern trains, not saved
            self.register_buffer("router_gates", torch.ones(num_adapters, len(TASK_LEVELS), width), persistent=False)
        self.task_level: int | torch.Tensor = TASK_LEVELS["image"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.task_level
        gates = self.router_gates[:, level]  # (adapters, width), or (adapters, batch, width)
        if isinstance(level, torch.Tensor):
            # Beam search repeats each sample's rows in place (decoding.KVCache.repeat_rows).
            gates = gates.repeat_interleave(x.shape[0] // gates.shape[1], dim=1)[:, :, None]
        return sum(gate * adapter(x) for gate, adapter in zip(gates, self.adapters))


def insert_adapters(model: nn.Module, block_patterns: list[str], slot: str,
                    new_adapter: Callable[[int], nn.Module]) -> list[str]:
    """Set `new_adapter(width)` as the `slot` ("parallel_adapter" or "output_adapter") of every
    layers.PreNormBlock whose name matches `block_patterns`, on the block's device and dtype.
    Returns the block names."""
    found = matching_modules(model, block_patterns, PreNormBlock)
    for _, block in found:
        parameter = block.post_attention_layernorm.weight
        setattr(block, slot, new_adapter(parameter.shape[0]).to(device=parameter.device, dtype=parameter.dtype))
    return [name for name, _ in found]


def insert_parallel_adapters(model: nn.Module, block_patterns: list[str], bottleneck: int = 64,
                             num_adapters: int = 2, learned_gates: bool = True) -> list[str]:
    """Give every PreNormBlock whose name matches `block_patterns` an AdapterRouter beside its
    feed-forward (LION sets one in every T5 FFN, encoder and decoder; a LLaMA decoder layer's MLP
    takes it the same way). Returns the block names."""
    return insert_adapters(model, block_patterns, "parallel_adapter",
                           lambda width: AdapterRouter(width, bottleneck, num_adapters, learned_gates))


def set_task_level(model: nn.Module, task_level: int | torch.Tensor | None) -> None:
    """Every AdapterRouter of `model` reads the gates of `task_level` (TASK_LEVELS' numbers; a
    (batch,) tensor gives each sample its own; None: image-level, the level of a sample that names
    none) until the next call. It is not reset when the forward pass returns: with gradient
    checkpointing, backward recomputes each layer and must see the batch's level again."""
    for module in model.modules():
        if isinstance(module, AdapterRouter):
            module.task_level = TASK_LEVELS["image"] if task_level is None else task_level


# ----------------------------------------------------------------------------------------------
# Lynx's adapters (sec. 2.1, Fig. 3b)


class OutputAdapter(nn.Module):
    """s * W_up SiLU(W_down LN(h)) with W_down to half the width (Lynx: 4096 -> 2048) and s a
    learnable scalar (1 at the start); the block adds it to its output. The official
    initialization: both projections N(0, 0.02), zero biases, so unlike LoRA or LION's adapters
    it changes the frozen LLM a little from the first step. Names are ours; the official ones
    (`adapter_norm_before`, `adapter_down`, `adapter_up`, `scaling`) are mapped by
    checkpoints.LYNX_LAYOUT."""

    def __init__(self, width: int, bottleneck: int | None = None):
        super().__init__()
        bottleneck = bottleneck or width // 2
        self.norm = nn.LayerNorm(width)  # eps 1e-5, nn.LayerNorm's (the official)
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        for linear in (self.down_proj, self.up_proj):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up_proj(F.silu(self.down_proj(self.norm(h)))) * self.scale


def insert_output_adapters(model: nn.Module, num_layers: int, every: int = 2) -> list[str]:
    """An OutputAdapter after decoder layers 0, every, 2 * every, ... < num_layers (Lynx: every
    2nd of Vicuna's 32, `adapter_freq: 2`) of a LLaMA decoder (model.LanguageModel's
    `model.layers.N`). Returns the layer names."""
    if every < 1:
        raise ValueError(f"insert_output_adapters: every must be >= 1, not {every}")
    layers = "|".join(str(index) for index in range(0, num_layers, every))
    return insert_adapters(model, [rf"(^|\.)layers\.({layers})$"], "output_adapter", OutputAdapter)
