"""Vision towers: the CLIP ViT, and the CLIP text tower that trains it contrastively.

Reading order of nanoMLLM follows one image from pixels to logits: vision.py (this file: pixels
-> the hidden states of every ViT layer), connectors.py (select a layer, project to the LLM's
width), model.py (the tokens in the LLM's input -> logits). The pieces (attention, blocks) are
layers.py's; checkpoint key names are checkpoints.py's tables.

Contents, top to bottom:
- `VisionTransformer`: CLIP ViT-L/14 (LLaVA, dissertation section 3.4) and ViT-L/14-336
  (LLaVA-1.5, section 4.3). It returns the hidden states of every layer: LLaVA takes the
  penultimate one ("the grid features before the last Transformer layer", section 3.4; the
  section 3.5 ablation finds the last layer 0.96 points worse on ScienceQA), LION several.
- `TextTransformer` and `CLIPModel`: the CLIP text tower and the contrastive dual encoder
  (Radford et al. 2021, section 2.3 and Figure 3), used to pretrain the shapes world's CLIP and
  by REACT (dissertation chapter 2, eq. 2.4-2.6, which reduce to CLIP's loss for one-to-one pairs).
- Image preprocessing, as the towers' transformers image processors compute it: CLIP's resize
  and center crop, LLaVA-1.5's pad to square (section 4.3), LLaVA-NeXT's AnyRes tiles (section
  4.5), and the box geometry of the square the tower sees.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoints import (CLIP_LAYOUT, CONFIG_NAME, OPENCLIP_LAYOUT, WEIGHTS_NAME, JsonConfig, clip_tower_rules,
                         eva_tower_rules, load_safetensors, load_state_strict, openclip_config, read_config_json,
                         save_safetensors, state_to_ours, state_to_theirs, write_config_json)
from layers import Attention, FeedForward, PreNormBlock, initialize_blocks


def clip_block(width: int, num_heads: int, intermediate_size: int, activation: str,
               layer_norm_eps: float, key_bias: bool = True, residual_gates: bool = False) -> PreNormBlock:
    """CLIP's encoder layer in both towers (Radford et al. 2021, section 2.4): a pre-LN block with
    biased attention, LayerNorms and a plain feed-forward (quick_gelu in the OpenAI checkpoints).
    EVA's blocks are the same with no key bias (`key_bias=False`) and exact GELU; REACT's gated
    blocks the same with tanh-gated residuals (`residual_gates`)."""
    return PreNormBlock(Attention(width, num_heads, key_bias=key_bias), FeedForward(width, intermediate_size, activation),
                        nn.LayerNorm(width, eps=layer_norm_eps), nn.LayerNorm(width, eps=layer_norm_eps),
                        residual_gates=residual_gates)


# ----------------------------------------------------------------------------------------------
# CLIP ViT


@dataclass
class VisionConfig(JsonConfig):
    """CLIP ViT hyperparameters; defaults are ViT-L/14-336 (LLaVA-1.5). Field names are
    transformers' CLIPVisionConfig's, so config.json maps 1:1."""

    model_type: ClassVar[str] = "clip_vision_model"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # REACT (dissertation section 2.3): the last this many blocks each have a gated block run
    # before them (`add_gated_blocks`). Our key; transformers' CLIPVisionConfig ignores it.
    num_gated_layers: int = 0

    # Where CLIP and EVA differ; class-level, since config.json names the kind by model_type.
    pre_layernorm: ClassVar[bool] = True   # CLIP normalizes the embedded patches, EVA does not
    patch_bias: ClassVar[bool] = False     # EVA's patch convolution has a bias, CLIP's none
    key_bias: ClassVar[bool] = True        # EVA has q and v biases only

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class EVAVisionConfig(VisionConfig):
    """EVA ViT-g/14 as BLIP-2 builds it (Li et al. 2023, "BLIP-2", section 3.3: "we remove the
    last layer of the ViT and use the second last layer's output features"): EVA-CLIP-g's 40 blocks
    minus the last = 39, width 1408, 16 heads, FFN 6144, exact GELU, LayerNorm eps 1e-6, q and v
    biases with none on k, a biased patch convolution, no LayerNorm before the blocks and none of
    its own after them. Field names and defaults are transformers' Blip2VisionConfig's."""

    model_type: ClassVar[str] = "blip_2_vision_model"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True  # transformers' name for "q and v biases"; EVA without them is not supported

    pre_layernorm: ClassVar[bool] = False
    patch_bias: ClassVar[bool] = True
    key_bias: ClassVar[bool] = False

    def __post_init__(self):
        if not self.qkv_bias:
            raise ValueError("EVA vision config: qkv_bias=False is not supported (BLIP-2's ViT-g has q and v biases)")


def vision_config_from_dict(values: dict[str, Any]) -> VisionConfig:
    """A tower's config from its config.json dict: EVA for BLIP-2 / InstructBLIP's vision
    model_types, CLIP otherwise."""
    eva = values.get("model_type") in ("blip_2_vision_model", "instructblip_vision_model")
    return (EVAVisionConfig if eva else VisionConfig).from_dict(values)


class VisionEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2021, eq. 1): non-overlapping patches through a conv without
    bias, a learned class token prepended, a learned position embedding added."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=config.patch_bias)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """The ViT image encoder, CLIP's or EVA's (the config says which): embeddings -> pre_layrnorm
    (CLIP's extra LayerNorm on the embedded patches; the misspelling is CLIP's key name; EVA has
    none) -> pre-LN blocks. `post_layernorm` normalizes CLIP's pooled class token (`pool`); LLaVA's
    patch features skip it (LLaVA's `CLIPVisionTower.feature_select`), while BLIP-2 applies it to
    every token of the last layer (its `ln_vision`, `normalize_last`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm
                             else nn.Identity())
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            clip_block(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                       config.hidden_act, config.layer_norm_eps, key_bias=config.key_bias)
            for _ in range(config.num_hidden_layers))})
        # LAVIS's ln_vision is an nn.LayerNorm with eps 1e-5; transformers' port (the layout the
        # checkpoints here come in) uses the tower's 1e-6, and so do we.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.add_gated_blocks(config.num_gated_layers)

    def add_gated_blocks(self, num_layers: int) -> None:
        """REACT's modularized image encoder (dissertation section 2.3, Figure 2.3(d); its code
        `react_cfg.last_k_layers`, 6 for ViT-B and ViT-L): a gated self-attention-dense block
        before each of the last `num_layers` blocks, trained from scratch while the rest stays
        frozen. Gates start at 0, so the tower's outputs do not change until training moves them.
        A tower that has them already (a REACT checkpoint) keeps its own."""
        layers = self.encoder["layers"]
        if not 0 <= num_layers <= len(layers):
            raise ValueError(f"num_gated_layers {num_layers}: the tower has {len(layers)} blocks")
        have = sum(block.gated_block is not None for block in layers)
        if have and have != num_layers:
            raise ValueError(f"the tower has gated blocks before its last {have} blocks; asked for {num_layers}")
        if have or not num_layers:
            return
        config = self.config
        gated = nn.ModuleList(clip_block(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                                         config.hidden_act, config.layer_norm_eps, key_bias=config.key_bias,
                                         residual_gates=True) for _ in range(num_layers))
        initialize_blocks(gated, config.hidden_size)
        for block, gated_block in zip(layers[-num_layers:], gated):
            block.gated_block = gated_block.to(block.input_layernorm.weight)  # its device and dtype
        config.num_gated_layers = num_layers

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None,
                normalize_last: bool = False) -> list[torch.Tensor]:
        """pixel_values: (batch, channels, image_size, image_size). Returns the hidden states of
        every layer, num_hidden_layers + 1 tensors of shape (batch, 1 + num_patches, hidden_size):
        [0] is the output of pre_layrnorm, [i] the output of block i, so [-2] is LLaVA-1.5's.
        `num_layers` runs only the first blocks (num_layers + 1 states): LLaVA-1.5 reads layer -2,
        so the last block would be computed for nothing. `normalize_last`: the last state returned
        goes through post_layernorm (BLIP-2's ln_vision on the Q-Former's input)."""
        height, width = pixel_values.shape[-2:]
        if height != self.config.image_size or width != self.config.image_size:
            raise ValueError(f"images are {height}x{width} but the vision tower expects "
                             f"{self.config.image_size}x{self.config.image_size} "
                             f"(interpolate_position_embedding changes the resolution)")
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden_states = [hidden]
        for block in self.encoder["layers"][:num_layers]:
            hidden = block(hidden)
            hidden_states.append(hidden)
        if normalize_last:
            hidden_states[-1] = self.post_layernorm(hidden_states[-1])
        return hidden_states

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """CLIP's image representation: the class token of the last layer, after post_layernorm."""
        return self.post_layernorm(last_hidden_state[:, 0])

    def interpolate_position_embedding(self, image_size: int) -> None:
        """Resize the learned position grid for another input resolution (Lynx's 420 px, say), in
        place: bicubic over the 2-D patch grid (ViT's fine-tuning recipe, Dosovitskiy et al. 2021,
        section 3.2; transformers' `interpolate_pos_encoding`), class position kept as is. Updates
        `config.image_size` too, so a saved checkpoint and `num_patches` describe the new size."""
        patch_size = self.config.patch_size
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        old = self.embeddings.position_embedding.weight
        old_grid = math.isqrt(old.shape[0] - 1)
        new_grid = image_size // patch_size
        patch_grid = old[1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
        patch_grid = F.interpolate(patch_grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        patch_positions = patch_grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(old.dtype)
        self.embeddings.position_embedding = nn.Embedding.from_pretrained(
            torch.cat([old[:1], patch_positions]).detach(), freeze=not old.requires_grad)
        self.config.image_size = image_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VisionTransformer:
        """Load the tower of a checkpoint directory: a transformers CLIPVisionModel or CLIPModel
        (weights under `vision_model.`, or at the root as transformers 5 writes a CLIPVisionModel),
        or the EVA ViT-g of a BLIP-2 / InstructBLIP checkpoint (its `vision_model.*`). Dims from
        config.json, its `vision_config` when the checkpoint holds more than the tower."""
        values = read_config_json(path)
        config = vision_config_from_dict(values.get("vision_config", values))
        model = cls(config)
        state = load_safetensors(path)
        within = any(key.startswith("vision_model.") for key in state)
        if within:  # a whole model: its vision tower only
            state = {key: value for key, value in state.items() if key.startswith("vision_model.")}
        rules = eva_tower_rules if isinstance(config, EVAVisionConfig) else clip_tower_rules
        load_state_strict(model, state_to_ours(state, rules("vision_model." if within else "", "")), str(path))
        return model


# ----------------------------------------------------------------------------------------------
# CLIP text tower and the contrastive dual encoder


@dataclass
class CLIPTextConfig(JsonConfig):
    """CLIP text transformer hyperparameters; field names and defaults are transformers'
    CLIPTextConfig's."""

    model_type: ClassVar[str] = "clip_text_model"
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    pad_token_id: int = 1
    bos_token_id: int = 49406


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"text of {length} tokens is longer than max_position_embeddings "
                             f"{self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class TextTransformer(nn.Module):
    """CLIP's text encoder (Radford et al. 2021, section 2.4): a causal transformer whose
    representation of a text is the final-LayerNorm'd activation at its EOS token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            clip_block(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                       config.hidden_act, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers))})
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids: (batch, length); attention_mask: (batch, length), 1 = token, 0 = padding.
        Returns (last_hidden_state (batch, length, width), pooled (batch, width))."""
        hidden = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            length = input_ids.shape[1]
            eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            # With left padding a padded query sees no key at all; some attention backends return
            # NaN for such a row, and 0 * NaN then leaks into every real position in the next
            # layer. Letting each position see itself keeps padded rows finite, real rows unchanged.
            mask = (causal & attention_mask.bool()[:, None, None, :]) | eye
        for block in self.encoder["layers"]:
            hidden = block(hidden, attn_mask=mask, is_causal=mask is None)
        hidden = self.final_layer_norm(hidden)
        return hidden, hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eos_positions(input_ids)]

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each text is pooled, by transformers' rule: the first `eos_token_id`; but configs
        written before transformers fixed that rule (e.g. openai/clip-vit-large-patch14) say
        eos_token_id 2 and pool at the highest token id, which is EOS in CLIP's own vocabulary."""
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == self.config.eos_token_id
        rows_without_eos = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
        if rows_without_eos:
            raise ValueError(f"text rows {rows_without_eos} hold no eos_token_id "
                             f"{self.config.eos_token_id}; CLIP pools each text at its EOS token")
        return is_eos.int().argmax(dim=-1)


@dataclass
class CLIPConfig(JsonConfig):
    """Both towers plus the joint embedding; config.json in transformers' CLIPConfig layout."""

    model_type: ClassVar[str] = "clip"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CLIPConfig:
        return cls(vision_config=VisionConfig.from_dict(values.get("vision_config", {})),
                   text_config=CLIPTextConfig.from_dict(values.get("text_config", {})),
                   **{key: values[key] for key in ("projection_dim", "logit_scale_init_value") if key in values})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "architectures": ["CLIPModel"],
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init_value,
                "vision_config": self.vision_config.to_dict(), "text_config": self.text_config.to_dict()}


