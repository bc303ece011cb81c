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

- "qformer", BLIP-2 (Li et al. 2023, sec. 3.1) and InstructBLIP (Dai et al. 2023, sec. 2.2): a
  fixed number of learned queries read the image through cross-attention in a small BERT (the
  Querying Transformer), and a linear layer maps the query outputs to the LLM's width; the LLM sees
  `num_query_tokens` tokens whatever the resolution. InstructBLIP's Q-Former also reads the
  instruction, so the queries extract what the question asks for.
- "lion", LION ("LION: Empowering MLLM with Dual-Level Visual Knowledge", sec. 3.1.3, Fig. 3):
  InstructBLIP's Q-Former beside a vision aggregator, two BERT layers that run over the last
  layer's token grid and cross-attend two earlier layers, so that the fine-grained, spatial
  detail of the middle of the ViT reaches the LLM (region-level tasks: REC, REG); their tokens
  follow the 32 query tokens (`visual_input`).

- High resolution, LLaVA-1.5-HD (section 4.3, Figure 4.2) and LLaVA-NeXT's AnyRes (section 4.5,
  "Dynamic High Resolution"): the image is cut into tiles the encoder's size, each tile goes
  through the tower and the LLaVA connector on its own, and `HighResolution.pack` lays their
  features back into one feature map of the whole image, after the features of a downsized copy
  (the global context). No position-embedding interpolation, any resolution.

