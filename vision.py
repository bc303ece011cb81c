"""Vision: the attention every model here shares, the CLIP ViT, and the CLIP text tower.

Reading order of nanoMLLM follows one image from pixels to logits: vision.py (this file: pixels
-> patch features), connectors.py (patch features -> LLM-width tokens), model.py (tokens ->
logits). The one attention implementation of the codebase lives at the top of this file because
it is the first thing an image meets; the LLM, the Q-Former and the resampler import it from here.

Contents, top to bottom:
- `Attention` and `TransformerBlock`: the one pre-LN block family (CLIP's encoder layer, both
  towers; causal for text).
- `VisionTransformer`: CLIP ViT-L/14 (LLaVA, dissertation section 3.4) and ViT-L/14-336
  (LLaVA-1.5, section 4.3). It returns the hidden states of every layer: LLaVA takes the
  penultimate one ("the grid features before the last Transformer layer", section 3.4; the
  section 3.5 ablation finds the last layer 0.96 points worse on ScienceQA), LION several.
- `TextTransformer` and `CLIPModel`: the CLIP text tower and the contrastive dual encoder
  (Radford et al. 2021, section 2.3 and Figure 3), used to pretrain the shapes world's CLIP and
  by REACT (dissertation chapter 2, eq. 2.4-2.6, which reduce to CLIP's loss for one-to-one pairs).
- Checkpoint input/output shared with model.py: safetensors reading (single or sharded) and
  atomic writing, strict loading that names every bad key, and the CLIP key table.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half convention of LLaMA / Vicuna: the two halves
    of each head, not interleaved pairs (REFERENCE.md section 1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention, with the options the papers need.

    - self-attention (`context=None`) or cross-attention (keys and values from `context`, whose
      width is `context_dim`): Q-Former, resampler, LION's vision aggregator;
    - grouped-query attention (`num_key_value_heads < num_heads`): LLaMA-family LLMs;
    - biases on/off (CLIP has them, LLaMA has none, EVA has q and v biases but no k bias);
    - rotary embedding, given as (cos, sin) by the caller, applied to queries and keys;
    - a KV cache: any object with `update(k, v) -> (k, v)` that stores this step's keys/values
      and returns all of them (model.py's KVCache).
    Projections are always named q_proj / k_proj / v_proj / o_proj; each checkpoint format's
    key-mapping table translates its own names to these.
    """

    def __init__(self, dim: int, num_heads: int, num_key_value_heads: int | None = None,
                 context_dim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, key_bias: bool | None = None, out_bias: bool | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, self.num_key_value_heads * self.head_dim,
                                bias=bias if key_bias is None else key_bias)
        self.v_proj = nn.Linear(context_dim, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None) -> torch.Tensor:
        """x: (batch, length, dim); context: (batch, context_length, context_dim) or None.
        attn_mask: boolean (True = may attend) or additive float, broadcastable to
        (batch, heads, length, key_length)."""
        batch, length, _ = x.shape
        source = x if context is None else context
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(source).view(batch, source.shape[1], self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(batch, source.shape[1], self.num_key_value_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
            enable_gqa=self.num_key_value_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------------------------
# The transformer block shared by both CLIP towers


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x): the OpenAI checkpoints were
    trained with it, so exact GELU would change their features."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class MLP(nn.Module):
    """The feed-forward half of a block: fc2(activation(fc1(x)))."""

    def __init__(self, width: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TransformerBlock(nn.Module):
    """A pre-LN transformer block, x + attn(ln1(x)) then x + mlp(ln2(x)): CLIP's encoder layer in
    both towers (Radford et al. 2021, section 2.4), bidirectional for images, causal for text.
    Submodule names (self_attn, layer_norm1, mlp.fc1/fc2, layer_norm2) are transformers' CLIP
    names, so checkpoints map 1:1 except `self_attn.out_proj` -> `self_attn.o_proj`."""

    def __init__(self, width: int, num_heads: int, intermediate_size: int,
                 activation: str = "quick_gelu", layer_norm_eps: float = 1e-5, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.self_attn = Attention(width, num_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, intermediate_size, activation)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, length, width). attn_mask: boolean (True = may attend), broadcastable to
        (batch, heads, length, length). A causal block applies causality itself only when no mask
        is given; a caller passing a mask builds it causal (TextTransformer does, once per batch)."""
        x = x + self.self_attn(self.layer_norm1(x), attn_mask=attn_mask, is_causal=self.causal)
        return x + self.mlp(self.layer_norm2(x))


def initialize_blocks(blocks: nn.ModuleList, width: int) -> None:
    """OpenAI CLIP's initialization of a stack of blocks (its `initialize_parameters`): weights
    normal with std shrinking with width and depth so the residual stream stays O(1), biases 0.
    Only matters when training from scratch (the shapes world's CLIP, REACT's new blocks)."""
    attention_std = width ** -0.5
    residual_projection_std = attention_std * (2 * len(blocks)) ** -0.5
    for block in blocks:
        attention, mlp = block.self_attn, block.mlp
        for linear, std in ((attention.q_proj, attention_std), (attention.k_proj, attention_std),
                            (attention.v_proj, attention_std), (attention.o_proj, residual_projection_std),
                            (mlp.fc1, (2 * width) ** -0.5), (mlp.fc2, residual_projection_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


class JsonConfig:
    """A config dataclass that round-trips through a transformers config.json: field names are
    transformers', `to_dict` adds `model_type`, `from_dict` keeps only the declared fields
    (config.json also carries bookkeeping such as architectures, dtype, initializer_range).
    model.py's configs reuse it."""

    model_type: ClassVar[str]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **asdict(self)}


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

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2021, eq. 1): non-overlapping patches through a conv without
    bias, a learned class token prepended, a learned position embedding added."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """The CLIP image encoder: embeddings -> pre_layrnorm (CLIP's extra LayerNorm on the embedded
    patches; the misspelling is CLIP's key name) -> pre-LN blocks. `post_layernorm` only normalizes
    the pooled class token (`pool`); LLaVA's patch features skip it (REFERENCE.md section 1)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            TransformerBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                             config.hidden_act, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """pixel_values: (batch, channels, image_size, image_size). Returns the hidden states of
        every layer, num_hidden_layers + 1 tensors of shape (batch, 1 + num_patches, hidden_size):
        [0] is the output of pre_layrnorm, [i] the output of block i, so [-2] is LLaVA-1.5's.
        `num_layers` runs only the first blocks (num_layers + 1 states): LLaVA-1.5 reads layer -2,
        so the last block would be computed for nothing."""
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
        """Load a transformers CLIPVisionModel or CLIPModel checkpoint directory: dims from
        config.json (its `vision_config` when it holds a full CLIP), weights from the keys under
        `vision_model.` (CLIPModel, hub CLIPVisionModel checkpoints) or at the root (what
        transformers 5 writes for a CLIPVisionModel)."""
        values = read_config_json(path)
        model = cls(VisionConfig.from_dict(values.get("vision_config", values)))
        state = load_safetensors(path)
        if any(key.startswith("vision_model.") for key in state):
            state = {key.removeprefix("vision_model."): value for key, value in state.items()
                     if key.startswith("vision_model.")}
        load_state_strict(model, clip_state_to_ours(state), str(path))
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
            TransformerBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                             config.hidden_act, config.layer_norm_eps, causal=True)
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
            hidden = block(hidden, attn_mask=mask)
        hidden = self.final_layer_norm(hidden)
        return hidden, hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eos_positions(input_ids)]

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each text is pooled, by transformers' rule: the first `eos_token_id`; but configs
        written before transformers PR #24773 (e.g. openai/clip-vit-large-patch14) say
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


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """The bidirectional contrastive loss of REACT (llava-dissertation eq. 2.4-2.6) over a
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
    `text_model.*`, `visual_projection`, `text_projection`, `logit_scale`) via `CLIP_KEY_RENAMES`."""

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
        features (Zhong et al. 2022; the REACT pipeline of llava-dissertation Table 2.4) on a ViT.
        Each region pools the last layer's patch tokens of image `image_index` whose centers lie in
        its box (fractions of the image, xyxy), plus the patch under the box center, so a box
        smaller than a patch still has one; then, like the class token, post_layernorm and
        visual_projection."""
        grid = self.config.vision_config.image_size // self.config.vision_config.patch_size
        centers = (torch.arange(grid, device=boxes.device) + 0.5) / grid

        def cells_inside(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # (regions, grid) bool
            center_cell = ((low + high) / 2 * grid).long().clamp(0, grid - 1)
            return (centers >= low[:, None]) & (centers < high[:, None]) | F.one_hot(center_cell, grid).bool()

        inside = cells_inside(boxes[:, 1], boxes[:, 3])[:, :, None] & cells_inside(boxes[:, 0], boxes[:, 2])[:, None, :]
        weights = inside.flatten(1).to(last_hidden_state.dtype)
        weights = weights / weights.sum(1, keepdim=True)
        pooled = torch.bmm(weights[:, None, :], last_hidden_state[image_index, 1:])[:, 0]
        return self.visual_projection(self.vision_model.post_layernorm(pooled))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, return_loss: bool = True,
                regions: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits_per_image (images, texts), contrastive loss or None).

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
        loss = contrastive_loss(logits_per_image)
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
        save_safetensors(our_state_to_clip(self.state_dict()), Path(path) / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CLIPModel:
        """Load a CLIPModel checkpoint directory written here or by transformers."""
        values = read_config_json(path)
        if "vision_config" not in values or "text_config" not in values:
            raise ValueError(f"{Path(path) / 'config.json'} is not a CLIPModel config "
                             f"(needs vision_config and text_config; model_type {values.get('model_type')!r})")
        model = cls(CLIPConfig.from_dict(values))
        load_state_strict(model, clip_state_to_ours(load_safetensors(path)), str(path))
        return model


# ----------------------------------------------------------------------------------------------
# Checkpoint input/output, shared with model.py: one reader, one writer, one strict loader.

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# transformers' CLIP names -> ours: the one difference between the layouts (our Attention names
# its output projection o_proj everywhere). Applied as substring renames, so any prefix works
# (`vision_model.`, llava-hf's `vision_tower.vision_model.`).
CLIP_KEY_RENAMES: tuple[tuple[str, str], ...] = (("self_attn.out_proj.", "self_attn.o_proj."),)
# Keys that hold no weights: older transformers saved the arange position ids buffer.
CLIP_IGNORED_KEY_SUFFIXES: tuple[str, ...] = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


def clip_state_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict from transformers' CLIP names to ours, dropping weightless buffers."""
    renamed = {}
    for key, value in state.items():
        if key.endswith(CLIP_IGNORED_KEY_SUFFIXES):
            continue
        for theirs, ours in CLIP_KEY_RENAMES:
            key = key.replace(theirs, ours)
        renamed[key] = value
    return renamed


def our_state_to_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict from our names to transformers' CLIP names."""
    renamed = {}
    for key, value in state.items():
        for theirs, ours in CLIP_KEY_RENAMES:
            key = key.replace(ours, theirs)
        renamed[key] = value
    return renamed


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint directory, with an error naming the file if absent or broken."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a checkpoint directory needs a config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error


def write_config_json(config: dict[str, Any], directory: str | Path) -> None:
    """Write directory/config.json (creating the directory) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{CONFIG_NAME}.tmp"
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, directory / CONFIG_NAME)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint on the CPU. `path` is a .safetensors file, or a directory
    holding model.safetensors.index.json (sharded: its `weight_map` names each key's file) or
    model.safetensors."""
    path = Path(path)
    if path.is_file():
        return safetensors.torch.load_file(path)
    index_path, single_path = path / WEIGHTS_INDEX_NAME, path / WEIGHTS_NAME
    if index_path.is_file():
        try:
            shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise ValueError(f"{index_path} is not a safetensors index (needs a weight_map): {error!r}") from error
        state = {}
        for shard_name in shard_names:
            if not (path / shard_name).is_file():
                raise FileNotFoundError(f"{path / shard_name} is listed in {index_path} but does not exist")
            state.update(safetensors.torch.load_file(path / shard_name))
        return state
    if single_path.is_file():
        return safetensors.torch.load_file(single_path)
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} found")


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write one .safetensors file atomically (a temporary file renamed into place, so a crash
    never leaves a truncated checkpoint), with the {"format": "pt"} metadata transformers expects.
    Tensors sharing memory (tied weights) must be dropped by the caller; safetensors refuses them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file({key: value.detach().contiguous() for key, value in state.items()},
                                temporary, metadata={"format": "pt"})
    os.replace(temporary, path)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module` (casting to the module's dtypes), or raise CheckpointError naming
    every missing key, unexpected key and shape mismatch at once; never a partial load."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
                  for key in sorted(expected.keys() & state.keys()) if state[key].shape != expected[key].shape]
    problems = [(f"missing keys ({len(missing)})", missing), (f"unexpected keys ({len(unexpected)})", unexpected),
                (f"shape mismatches ({len(mismatched)})", mismatched)]
    if missing or unexpected or mismatched:
        report = "\n".join(f"  {title}:\n" + "\n".join(f"    {line}" for line in lines)
                           for title, lines in problems if lines)
        raise CheckpointError(f"{source} does not fit {type(module).__name__}:\n{report}")
    module.load_state_dict(state, strict=True)
