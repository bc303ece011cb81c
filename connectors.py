"""Connectors: the hidden states of the vision tower -> tokens of the LLM's width.

The connector drives the composition of an MLLM: it says which ViT layer it reads (and so how
many layers the tower must run), whether the CLS token stays, and how many image tokens it
makes (`num_image_tokens`); MLLM.embed then writes those tokens over the image-token positions
of the text, the same way for every connector.

- "linear", LLaVA (the dissertation, section 3.4, eq. 3.1): H_v = W . Z_v, one trainable
  projection matrix from the CLIP grid features Z_v into the word-embedding space.
- "mlp2x_gelu", LLaVA-1.5 (section 4.3, "MLP vision-language connector"): a two-layer MLP,
  Linear -> GELU (exact, not tanh) -> Linear, inspired by the MLP heads of self-supervised
  learning; more representation power than the linear map at almost no cost.

Module names follow transformers' LlavaMultiModalProjector (`linear_1`, `linear_2`), so the
llava-hf keys `multi_modal_projector.linear_{1,2}.*` load 1:1. transformers has no single-linear
projector; ours keeps the name `linear_1` for it (checkpoints.ORIGINAL_LLAVA_LAYOUT maps LLaVA
v1's `model.mm_projector.*` and LLaVA-1.5's `model.mm_projector.0/2.*` onto these).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vision import VisionConfig

FEATURE_SELECT_STRATEGIES = ("default", "full")  # LLaVA's names: "default" drops CLS, "full" keeps it


class Connector(nn.Module):
    """What every connector shares: the choice of the ViT features it reads.

    LLaVA-1.5 reads layer -2 ("the grid features before the last Transformer layer"; the last
    layer is 0.96 points worse on ScienceQA, dissertation section 3.5) without the tower's final
    LayerNorm, and drops the CLS token (`vision_feature_select_strategy="default"`)."""

    def __init__(self, vision_config: VisionConfig, vision_feature_layer: int, vision_feature_select_strategy: str):
        super().__init__()
        if vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {FEATURE_SELECT_STRATEGIES}, "
                             f"not {vision_feature_select_strategy!r}")
        num_vision_layers = vision_config.num_hidden_layers
        if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, not {vision_feature_layer!r}")
        if not -(num_vision_layers + 1) <= vision_feature_layer <= num_vision_layers:
            raise ValueError(f"vision_feature_layer {vision_feature_layer} does not exist in a tower of "
                             f"{num_vision_layers} layers (0 = embeddings, -1 = last layer)")
        self.vision_config = vision_config  # the tower's own: a resolution change shows in num_image_tokens
        self.feature_layer = vision_feature_layer % (num_vision_layers + 1)
        self.keep_class_token = vision_feature_select_strategy == "full"

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches + self.keep_class_token

    @property
    def num_vision_layers_used(self) -> int:
        """How many ViT blocks must run: the tower stops at the layer the connector reads."""
        return self.feature_layer

    def select_features(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the tower's output, one (B, 1 + patches, width) tensor per layer.
        Returns (B, num_image_tokens, width)."""
        features = hidden_states[self.feature_layer]
        return features if self.keep_class_token else features[:, 1:]

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """(B, num_image_tokens, text width)."""
        return self.project(self.select_features(hidden_states))

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearProjector(Connector):
    """LLaVA's connector (eq. 3.1): one linear map per patch feature."""

    def __init__(self, vision_config: VisionConfig, text_width: int, **selection):
        super().__init__(vision_config, **selection)
        self.linear_1 = nn.Linear(vision_config.hidden_size, text_width)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


class MLPProjector(Connector):
    """LLaVA-1.5's connector (section 4.3): linear_1 -> GELU -> linear_2, applied per patch."""

    def __init__(self, vision_config: VisionConfig, text_width: int, **selection):
        super().__init__(vision_config, **selection)
        self.linear_1 = nn.Linear(vision_config.hidden_size, text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_width, text_width)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


CONNECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLPProjector}


def build_connector(projector_type: str, vision_config: VisionConfig, text_width: int, vision_feature_layer: int,
                    vision_feature_select_strategy: str) -> Connector:
    """The connector named by `projector_type` (LLaVA's `mm_projector_type`), reading the tower
    of `vision_config` as the two feature options say."""
    if projector_type not in CONNECTORS:
        raise ValueError(f"unknown projector_type {projector_type!r}; known: {sorted(CONNECTORS)}")
    return CONNECTORS[projector_type](vision_config, text_width, vision_feature_layer=vision_feature_layer,
                                      vision_feature_select_strategy=vision_feature_select_strategy)