- "resampler", Lynx ("What Matters in Training a GPT4-Style Language Model with Multimodal
  Inputs?", sec. 2.1, after Flamingo's Perceiver resampler): learned latents of the LLM's width
  cross-attend the raw last ViT layer in a few pre-LN layers; the LLM reads the latents (32),
  whatever the resolution, so Lynx can raise it to 420 px for free in the LLM.

Module names follow transformers' LlavaMultiModalProjector (`linear_1`, `linear_2`), so the
llava-hf keys `multi_modal_projector.linear_{1,2}.*` load 1:1. transformers has no single-linear
projector; ours keeps the name `linear_1` for it (checkpoints.ORIGINAL_LLAVA_LAYOUT maps LLaVA
v1's `model.mm_projector.*` and LLaVA-1.5's `model.mm_projector.0/2.*` onto these).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from checkpoints import JsonConfig
from layers import Attention, FeedForward, PostNormBlock
from vision import VisionConfig, select_best_resolution

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

    # BLIP-2 normalizes the last layer's tokens (ln_vision) before the Q-Former reads them.
    normalizes_last_layer: ClassVar[bool] = False
    # InstructBLIP's Q-Former reads the instruction too (MLLM's qformer_input_ids).
    takes_instruction = False

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
    """LLaVA-1.5's connector (section 4.3): linear_1 -> GELU -> linear_2, applied per patch.
    The hidden width is the LLM's (LLaVA-1.5), or `hidden_size` (LION's aggregator MLP: 4x the
    ViT's)."""

    def __init__(self, vision_config: VisionConfig, text_width: int, hidden_size: int | None = None, **selection):
        super().__init__(vision_config, **selection)
        self.linear_1 = nn.Linear(vision_config.hidden_size, hidden_size or text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size or text_width, text_width)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


# ----------------------------------------------------------------------------------------------
# High resolution: LLaVA-1.5-HD and LLaVA-NeXT's AnyRes, as a layout of the LLaVA connector's tokens

@dataclass(frozen=True)
class HighResolution:
    """The geometry of one image in tiles, shared by the preprocessing (vision.high_resolution_tiles)
    and the model: an image of (height, width) is resized into its best pinpoint and cut into
    `tile_size` tiles, row by row, after the base tile (the whole image squashed to one tile).

    LLaVA-NeXT (`unpad`, transformers' only merge, "spatial_unpad"): the tiles' features become one
    map, the rows or columns that fell on the letterbox padding are cut, and a learned
    `image_newline` ends every row, so the LLM sees the image's aspect ratio and its token count
    follows the image. LLaVA-1.5-HD (the dissertation's Figure 4.2, LLaVA's "spatial" merge): the
    map as it is. Both put the base tile's tokens first (LLaVA's `prepare_inputs_labels_for_multimodal`)."""
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width), multiples of tile_size
    tile_size: int  # the tower's input side
    patches_per_side: int  # tile_size // patch size: one tile's feature map is this square
    unpad: bool = True

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of (height, width)."""
        height, width = select_best_resolution(image_size, self.grid_pinpoints)
        return height // self.tile_size, width // self.tile_size

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        rows, columns = self.grid(image_size)
        return 1 + rows * columns

    def feature_map_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the tiles' merged feature map, unpadded: the padding is centered, so
        as many rows (or columns) go at each end, floored as LLaVA-NeXT's `unpad_image` (whose float
        order this keeps, so that every size rounds as there)."""
        rows, columns = (count * self.patches_per_side for count in self.grid(image_size))
        if not self.unpad:
            return rows, columns
        height, width = image_size
        if width / height > columns / rows:  # wider than the map: padding above and below
            return rows - 2 * ((rows - int(round(height * (columns / width), 7))) // 2), columns
        return rows, columns - 2 * ((columns - int(round(width * (rows / height), 7))) // 2)

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """How many image tokens an image of (height, width) fills: base tile, map, newlines."""
        rows, columns = self.feature_map_size(image_size)
        return self.patches_per_side ** 2 + rows * (columns + self.unpad)

    def pack(self, tile_features: torch.Tensor, image_size: tuple[int, int],
             image_newline: torch.Tensor | None) -> torch.Tensor:
        """(num_image_tokens, width) from one image's (num_tiles, patches_per_side ** 2, width)."""
        side = self.patches_per_side
        rows, columns = self.grid(image_size)
        grid = tile_features[1:].unflatten(0, (rows, columns)).unflatten(2, (side, side))
        grid = grid.permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)  # (rows * side, columns * side, width)
        map_rows, map_columns = self.feature_map_size(image_size)
        top, left = (rows * side - map_rows) // 2, (columns * side - map_columns) // 2
        grid = grid[top:top + map_rows, left:left + map_columns]
        if self.unpad:
            grid = torch.cat([grid, image_newline.to(grid.dtype).expand(map_rows, 1, -1)], dim=1)
        return torch.cat([tile_features[0], grid.flatten(0, 1)])

    def token_counts(self, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None) -> list[int]:
        """The image tokens each image of a batch fills, from its size."""
        if pixel_values is None:
            return []
        if image_sizes is None or pixel_values.ndim != 5 or image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(f"AnyRes needs pixel_values (images, tiles, 3, H, W) and image_sizes (images, 2); got "
                             f"{tuple(pixel_values.shape)} and {None if image_sizes is None else tuple(image_sizes.shape)}")
        return [self.num_image_tokens(tuple(size)) for size in image_sizes.tolist()]

    def check_tiles(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, owners: list[int]) -> None:
        """Each image's tiles are the ones its size asks for, zero padding tiles after them;
        `owners`: the sample of each image, for the message."""
        has_pixels = pixel_values.flatten(2).any(2)  # (images, tiles); one device sync for the batch below
        last_with_pixels = has_pixels * torch.arange(1, has_pixels.shape[1] + 1, device=has_pixels.device)
        for index, ((height, width), holds) in enumerate(zip(image_sizes.tolist(), last_with_pixels.amax(1).tolist())):
            tiles = self.num_tiles((height, width))
            if holds != tiles:
                raise ValueError(f"sample {owners[index]}, image {index}: image_sizes {height} x {width} (height x "
                                 f"width) yields {tiles} tiles, but pixel_values holds {holds} (then zero padding)")


# ----------------------------------------------------------------------------------------------
# The Q-Former (BLIP-2, sec. 3.1; InstructBLIP, sec. 2.2)


@dataclass
class QFormerConfig(JsonConfig):
    """The Querying Transformer's dimensions: BERT-base (12 layers, 768 wide, 12 heads, FFN 3072,
    LayerNorm eps 1e-12), cross-attention to the image in every `cross_attention_frequency`-th
    layer (BLIP-2 sec. 3.1: "inserted every other transformer block"), keys and values from
    `encoder_hidden_size`-wide image features (EVA ViT-g: 1408). `use_qformer_text_input`: the
    Q-Former reads text (stage 1's text encoder / decoder, InstructBLIP's instruction): word and
    position embeddings and the text feed-forwards exist. Field names are transformers'
    Blip2QFormerConfig's. `detection_encoder_hidden_size` (Lyrics' name; 0 for BLIP-2): the width
    of the visual refiner's object features that the MQ-Former's grounding queries cross-attend."""

    model_type: ClassVar[str] = "blip_2_qformer"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    detection_encoder_hidden_size: int = 0

    def __post_init__(self):
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, not {self.cross_attention_frequency}")


class QFormer(nn.Module):
    """The Q-Former's body: learned queries (given by the caller) and optional text, embedded,
    LayerNorm'd together, then BERT post-LN layers (layers.PostNormBlock) in which the queries
    alone cross-attend to the image. Text positions count from 0 whether or not queries precede
    them: the queries carry no position embedding (InstructBLIP, sec. 2.2, Figure 3)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        if config.use_qformer_text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            PostNormBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                          config.hidden_act, config.layer_norm_eps,
                          context_dim=config.encoder_hidden_size if index % config.cross_attention_frequency == 0
                          else None,
                          query_mlp=True, text_mlp=config.use_qformer_text_input,
                          grounding_context_dim=config.detection_encoder_hidden_size or None)
            for index in range(config.num_hidden_layers))

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word + absolute position embeddings (B, T, width), positions 0..T-1."""
        if not self.config.use_qformer_text_input:
            raise ValueError("this Q-Former reads no text (use_qformer_text_input is false: a BLIP-2 generation "
                             "checkpoint); only stage 1 and InstructBLIP's Q-Formers take text")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"Q-Former text of {length} tokens is longer than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        return self.word_embeddings(input_ids) + self.position_embeddings.weight[:length]

    def forward(self, query_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                caches: list | None = None, num_grounding_queries: int = 0,
                object_features: torch.Tensor | None = None, object_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's states (B, Q + T, width) of Q queries then T text tokens.

        query_embeds: (B, Q, width) or None; input_ids: (B, T) or None; attn_mask: boolean
        (True = may attend), broadcastable to (B, heads, Q + T, keys), one of the masks below;
        image_embeds: (B, N, encoder_hidden_size), needed when there are queries; caches: one
        object per layer for its self-attention's keys and values (QueryKeysValues). The MQ-Former:
        the last `num_grounding_queries` queries read `object_features` (B, N_objects,
        detection_encoder_hidden_size) where `object_mask` (B, N_objects) is True."""
        parts = [query_embeds] if query_embeds is not None else []
        if input_ids is not None:
            parts.append(self.embed_text(input_ids).to(self.layernorm.weight.dtype))
        if not parts:
            raise ValueError("the Q-Former needs queries, text or both")
        x = self.layernorm(torch.cat(parts, dim=1))
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        for index, layer in enumerate(self.layers):
            x = layer(x, attn_mask=attn_mask, context=image_embeds if num_queries else None,
                      num_queries=num_queries, cache=caches[index] if caches is not None else None,
                      num_grounding_queries=num_grounding_queries, grounding_context=object_features,
                      grounding_mask=object_mask)
        return x


def bert_initialization(module: nn.Module) -> None:
    """BERT's initialization (normal, std 0.02; zero biases; LayerNorm 1 and 0), which BLIP-2's
    Q-Former starts from when not from bert-base itself."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# BLIP-2's ITM mask (sec. 3.2, Figure 2 right; pretraining.py has the others), boolean, True = may attend.

def bidirectional_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """ITM's (and InstructBLIP's) mask: every position sees every non-padding position.
    padding_mask: (B, S), 1 = token; returns (B, 1, 1, S)."""
    return padding_mask.bool()[:, None, None, :]


class QFormerConnector(Connector):
    """BLIP-2's connector (sec. 3.1, 3.3): `query_tokens` (num_query_tokens x 768, learned) read
    the LayerNorm'd last layer of the ViT, every token with the class token (`normalizes_last_layer`,
    ln_vision), through the Q-Former; `language_projection` maps the query outputs to the LLM's
    width, and they stand in for the image tokens ("soft visual prompts"). With text input
    (InstructBLIP, sec. 2.2), the instruction's tokens join the queries in self-attention, with a
    bidirectional mask, and only the query outputs go on.

    With `num_grounding_queries` (Lyrics, sec. 3.1 and 3.3: the MQ-Former), that many more
    queries follow the visual ones and read the visual refiner's object features instead of the
    image (`object_features`, `object_mask`, one row per image); the LLM reads all of them, visual
    first, through the one projection. With none it is BLIP-2's connector, to the last bit."""

    normalizes_last_layer = True

    def __init__(self, vision_config: VisionConfig, text_width: int, qformer_config: QFormerConfig,
                 num_query_tokens: int, num_grounding_queries: int = 0):
        if qformer_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(f"qformer_config.encoder_hidden_size {qformer_config.encoder_hidden_size} != the vision "
                             f"tower's hidden_size {vision_config.hidden_size}")
        if num_grounding_queries and not qformer_config.detection_encoder_hidden_size:
            raise ValueError("grounding queries read the refiner's objects: qformer_config needs "
                             "detection_encoder_hidden_size (the object features' width)")
        super().__init__(vision_config, vision_feature_layer=-1, vision_feature_select_strategy="full")
        self.num_grounding_queries = num_grounding_queries
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens + num_grounding_queries,
                                                     qformer_config.hidden_size))
        self.qformer = QFormer(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, text_width)

    @property
    def num_image_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def takes_instruction(self) -> bool:
        return self.qformer.config.use_qformer_text_input

    def forward(self, hidden_states: list[torch.Tensor], instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None, object_features: torch.Tensor | None = None,
                object_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_image_tokens, text width). instruction_ids / instruction_mask: (B, T), one row
        per image (InstructBLIP's qformer_input_ids / qformer_attention_mask). object_features
        (B, N, detection_encoder_hidden_size) / object_mask (B, N): the refiner's, for the
        grounding queries."""
        image_embeds = self.select_features(hidden_states).to(self.query_tokens.dtype)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if self.num_grounding_queries and (object_features is None or object_mask is None):
            raise ValueError("this MQ-Former's grounding queries need the visual refiner's object_features and "
                             "object_mask (one row per image)")
        attn_mask = None
        if instruction_ids is not None and instruction_mask is not None:
            attn_mask = bidirectional_mask(torch.cat([instruction_mask.new_ones(queries.shape[:2]), instruction_mask], 1))
        states = self.qformer(queries, instruction_ids, attn_mask=attn_mask, image_embeds=image_embeds,
                              num_grounding_queries=self.num_grounding_queries,
                              object_features=None if object_features is None else object_features.to(queries.dtype),
                              object_mask=object_mask)
        return self.language_projection(states[:, :queries.shape[1]])


# ----------------------------------------------------------------------------------------------
# LION: the Q-Former beside the vision aggregator (sec. 3.1.3, eqs. 4-5)

VISUAL_INPUTS = ("ALL", "QFORMER", "AGGREGATOR")  # what the LLM reads (the official `visual_input`)


@dataclass
class VisionAggregatorConfig(JsonConfig):
    """LION's vision aggregator, V = B_2(B_1(V_i; V_j); V_k) with B(X; Y) = FFN(XAttn(Attn(X), Y))
    (eqs. 4-5): `num_blocks` BERT layers (post-LN) at the ViT's width. `tapped_layers` are the
    0-based ViT blocks (i, j, k), their outputs before any final norm: the stream starts from
    V_i, block b cross-attends the next. The paper's rule (L-1, 2L/3, L/3) is the default; the
    official FusionAdapter on the 39-block EVA ViT-g taps (38, 28, 18), with 16 heads, BERT's FFN
    3072 and eps 1e-12. The MLP after it widens to `projector_hidden_size` (0 = 4x the ViT's, as
    `adapter_proj`). num_blocks 0 is Fig. 6's ablation: the MLP reads the last layer directly."""

    model_type: ClassVar[str] = "lion_vision_aggregator"
    num_blocks: int = 2
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    tapped_layers: list[int] = field(default_factory=list)
    projector_hidden_size: int = 0

    def layers_for(self, num_vision_layers: int) -> list[int]:
        layers = list(self.tapped_layers) or [num_vision_layers - 1, 2 * num_vision_layers // 3,
                                              num_vision_layers // 3][:self.num_blocks + 1]
        if len(layers) != self.num_blocks + 1 or not all(0 <= layer < num_vision_layers for layer in layers):
            raise ValueError(f"the vision aggregator's {self.num_blocks} blocks need {self.num_blocks + 1} tapped "
                             f"ViT blocks in 0..{num_vision_layers - 1}, got {layers}")
        return layers


class VisionAggregator(nn.Module):
    """The aggregator's blocks and its LayerNorm (official `fusion_adapter` and `ln_adapter`)."""

    def __init__(self, vision_config: VisionConfig, config: VisionAggregatorConfig):
        super().__init__()
        width = vision_config.hidden_size
        self.tapped_layers = config.layers_for(vision_config.num_hidden_layers)
        self.blocks = nn.ModuleList(
            PostNormBlock(width, config.num_attention_heads, config.intermediate_size, "gelu", config.layer_norm_eps,
                          context_dim=width) for _ in range(config.num_blocks))
        self.layernorm = nn.LayerNorm(width)  # nn.LayerNorm's eps, as the official `ln_adapter`

    def initialize_weights(self) -> None:
        """The official initialization: BERT's, then every attention output projection (self and
        cross: both are BertSelfOutput) and the feed-forward output zeroed, so each block starts
        as LayerNorms of its input."""
        self.apply(bert_initialization)
        for block in self.blocks:
            for linear in (block.self_attn.o_proj, block.cross_attn.o_proj, block.mlp.fc2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the tower's output (index 0 = embeddings, so block b is b + 1).
        Returns (B, 1 + patches, vision width)."""
        x = hidden_states[self.tapped_layers[0] + 1]
        for block, layer in zip(self.blocks, self.tapped_layers[1:]):
            x = block(x, context=hidden_states[layer + 1])
        return self.layernorm(x)


class LIONConnector(QFormerConnector):
    """LION's two visual branches (sec. 3.1, Fig. 3): the instruction-aware Q-Former on the
    normalized last layer (InstructBLIP's, `query_tokens` through `language_projection`), and
    the vision aggregator on the raw layers then `aggregator_projector` (LLaVA-1.5's MLP, the
    official `adapter_proj`) to the LLM's width. `visual_input` says which reach the LLM: "ALL"
    (the 32 query tokens, then one token per ViT position, class token included), "QFORMER" or
    "AGGREGATOR"; both branches always exist, so every stage's checkpoint has the same keys."""

    normalizes_last_layer = False  # the aggregator reads the raw last layer; ln_vision comes in `forward`

    def __init__(self, vision_config: VisionConfig, text_width: int, qformer_config: QFormerConfig,
                 num_query_tokens: int, aggregator_config: VisionAggregatorConfig, visual_input: str = "ALL"):
        if visual_input not in VISUAL_INPUTS:
            raise ValueError(f"visual_input must be one of {VISUAL_INPUTS}, not {visual_input!r}")
        super().__init__(vision_config, text_width, qformer_config, num_query_tokens)
        self.visual_input = visual_input
        self.vision_aggregator = VisionAggregator(vision_config, aggregator_config)
        self.aggregator_projector = MLPProjector(
            vision_config, text_width, aggregator_config.projector_hidden_size or 4 * vision_config.hidden_size,
            vision_feature_layer=-1, vision_feature_select_strategy="full")

    @property
    def num_image_tokens(self) -> int:
        return ((self.query_tokens.shape[1] if self.visual_input != "AGGREGATOR" else 0)
                + (self.vision_config.num_patches + 1 if self.visual_input != "QFORMER" else 0))

    def forward(self, hidden_states: list[torch.Tensor], instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None, ln_vision: nn.Module | None = None) -> torch.Tensor:
        """(B, num_image_tokens, text width). ln_vision: the tower's final LayerNorm (BLIP-2's
        ln_vision), which the Q-Former's input needs and the aggregator's must not have."""
        tokens = []
        if self.visual_input != "AGGREGATOR":
            normalized = [*hidden_states[:-1], ln_vision(hidden_states[-1])]
            tokens.append(super().forward(normalized, instruction_ids, instruction_mask))
        if self.visual_input != "QFORMER":
            aggregated = self.vision_aggregator([state.to(self.query_tokens.dtype) for state in hidden_states])
            tokens.append(self.aggregator_projector.project(aggregated))
        return torch.cat(tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# Lynx: the Perceiver resampler (sec. 2.1)


@dataclass
class ResamplerConfig(JsonConfig):
    """The official PerceiverResampler(depth=3, dim_head=64, heads=8, num_latents=32, ff_mult=4).
    `num_frames` > 0 adds the learned frame-position embedding of Lynx's video input (5 frames)."""

    model_type: ClassVar[str] = "lynx_resampler"
    num_latents: int = 32
    depth: int = 3
    num_attention_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    num_frames: int = 0


class ResamplerLayer(nn.Module):
    """One layer: latents += W_o softmax(q k^T / sqrt(d)) v with q = W_q LN_l(latents) and k, v =
    W_kv LN_m(x) from the image tokens x ONLY (Flamingo also feeds the latents into k, v; Lynx
    does not), then latents += FFN(LN(latents)), GELU, x4; every projection bias-free."""

    def __init__(self, vision_width: int, width: int, config: ResamplerConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(vision_width)
        self.norm_latents = nn.LayerNorm(width)
        self.cross_attn = Attention(width, config.num_attention_heads, context_dim=vision_width,
                                    head_dim=config.head_dim, bias=False)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = FeedForward(width, config.ff_mult * width, "gelu", bias=False)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        latents = latents + self.cross_attn(self.norm_latents(latents), context=self.norm_media(media))
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(Connector):
    """Lynx's connector (the official `bridge`): `latents` (num_latents x LLM width, N(0, 1) as
    the official randn) read the raw last ViT layer, every token with the class token, through
    `layers`, and a final LayerNorm; the output is already at the LLM's width. A video's frames
    (B, F, tokens, width) get `frame_position_embedding` and are concatenated along the tokens
    first (the official "concate" video encoding)."""

    def __init__(self, vision_config: VisionConfig, text_width: int, config: ResamplerConfig):
        super().__init__(vision_config, vision_feature_layer=-1, vision_feature_select_strategy="full")
        vision_width = vision_config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.num_latents, text_width))
        self.layers = nn.ModuleList(ResamplerLayer(vision_width, text_width, config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(text_width)
        self.frame_position_embedding = None
        if config.num_frames:  # trunc_normal(std 0.02), as the official `absolute_frame_pos_embed`
            self.frame_position_embedding = nn.Parameter(
                nn.init.trunc_normal_(torch.zeros(1, config.num_frames, 1, vision_width), std=0.02))

    @property
    def num_image_tokens(self) -> int:
        return self.latents.shape[0]

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features (B, tokens, vision width), or a video's (B, frames, tokens, vision width).
        Returns (B, num_latents, text width)."""
        media = image_features.to(self.latents.dtype)
        if media.ndim == 4:
            if self.frame_position_embedding is None or media.shape[1] != self.frame_position_embedding.shape[1]:
                raise ValueError(f"a video of {media.shape[1]} frames, but this resampler has frame positions for "
                                 f"{0 if self.frame_position_embedding is None else self.frame_position_embedding.shape[1]}")
            media = (media + self.frame_position_embedding).flatten(1, 2)
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)


CONNECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLPProjector, "qformer": QFormerConnector,
              "lion": LIONConnector, "resampler": PerceiverResampler}


def build_connector(projector_type: str, vision_config: VisionConfig, text_width: int, vision_feature_layer: int,
                    vision_feature_select_strategy: str, qformer_config: QFormerConfig | None = None,
                    num_query_tokens: int = 32, aggregator_config: VisionAggregatorConfig | None = None,
                    visual_input: str = "ALL", resampler_config: ResamplerConfig | None = None,
                    num_grounding_queries: int = 0) -> Connector:
    """The connector named by `projector_type` (LLaVA's `mm_projector_type`, "qformer", "lion" or
    "resampler"), reading the tower of `vision_config`: the LLaVA projectors as the two feature
    options say, the Q-Former (Lyrics' MQ-Former with `num_grounding_queries`; LION's branches)
    and Lynx's resampler their own way."""
    if projector_type not in CONNECTORS:
        raise ValueError(f"unknown projector_type {projector_type!r}; known: {sorted(CONNECTORS)}")
    if projector_type in ("qformer", "lion") and qformer_config is None:
        raise ValueError(f"projector_type {projector_type!r} needs a qformer_config")
    if projector_type == "lion":
        return LIONConnector(vision_config, text_width, qformer_config, num_query_tokens,
                             aggregator_config or VisionAggregatorConfig(), visual_input)
    if projector_type == "qformer":
        return QFormerConnector(vision_config, text_width, qformer_config, num_query_tokens, num_grounding_queries)
    if projector_type == "resampler":
        return PerceiverResampler(vision_config, text_width, resampler_config or ResamplerConfig())
    return CONNECTORS[projector_type](vision_config, text_width, vision_feature_layer=vision_feature_layer,
                                      vision_feature_select_strategy=vision_feature_select_strategy)