def pool_regions(hidden_state: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """(regions, width): the mean of the patch tokens of image `image_index` (rows of
    `hidden_state`, (images, 1 + grid * grid, width), class token first) whose centers lie in each
    box (fractions of the square the tower sees, xyxy), plus the patch under the box's center,
    so a box smaller than a patch still has one. The region features of the CLIP region loss
    (RegionCLIP-style) and of the shapes world's oracle visual refiner (Lyrics' local features)."""
    grid = math.isqrt(hidden_state.shape[1] - 1)
    centers = (torch.arange(grid, device=boxes.device) + 0.5) / grid

    def cells_inside(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # (regions, grid) bool
        center_cell = ((low + high) / 2 * grid).long().clamp(0, grid - 1)
        return (centers >= low[:, None]) & (centers < high[:, None]) | F.one_hot(center_cell, grid).bool()

    inside = cells_inside(boxes[:, 1], boxes[:, 3])[:, :, None] & cells_inside(boxes[:, 0], boxes[:, 2])[:, None, :]
    weights = inside.flatten(1).to(hidden_state.dtype)
    weights = weights / weights.sum(1, keepdim=True)
    return torch.bmm(weights[:, None, :], hidden_state[image_index, 1:])[:, 0]


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """The bidirectional contrastive loss of REACT (dissertation eq. 2.4-2.6) over a
    (queries, keys) logit matrix: each query's -log softmax over the keys, averaged over its
    positive keys (eq. 2.5), and each key's over the queries, averaged over its positive queries
    (eq. 2.6). `positives` (queries, keys) marks the pairs; None means the i-th query matches the
    i-th key only, CLIP's loss (Radford et al. 2021, Figure 3), to which eq. 2.4 reduces. The two
    directions are averaged, as CLIP does, where eq. 2.4 adds them."""
    if positives is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    positives = positives.float()
    query_to_key = -(logits.log_softmax(1) * positives).sum(1) / positives.sum(1)
    key_to_query = -(logits.log_softmax(0) * positives).sum(0) / positives.sum(0)
    return (query_to_key.mean() + key_to_query.mean()) / 2


class CLIPModel(nn.Module):
    """CLIP (Radford et al. 2021): image and text towers, linear projections (no bias) into a
    joint space, cosine similarities scaled by a learned temperature exp(logit_scale), initialized
    to 1/0.07 (section 2.5). Parameter names are transformers' CLIPModel's (`vision_model.*`,
    `text_model.*`, `visual_projection`, `text_projection`, `logit_scale`) via checkpoints.CLIP_LAYOUT."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision_model = VisionTransformer(config.vision_config)
        self.text_model = TextTransformer(config.text_config)
        self.visual_projection = nn.Linear(vision_width, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """OpenAI CLIP's initialization, for training from scratch (stage 0a of the shapes world)."""
        vision_width, text_width = self.config.vision_config.hidden_size, self.config.text_config.hidden_size
        embeddings = self.vision_model.embeddings
        nn.init.normal_(embeddings.class_embedding, std=vision_width ** -0.5)
        nn.init.normal_(embeddings.position_embedding.weight, std=vision_width ** -0.5)
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)
        initialize_blocks(self.vision_model.encoder["layers"], vision_width)
        initialize_blocks(self.text_model.encoder["layers"], text_width)
        nn.init.normal_(self.visual_projection.weight, std=vision_width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=text_width ** -0.5)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, projection_dim) image embeddings, not normalized (transformers' get_image_features)."""
        return self.visual_projection(self.vision_model.pool(self.vision_model(pixel_values)[-1]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, projection_dim) text embeddings, not normalized (transformers' get_text_features)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def encode_regions(self, last_hidden_state: torch.Tensor, boxes: torch.Tensor,
                       image_index: torch.Tensor) -> torch.Tensor:
        """(regions, projection_dim) region embeddings, not normalized: RegionCLIP's region
        features (Zhong et al. 2022; the REACT pipeline of dissertation Table 2.4) on a ViT.
        Each region pools the last layer's patch tokens inside its box (`pool_regions`); then, like
        the class token, post_layernorm and visual_projection."""
        pooled = pool_regions(last_hidden_state, boxes, image_index)
        return self.visual_projection(self.vision_model.post_layernorm(pooled))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, return_loss: bool = True,
                regions: dict[str, torch.Tensor] | None = None,
                positive_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits_per_image (images, texts), contrastive loss or None).

        `positive_threshold` is REACT's gamma (dissertation eq. 2.5-2.6): image i and text k are a
        positive pair when the texts' embeddings agree, v_k . v_i >= gamma (0.9 for classification,
        "to force image-text pairs sharing the similar text to be positive"); None is CLIP's
        one-to-one pairing. Each pair is its own positive whatever gamma, and the comparison allows
        1e-6 of rounding so that gamma = 1 (UniCL) pairs identical texts; their logit columns are
        identical as well, so gamma = 1 gives CLIP's loss exactly (label-based UniCL, where
        different captions share a class, does not).

        `regions` (data.collate_regions: boxes, image_index, and the batch's distinct phrases)
        adds the region-phrase loss: every region against every distinct phrase of the batch,
        positives the regions' own phrases (REACT eq. 2.4-2.6 with gamma = 1, i.e. UniCL). Image
        captions can be told apart by colors and counts alone, so CLIP's loss never needs an
        object's shape; "small red circle" against "small red star" does (README, shapes world)."""
        last_hidden_state = self.vision_model(pixel_values)[-1]
        image_embeds = F.normalize(self.visual_projection(self.vision_model.pool(last_hidden_state)), dim=-1)
        text_embeds = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.t()
        if not return_loss:
            return logits_per_image, None
        positives = None
        if positive_threshold is not None:
            with torch.no_grad():
                agreement = text_embeds @ text_embeds.t()
                positives = (agreement >= positive_threshold - 1e-6) | torch.eye(
                    len(agreement), dtype=torch.bool, device=agreement.device)
        loss = contrastive_loss(logits_per_image, positives)
        if regions is not None:
            region_embeds = F.normalize(self.encode_regions(last_hidden_state, regions["boxes"],
                                                            regions["image_index"]), dim=-1)
            phrase_embeds = F.normalize(self.encode_text(regions["phrase_ids"], regions["phrase_mask"]), dim=-1)
            region_logits = self.logit_scale.exp() * region_embeds @ phrase_embeds.t()
            loss = loss + contrastive_loss(region_logits, F.one_hot(regions["phrase_index"], len(phrase_embeds)))
        return logits_per_image, loss

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors as transformers' CLIPModel.save_pretrained does."""
        write_config_json(self.config.to_dict(), path)
        save_safetensors(state_to_theirs(self.state_dict(), CLIP_LAYOUT), Path(path) / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path, hidden_act: str = "quick_gelu") -> CLIPModel:
        """Load a CLIPModel checkpoint directory written here or by transformers, or an OpenCLIP /
        REACT release converted by `checkpoints.py convert` (no config.json; dims read off its
        shapes by checkpoints.openclip_config, whose `hidden_act` is the activation it was
        trained with: quick_gelu for OpenAI's and REACT's weights, gelu for OpenCLIP's LAION ones)."""
        if not (Path(path) / CONFIG_NAME).is_file():
            state = load_safetensors(path)
            if "visual.conv1.weight" in state:
                model = cls(CLIPConfig.from_dict(openclip_config(state, hidden_act)))
                load_state_strict(model, state_to_ours(state, OPENCLIP_LAYOUT), str(path))
                return model
        values = read_config_json(path)
        if "vision_config" not in values or "text_config" not in values:
            raise ValueError(f"{Path(path) / 'config.json'} is not a CLIPModel config "
                             f"(needs vision_config and text_config; model_type {values.get('model_type')!r})")
        model = cls(CLIPConfig.from_dict(values))
        load_state_strict(model, state_to_ours(load_safetensors(path), CLIP_LAYOUT), str(path))
        return model


# ----------------------------------------------------------------------------------------------
# Image preprocessing: the pixels the tower sees, and where a box of the image lands in them

# OpenAI CLIP's normalization (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-1.5 pads with the mean color: tuple(int(x * 255) for x in image_mean) = (122, 116, 104).
CLIP_BACKGROUND = tuple(int(channel_mean * 255) for channel_mean in CLIP_MEAN)


def expand2square(image: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pads to a square with `background_color`, the image centered (LLaVA-1.5
    `image_aspect_ratio=pad`, `expand2square` in llava/train/train.py): the whole image reaches
    the encoder instead of its center crop."""
    width, height = image.size
    if width == height:
        return image
    side, left, top = padded_square(width, height)
    square = Image.new(image.mode, (side, side), background_color)
    square.paste(image, (left, top))
    return square


def padded_square(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of the square `expand2square` pads a width x height image to, and where
    the image sits in it. The image and every box on it are placed with these same integer
    offsets, so a box drawn on the padded image lands on its object."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def padded_square_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """A pixel box (x0, y0, x1, y1) of a width x height image as [0, 1] fractions of its padded
    square: the box text LLaVA-1.5's REC / REG data write, and what the tower sees with `pad`."""
    side, left, top = padded_square(width, height)
    return [(box[0] + left) / side, (box[1] + top) / side, (box[2] + left) / side, (box[3] + top) / side]


def box_from_padded_square(box: Sequence[float], width: int, height: int) -> list[float]:
    """Inverse of `padded_square_box`: [0, 1] fractions of the padded square back to pixels of
    the width x height image (a predicted box may fall partly on the padding)."""
    side, left, top = padded_square(width, height)
    return [box[0] * side - left, box[1] * side - top, box[2] * side - left, box[3] * side - top]


def preprocess_image(image: Image.Image, image_size: int, pad_to_square: bool) -> torch.Tensor:
    """(3, image_size, image_size) float32 pixels, as transformers' CLIPImageProcessor (PIL
    backend) computes them; with `pad_to_square`, as LlavaImageProcessor(do_pad=True) and
    LLaVA-1.5's pad-then-CLIP.

    Steps of transformers 5.23 (image_transforms.get_resize_output_image_size, center_crop):
    shortest side to `image_size` with the long side int(image_size * long / short) (floor),
    PIL bicubic on uint8; center crop at top = (height - size) // 2, left = (width - size) // 2;
    x / 255; (x - mean) / std.
    """
    if pad_to_square:
        image = expand2square(image, CLIP_BACKGROUND)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    new_size = (image_size, new_long) if width <= height else (new_long, image_size)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left, top = (new_size[0] - image_size) // 2, (new_size[1] - image_size) // 2
    return normalized_pixels(image.crop((left, top, left + image_size, top + image_size)))


def normalized_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32: x / 255, then CLIP's (x - mean) / std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def select_best_resolution(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `image_size` (height, width) is resized into: the
    one that keeps most of its pixels after an aspect-preserving resize (never counting more than
    it has), then wastes the fewest (LLaVA-NeXT's `select_best_resolution`; transformers' order)."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for target_height, target_width in grid_pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_height, target_width), effective, wasted
    return best


def high_resolution_tiles(image: Image.Image, tile_size: int, grid_pinpoints: Sequence[Sequence[int]]) -> torch.Tensor:
    """(num_tiles, 3, S, S): LLaVA-NeXT's AnyRes input (`process_anyres_image`), as transformers'
    LlavaNextImageProcessor computes it. The base tile is the whole image squashed to S x S; then
    the image is resized into its best pinpoint keeping its aspect ratio (the long side fills it,
    the other is ceil'd), centered on black, and cut into S x S tiles row by row. PIL bicubic on
    uint8 throughout, as there."""
    size = tile_size
    target_height, target_width = select_best_resolution((image.height, image.width), grid_pinpoints)
    scale_width, scale_height = target_width / image.width, target_height / image.height
    if scale_width < scale_height:
        new_width, new_height = target_width, min(math.ceil(image.height * scale_width), target_height)
    else:
        new_width, new_height = min(math.ceil(image.width * scale_height), target_width), target_height
    canvas = Image.new("RGB", (target_width, target_height))
    canvas.paste(image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC),
                 ((target_width - new_width) // 2, (target_height - new_height) // 2))
    tiles = [canvas.crop((left, top, left + size, top + size))
             for top in range(0, target_height, size) for left in range(0, target_width, size)]
    base = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return torch.stack([normalized_pixels(tile) for tile in [base, *tiles]])


def box_in_view(box: Sequence[float], image_size: tuple[int, int], pad_to_square: bool) -> list[float]:
    """A pixel box (x0, y0, x1, y1) of an image of `image_size` (width, height) as fractions of
    the square `preprocess_image` shows the tower: the padded square (`padded_square_box`), or the
    center crop of the short side (clipped to it)."""
    width, height = image_size
    if pad_to_square:
        return padded_square_box(box, width, height)
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return [min(max((value - offset) / side, 0.0), 1.0) for value, offset in zip(box, (left, top, left, top))]
