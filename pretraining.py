"""The Q-Former's own pretraining, before any LLM reads it: BLIP-2's stage 1 and Lyrics'.

Both train the Querying Transformer (connectors.QFormer) with the image tower frozen, on
image-text pairs, by objectives that share its weights and differ only in who may attend to whom
in its self-attention (the mask):

- BLIP-2 (Li et al. 2023, sec. 3.2, Figure 2): `QFormerStage1`, image-text contrastive (ITC),
  image-text matching (ITM) and image-grounded text generation (ITG) between the queries and the
  caption. Its checkpoint starts BLIP-2's and InstructBLIP's second stage (model.MLLM).
- Lyrics ("Lyrics: Boosting Fine-grained Language-Vision Alignment via Semantic-aware Visual
  Objects", sec. 3.2, Figure 3, eq. 1-5): `LyricsStage1`, the MQ-Former. Visual queries read the
  image and grounding queries the visual refiner's objects. The text is the spatial
  representation of the objects ("[BOS] <br><T>tag</T><Bbox>(x1, y1), (x2, y2)</Box></br>...")
  followed by the caption ("[CLS] caption [SEP]"). Four objectives: ITC and ITM pair the visual
  queries with the caption and the grounding queries with the spatial representation; ICG
  generates the caption from all queries; MSP restores whole masked objects of the spatial
  representation.

Reading order: the ITG cache and mask, BLIP-2's stage 1 (config, heads, ITC, hard negatives, the
model), then Lyrics' segments and masks and its model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (BLIP2_RETRIEVAL_LAYOUT, JsonConfig, load_state_strict, read_checkpoint, read_config_json,
                         state_to_ours, state_to_theirs, write_checkpoint)
from connectors import QFormer, QFormerConfig, bert_initialization, bidirectional_mask
from layers import IGNORE_INDEX
from vision import VisionConfig, VisionTransformer, vision_config_from_dict

# ----------------------------------------------------------------------------------------------
# BLIP-2's ITG: the text reads the queries through their cached keys and values


class QueryKeysValues:
    """A self-attention cache for BLIP-2's image-grounded text generation (sec. 3.2, ITG): the
    query pass stores each layer's query keys and values (with their gradients), and the text
    pass attends to them before its own, so the text reads the image only through the queries."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


