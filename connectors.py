"""Connectors: patch features of the vision tower -> tokens of the LLM's width.

- "linear", LLaVA (papers/llava-dissertation.txt, section 3.4, eq. 3.1): H_v = W . Z_v, one
  trainable projection matrix from the CLIP grid features Z_v into the word-embedding space.
- "mlp2x_gelu", LLaVA-1.5 (section 4.3, "MLP vision-language connector"): a two-layer MLP,
  Linear -> GELU (exact, not tanh) -> Linear, inspired by the MLP heads of self-supervised
  learning; more representation power than the linear map at almost no cost.

Module names follow transformers' LlavaMultiModalProjector (`linear_1`, `linear_2`), so the
llava-hf keys `multi_modal_projector.linear_{1,2}.*` load 1:1. transformers has no single-linear
projector; ours keeps the name `linear_1` for it (original LLaVA v1 checkpoints store it as
`model.mm_projector.*`, LLaVA-1.5's MLP as `model.mm_projector.0/2.*`; model.py maps them).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LinearProjector(nn.Module):
    """LLaVA's connector (eq. 3.1): one linear map per patch feature."""

    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(batch, patches, vision_width) -> (batch, patches, text_width)."""
        return self.linear_1(image_features)


class MLPProjector(nn.Module):
    """LLaVA-1.5's connector (section 4.3): linear_1 -> GELU -> linear_2, applied per patch."""

    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(batch, patches, vision_width) -> (batch, patches, text_width)."""
        return self.linear_2(self.act(self.linear_1(image_features)))


CONNECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLPProjector}


def build_connector(projector_type: str, vision_width: int, text_width: int) -> nn.Module:
    """The connector named by `projector_type` (LLaVA's `mm_projector_type`): one of CONNECTORS."""
    if projector_type not in CONNECTORS:
        raise ValueError(f"unknown projector_type {projector_type!r}; known: {sorted(CONNECTORS)}")
    return CONNECTORS[projector_type](vision_width, text_width)