def causal_text_mask(text_padding_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITG's "multimodal causal" mask for the text pass: each text token sees all `num_queries`
    queries (their cached keys come first) and the text up to itself, padding excluded.
    text_padding_mask: (B, T), 1 = token; returns (B, 1, T, num_queries + T)."""
    batch, length = text_padding_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=text_padding_mask.device).tril()
    allowed = torch.cat([causal.new_ones(length, num_queries), causal], dim=1)  # (T, Q + T)
    keys = torch.cat([text_padding_mask.new_ones(batch, num_queries), text_padding_mask], dim=1).bool()
    return allowed[None, None] & keys[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# BLIP-2 stage 1: the Q-Former learns to read the image before any LLM sees it (sec. 3.2)


@dataclass
class QFormerStage1Config(JsonConfig):
    """The stage-1 model: a (frozen) tower, the Q-Former with text input, the 256-d contrastive
    space (`image_text_hidden_size`) and the [DEC] token that starts generated text. config.json
    is transformers' Blip2Config for Blip2ForImageTextRetrieval, plus `decoder_bos_token_id`."""

    model_type: ClassVar[str] = "blip-2"
    vision_config: VisionConfig | None = None
    qformer_config: QFormerConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    decoder_bos_token_id: int = 30522  # [DEC], added after bert-base-uncased's 30522 tokens
    num_grounding_queries: int = 0  # Lyrics' MQ-Former; 0 for BLIP-2

    # The config.json keys besides the two nested configs.
    scalar_fields: ClassVar[tuple[str, ...]] = ("num_query_tokens", "image_text_hidden_size", "decoder_bos_token_id")
    architecture: ClassVar[str] = "Blip2ForImageTextRetrieval"

    def __post_init__(self):
        if self.vision_config is None or self.qformer_config is None:
            raise ValueError(f"{type(self).__name__} needs a vision_config and a qformer_config")
        if not self.qformer_config.use_qformer_text_input:
            raise ValueError("stage 1 trains the Q-Former on text: qformer_config.use_qformer_text_input must be true")

    @classmethod
    def from_dict(cls, values: dict) -> "QFormerStage1Config":
        vision_config = vision_config_from_dict({"model_type": "blip_2_vision_model", **values["vision_config"]})
        qformer_config = QFormerConfig.from_dict({**values["qformer_config"], "use_qformer_text_input": True,
                                                  "encoder_hidden_size": vision_config.hidden_size})
        return cls(vision_config=vision_config, qformer_config=qformer_config,
                   **{key: values[key] for key in cls.scalar_fields if key in values})

    def to_dict(self) -> dict:
        return {"architectures": [self.architecture], "model_type": self.model_type,
                "vision_config": self.vision_config.to_dict(), "qformer_config": self.qformer_config.to_dict(),
                **{key: getattr(self, key) for key in self.scalar_fields}}


class TextGenerationHead(nn.Module):
    """BERT's language-model head, the one ITG trains: dense -> GELU -> LayerNorm, then the word
    embeddings transposed (tied, as in BERT) plus a bias."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(states))), word_embeddings, self.bias)


def gather_across_processes(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """The tensor of every process, concatenated along dim 0 in rank order (itself when not
    distributed). LAVIS gathers the contrastive features without gradient (concat_all_gather)
    and the image embeddings for ITM negatives with it (all_gather_with_grad)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if with_grad:
        return torch.cat(dist_nn.all_gather(tensor), dim=0)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def pad_to_common_length(tensor: torch.Tensor, dim: int, value: float) -> torch.Tensor:
    """`tensor` padded along `dim` to the longest of all processes, so that it can be gathered
    (each process pads its batch to its own longest text, and Lyrics' to its most objects)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    length = torch.tensor(tensor.shape[dim], device=tensor.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    padding = [0, 0] * (tensor.dim() - 1 - dim) + [0, int(length) - tensor.shape[dim]]
    return F.pad(tensor, padding, value=value)


def image_text_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                                temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC (BLIP-2 sec. 3.2): a text's similarity to an image is the highest over the image's
    queries ("we compute the pairwise similarity between each query output and t, and select the
    highest one"), divided by a learned temperature; cross-entropy with label smoothing 0.1 in
    both directions against this process's slice of the gathered batch.

    image_features: (B, Q, E) normalized; text_features: (B, E) normalized. Returns (loss,
    image-to-text (B, B_all), text-to-image (B, B_all) similarities), the latter for ITM's
    negatives."""
    image_all = gather_across_processes(image_features, with_grad=False)  # (B_all, Q, E)
    text_all = gather_across_processes(text_features, with_grad=False)    # (B_all, E)
    image_to_text = torch.einsum("iqe,je->ijq", image_features, text_all).amax(-1) / temperature
    text_to_image = torch.einsum("ie,jqe->ijq", text_features, image_all).amax(-1) / temperature
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    targets = torch.arange(len(text_features), device=text_features.device) + rank * len(text_features)
    loss = (F.cross_entropy(image_to_text, targets, label_smoothing=0.1)
            + F.cross_entropy(text_to_image, targets, label_smoothing=0.1)) / 2
    return loss, image_to_text, text_to_image


def sample_hard_negatives(similarities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ITM's hard negatives (BLIP-2 sec. 3.2, after ALBEF): for each row, one column drawn with
    probability softmax(similarity), its own positive (this process's diagonal) excluded.
    similarities: (B, B_all); returns (B,) indices into the gathered batch."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    batch = similarities.shape[0]
    if similarities.shape[1] < 2:
        raise ValueError("ITM needs at least 2 image-text pairs across all processes to sample a negative")
    with torch.no_grad():
        masked = similarities.detach().clone()
        rows = torch.arange(batch, device=masked.device)
        masked[rows, rows + rank * batch] = -10000.0
        return torch.multinomial(masked.softmax(dim=1), 1, generator=generator).squeeze(1)


class QFormerStage1(nn.Module):
    """BLIP-2's first stage (sec. 3.2, Figure 2): with the image encoder frozen, the Q-Former
    learns to pull out the visual features most informative of the text, by three objectives that
    share its weights and differ in the self-attention mask:

    - ITC, image-text contrastive (queries and text in separate passes, "uni-modal" mask);
    - ITM, image-text matching (queries and text together, bidirectional; a binary head on each
      query output, averaged), on hard negatives;
    - ITG, image-grounded text generation (text causal, seeing all queries; the queries reach the
      text only through their cached keys and values, so they must hold everything the text needs).

    `forward` returns ({"itc", "itm", "itg"}, their sum: BLIP-2 weighs them equally). Parameter
    names map onto transformers' Blip2ForImageTextRetrieval (checkpoints.BLIP2_RETRIEVAL_LAYOUT)."""

    config_class: ClassVar[type] = QFormerStage1Config

    def __init__(self, config: QFormerStage1Config):
        super().__init__()
        self.config = config
        width = config.qformer_config.hidden_size
        self.vision_tower = VisionTransformer(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens + config.num_grounding_queries, width))
        self.qformer = QFormer(config.qformer_config)
        self.vision_projection = nn.Linear(width, config.image_text_hidden_size)
        self.text_projection = nn.Linear(width, config.image_text_hidden_size)
        self.itm_head = nn.Linear(width, 2)
        self.itg_head = TextGenerationHead(config.qformer_config)
        self.temperature = nn.Parameter(torch.tensor(0.07))  # learned, 0.07 at the start (BLIP's)

    def initialize_weights(self) -> None:
        """A fresh Q-Former and heads (BERT's initialization, queries N(0, 0.02) as in LAVIS); the
        tower keeps whatever it was given."""
        for module in (self.qformer, self.vision_projection, self.text_projection, self.itm_head, self.itg_head):
            module.apply(bert_initialization)
        nn.init.zeros_(self.itg_head.bias)
        nn.init.normal_(self.query_tokens, std=0.02)
        with torch.no_grad():
            self.temperature.fill_(0.07)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The LayerNorm'd last ViT layer, every token (B, 1 + patches, vision width)."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        return self.vision_tower(pixel_values.to(dtype), normalize_last=True)[-1].to(self.query_tokens.dtype)

    def query_outputs(self, image_embeds: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """(B, Q, width): the queries alone, reading the image."""
        return self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds=image_embeds,
                            caches=caches)

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, width): the text alone, bidirectional (BERT's text encoder)."""
        return self.qformer(input_ids=input_ids, attn_mask=bidirectional_mask(attention_mask))

    def match_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2), [no match, match]: queries and text together, bidirectional mask."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.cat([attention_mask.new_ones(queries.shape[:2]), attention_mask], dim=1)
        states = self.qformer(queries, input_ids, attn_mask=bidirectional_mask(mask), image_embeds=image_embeds)
        return self.itm_head(states[:, :queries.shape[1]]).mean(dim=1)

    def similarity(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (images, texts), the best over each image's queries (no temperature;
        transformers' Blip2ForImageTextRetrieval without its matching head)."""
        image_features = F.normalize(self.vision_projection(self.query_outputs(self.image_embeds(pixel_values))), dim=-1)
        text_features = F.normalize(self.text_projection(self.text_outputs(input_ids, attention_mask)[:, 0]), dim=-1)
        return torch.einsum("iqe,je->ijq", image_features, text_features).amax(-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """pixel_values (B, 3, H, W); input_ids (B, T): [CLS] caption [SEP] and padding, with
        attention_mask (B, T). Returns ({"itc", "itm", "itg"}, itc + itm + itg)."""
        image_embeds = self.image_embeds(pixel_values)
        caches = [QueryKeysValues() for _ in self.qformer.layers]
        image_features = F.normalize(self.vision_projection(self.query_outputs(image_embeds, caches)), dim=-1)
        text_features = F.normalize(self.text_projection(self.text_outputs(input_ids, attention_mask)[:, 0]), dim=-1)
        itc, image_to_text, text_to_image = image_text_contrastive_loss(image_features, text_features,
                                                                        self.temperature)

        # ITM: each text with its image, with a hard negative image; each image with a hard negative text.
        image_embeds_all = gather_across_processes(image_embeds, with_grad=True)
        texts = [pad_to_common_length(tensor, 1, 0) for tensor in (input_ids, attention_mask)]
        input_ids_all, attention_mask_all = (gather_across_processes(tensor, with_grad=False) for tensor in texts)
        negative_images = sample_hard_negatives(text_to_image)
        negative_texts = sample_hard_negatives(image_to_text)
        batch = len(input_ids)
        match = self.match_logits(torch.cat([image_embeds, image_embeds_all[negative_images], image_embeds]),
                                  torch.cat([texts[0], texts[0], input_ids_all[negative_texts]]),
                                  torch.cat([texts[1], texts[1], attention_mask_all[negative_texts]]))
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(match.device)
        itm = F.cross_entropy(match, labels)

        # ITG: [DEC] in place of [CLS]; the text reads the queries' cached keys and values.
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.decoder_bos_token_id
        states = self.qformer(input_ids=decoder_input_ids, caches=caches,
                              attn_mask=causal_text_mask(attention_mask, self.config.num_query_tokens))
        logits = self.itg_head(states, self.qformer.word_embeddings.weight)
        targets = decoder_input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                              label_smoothing=0.1)
        losses = {"itc": itc, "itm": itm, "itg": itg}
        return losses, itc + itm + itg

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors in transformers' Blip2ForImageTextRetrieval layout (the
        ITG head and temperature, which it leaves out, under LAVIS's names)."""
        state = {key: value for key, value in self.state_dict().items()}
        write_checkpoint(path, self.config.to_dict(), state_to_theirs(state, BLIP2_RETRIEVAL_LAYOUT))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QFormerStage1":
        """A Blip2ForImageTextRetrieval checkpoint (the hub's or ours). The hub's has no ITG head
        or temperature: those start fresh, and the loader says so."""
        values, state = read_checkpoint(path)
        model = cls(cls.config_class.from_dict(values))
        model.initialize_weights()
        state = state_to_ours(state, BLIP2_RETRIEVAL_LAYOUT)
        fresh = [key for key in model.state_dict() if key.startswith(("itg_head.", "temperature")) and key not in state]
        if fresh:
            print(f"{path}: no {', '.join(fresh)} (transformers keeps no ITG head or temperature); initialized fresh",
                  file=sys.stderr)
            state.update({key: model.state_dict()[key] for key in fresh})
        load_state_strict(model, state, str(path))
        return model


# ----------------------------------------------------------------------------------------------
# Lyrics: the MQ-Former's pretraining (sec. 3.2, Figure 3, eq. 1-5)

# The segments of the MQ-Former's input, in order: visual queries, grounding queries, then the
# text, "[BOS] spatial representation" and "[CLS] caption [SEP]".
VISUAL, GROUNDING, SPATIAL, CAPTION = range(4)

# Which segments each segment's positions may attend to, per objective (Figure 3; True = may):
# - itc: "we mutually mask the text and image transformers": queries see queries, and each text
#   segment only itself, so [BOS] sums up the objects and [CLS] the caption;
# - itm: "a regionalized bi-directional self-attention mask that permits mutual interaction
#   between visual queries and image caption, as well as between grounding queries and spatial
#   representation, while remaining tokens are prevented from attaching to each other";
# - icg: the caption reads every query and itself causally (UniLM's mask), "with spatial
#   information being masked"; queries see queries; the spatial rows see themselves (no loss);
# - msp: queries and the spatial representation see each other, "with the exception that image
#   caption are entirely masked"; the caption rows see themselves (no loss).
LYRICS_VISIBILITY: dict[str, dict[int, tuple[int, ...]]] = {
    "itc": {VISUAL: (VISUAL, GROUNDING), GROUNDING: (VISUAL, GROUNDING), SPATIAL: (SPATIAL,), CAPTION: (CAPTION,)},
    "itm": {VISUAL: (VISUAL, CAPTION), GROUNDING: (GROUNDING, SPATIAL), SPATIAL: (GROUNDING, SPATIAL),
            CAPTION: (VISUAL, CAPTION)},
    "icg": {VISUAL: (VISUAL, GROUNDING), GROUNDING: (VISUAL, GROUNDING), SPATIAL: (SPATIAL,),
            CAPTION: (VISUAL, GROUNDING, CAPTION)},
    "msp": {VISUAL: (VISUAL, GROUNDING, SPATIAL), GROUNDING: (VISUAL, GROUNDING, SPATIAL),
            SPATIAL: (VISUAL, GROUNDING, SPATIAL), CAPTION: (CAPTION,)},
}


def lyrics_attention_mask(objective: str, segments: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """The self-attention mask (B, 1, L, L), True = may attend, of one objective over a sequence
    whose positions belong to `segments` (B, L) (VISUAL ... CAPTION), padding_mask (B, L) 1 on
    real positions. ICG's caption is causal within itself. Each position also sees itself, so a
    padded row stays finite (its output is never used)."""
    table = torch.zeros(4, 4, dtype=torch.bool, device=segments.device)
    for row, visible in LYRICS_VISIBILITY[objective].items():
        table[row, list(visible)] = True
    allowed = table[segments[:, :, None], segments[:, None, :]]
    length = segments.shape[1]
    if objective == "icg":
        caption_pair = (segments[:, :, None] == CAPTION) & (segments[:, None, :] == CAPTION)
        allowed &= ~(caption_pair & torch.ones(length, length, dtype=torch.bool, device=segments.device).triu(1))
    allowed &= padding_mask.bool()[:, None, :]
    return (allowed | torch.eye(length, dtype=torch.bool, device=segments.device))[:, None]


@dataclass
class LyricsStage1Config(QFormerStage1Config):
    """The MQ-Former's pretraining model: BLIP-2's stage-1 config with grounding queries, the
    refiner's object width in `qformer_config.detection_encoder_hidden_size`, and the ids of the
    tokens Lyrics adds to the Q-Former's vocabulary ([BOS] before the spatial representation,
    [MLM] in its place for MSP; [MASK] is BERT's)."""

    model_type: ClassVar[str] = "lyrics"
    architecture: ClassVar[str] = "LyricsQFromerForPretrain"  # the official class name, spelled as it is
    num_grounding_queries: int = 32
    spatial_bos_token_id: int = -1
    mlm_token_id: int = -1
    mask_token_id: int = 103  # bert-base-uncased's [MASK]
    msp_probability: float = 0.15  # share of whole objects masked for MSP
    scalar_fields: ClassVar[tuple[str, ...]] = QFormerStage1Config.scalar_fields + (
        "num_grounding_queries", "spatial_bos_token_id", "mlm_token_id", "mask_token_id", "msp_probability")

    def __post_init__(self):
        super().__post_init__()
        if self.num_grounding_queries < 1 or not self.qformer_config.detection_encoder_hidden_size:
            raise ValueError("the MQ-Former needs grounding queries and qformer_config.detection_encoder_hidden_size")
        if min(self.spatial_bos_token_id, self.mlm_token_id) < 0:
            raise ValueError("LyricsStage1Config needs the [BOS] and [MLM] token ids (conversation.with_lyrics_tokens)")


class LyricsStage1(QFormerStage1):
    """Lyrics' pretraining of the MQ-Former (sec. 3.2): `num_query_tokens` visual queries read the
    frozen ViT, `num_grounding_queries` grounding queries read the visual refiner's objects (their
    local features and boxes) through their own cross-attention, and the text is "[BOS] spatial
    representation [CLS] caption [SEP]". Loss = ITC + ITM + ICG + MSP (eq. 5), each a pass of
    queries and text through the Q-Former under its mask (LYRICS_VISIBILITY):

    - ITC (eq. 1): visual queries vs the caption's [CLS], grounding queries vs the spatial
      representation's [BOS], each BLIP-2's contrastive loss (best query, learned temperature),
      averaged. The paper concatenates the pooled query and text outputs into one similarity
      without saying which halves meet; we pair them as its ITM does.
    - ITM (eq. 2): one head on the mean visual query output (with the caption) and on the mean
      grounding query output (with the spatial representation), on BLIP-2's hard negatives.
    - ICG (eq. 3): the caption from [DEC] (in place of [CLS]), reading all queries.
    - MSP (eq. 4): whole objects of the spatial representation replaced by [MASK] with
      probability `msp_probability` each, restored from the queries; [MLM] in place of [BOS].

    ICG and MSP share BLIP-2's language-model head (`itg_head`, BERT's one head). Parameter names
    follow BLIP-2's stage 1; the grounding cross-attention is transformers-style
    `detection_crossattention` on disk, as in the official code."""

    config_class: ClassVar[type] = LyricsStage1Config

    def initialize_weights(self) -> None:
        """BLIP-2's fresh initialization, then Xavier for the grounding cross-attention (sec. 3.1)."""
        super().initialize_weights()
        for layer in self.qformer.layers:
            if layer.grounding_cross_attn is not None:
                for linear in (layer.grounding_cross_attn.q_proj, layer.grounding_cross_attn.k_proj,
                               layer.grounding_cross_attn.v_proj, layer.grounding_cross_attn.o_proj):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.zeros_(linear.bias)

    @classmethod
    def from_blip2(cls, stage1: QFormerStage1, config: LyricsStage1Config) -> "LyricsStage1":
        """Lyrics' start (sec. 3.1): "MQ-Former continues training on the BLIP-2 first-stage
        pre-training breakpoints, and we employ Xavier initialization to configure the extra
        cross-attention layer". Every tensor of `stage1` is copied; the rows it lacks (the added
        tokens' embeddings and head biases, positions beyond its longest text, the grounding
        queries) start as BLIP-2 starts its own, and the loader says which."""
        if stage1.config.num_query_tokens != config.num_query_tokens:
            raise ValueError(f"the visual queries are BLIP-2's: num_query_tokens must be its "
                             f"{stage1.config.num_query_tokens}, not {config.num_query_tokens}")
        model = cls(config)
        model.initialize_weights()
        own, fresh = model.state_dict(), []
        for key, value in stage1.state_dict().items():
            if key not in own:
                raise ValueError(f"the BLIP-2 stage-1 checkpoint has {key}, which the MQ-Former has not")
            target = own[key]
            if value.shape != target.shape:
                if value.dim() != target.dim() or any(a > b for a, b in zip(value.shape, target.shape)):
                    raise ValueError(f"{key}: {tuple(value.shape)} in the BLIP-2 checkpoint does not fit "
                                     f"{tuple(target.shape)} of the MQ-Former")
                fresh.append(f"{key} {tuple(value.shape)} -> {tuple(target.shape)}")
            target[tuple(slice(0, size) for size in value.shape)] = value
        fresh += sorted({".".join(key.split(".")[:4]) for key in own if key not in stage1.state_dict()})
        print(f"MQ-Former from BLIP-2 stage 1; new or grown: {', '.join(fresh)}", file=sys.stderr)
        model.load_state_dict(own)
        return model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_segments: torch.Tensor, object_spans: torch.Tensor, object_features: torch.Tensor,
                object_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """pixel_values (B, 3, H, W); input_ids / attention_mask (B, T): "[BOS] spatial [CLS]
        caption [SEP]" and padding; text_segments (B, T): SPATIAL or CAPTION per token;
        object_spans (B, T): the object a spatial token belongs to, -1 elsewhere; object_features
        (B, N, detection_encoder_hidden_size) with object_mask (B, N). Returns ({"itc", "itm",
        "icg", "msp"}, their sum)."""
        config = self.config
        num_visual, num_queries = config.num_query_tokens, config.num_query_tokens + config.num_grounding_queries
        image_embeds = self.image_embeds(pixel_values)
        object_features = object_features.to(image_embeds.dtype)

        def run(objective: str, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor,
                images: torch.Tensor, objects: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
            query_segments = torch.tensor([VISUAL] * num_visual + [GROUNDING] * config.num_grounding_queries,
                                          device=ids.device).expand(len(ids), -1)
            full_mask = torch.cat([mask.new_ones(len(ids), num_queries), mask], dim=1)
            return self.qformer(self.query_tokens.expand(len(ids), -1, -1), ids, image_embeds=images,
                                attn_mask=lyrics_attention_mask(objective, torch.cat([query_segments, segments], 1),
                                                                full_mask),
                                num_grounding_queries=config.num_grounding_queries, object_features=objects,
                                object_mask=present)

        inputs = (attention_mask, text_segments, image_embeds, object_features, object_mask)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        caption_start = (text_segments == CAPTION).int().argmax(dim=1)  # the [CLS] of each row

        # ITC: visual queries <-> caption, grounding queries <-> spatial representation.
        states = run("itc", input_ids, *inputs)
        query_features = F.normalize(self.vision_projection(states[:, :num_queries]), dim=-1)
        text_states = states[:, num_queries:]
        caption_features = F.normalize(self.text_projection(text_states[rows, caption_start]), dim=-1)
        spatial_features = F.normalize(self.text_projection(text_states[:, 0]), dim=-1)
        itc_visual, visual_to_caption, caption_to_visual = image_text_contrastive_loss(
            query_features[:, :num_visual], caption_features, self.temperature)
        itc_grounding, grounding_to_spatial, spatial_to_grounding = image_text_contrastive_loss(
            query_features[:, num_visual:], spatial_features, self.temperature)
        itc = (itc_visual + itc_grounding) / 2

        # ITM: each text with its image, with a hard negative image (its objects go with it), and
        # each image with a hard negative text (spatial representation and caption together).
        own_text = [pad_to_common_length(tensor, 1, value) for tensor, value in
                    ((input_ids, 0), (attention_mask, 0), (text_segments, CAPTION))]
        own_objects = [pad_to_common_length(tensor, 1, 0) for tensor in (object_features, object_mask)]
        text_all = [gather_across_processes(tensor, with_grad=False) for tensor in own_text]
        objects_all = [gather_across_processes(tensor, with_grad=False) for tensor in own_objects]
        images_all = gather_across_processes(image_embeds, with_grad=True)
        negative_images = sample_hard_negatives(caption_to_visual + spatial_to_grounding)
        negative_texts = sample_hard_negatives(visual_to_caption + grounding_to_spatial)
        match_text = [torch.cat([own, own, every[negative_texts]]) for own, every in zip(own_text, text_all)]
        match_images = torch.cat([image_embeds, images_all[negative_images], image_embeds])
        match_objects = [torch.cat([own, every[negative_images], own]) for own, every in zip(own_objects, objects_all)]
        states = run("itm", match_text[0], match_text[1], match_text[2], match_images, *match_objects)
        labels = torch.cat([torch.ones(len(input_ids)), torch.zeros(2 * len(input_ids))]).long().to(states.device)
        itm = (F.cross_entropy(self.itm_head(states[:, :num_visual]).mean(dim=1), labels)
               + F.cross_entropy(self.itm_head(states[:, num_visual:num_queries]).mean(dim=1), labels)) / 2

        # ICG: [DEC] in place of [CLS]; each caption token predicts the next one of the caption.
        decoder_ids = input_ids.clone()
        decoder_ids[rows, caption_start] = config.decoder_bos_token_id
        logits = self.itg_head(run("icg", decoder_ids, *inputs)[:, num_queries:], self.qformer.word_embeddings.weight)
        in_caption = text_segments == CAPTION
        next_is_caption = in_caption[:, :-1] & in_caption[:, 1:] & (attention_mask[:, 1:] == 1)
        targets = input_ids[:, 1:].masked_fill(~next_is_caption, IGNORE_INDEX)
        icg = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                              label_smoothing=0.1)

        # MSP: whole objects masked, [MLM] in place of [BOS]; the masked tokens are restored.
        chosen = torch.rand(len(input_ids), int(object_spans.max()) + 2, device=input_ids.device) < config.msp_probability
        masked = (object_spans >= 0) & chosen.gather(1, object_spans.clamp(min=0))
        mlm_ids = input_ids.masked_fill(masked, config.mask_token_id)
        mlm_ids[:, 0] = config.mlm_token_id
        logits = self.itg_head(run("msp", mlm_ids, *inputs)[:, num_queries:], self.qformer.word_embeddings.weight)
        if masked.any():
            msp = F.cross_entropy(logits[masked].float(), input_ids[masked])
        else:  # no object drawn in this batch: a zero that keeps the graph
            msp = logits.sum() * 0.0
        losses = {"itc": itc, "itm": itm, "icg": icg, "msp": msp}
        return losses, itc + itm + icg + msp


def load_stage1(path: str | Path) -> QFormerStage1:
    """A stage-1 checkpoint, BLIP-2's (Blip2ForImageTextRetrieval) or Lyrics' (model_type "lyrics")."""
    lyrics = read_config_json(path).get("model_type") == LyricsStage1Config.model_type
    return (LyricsStage1 if lyrics else QFormerStage1).from_pretrained(path)
