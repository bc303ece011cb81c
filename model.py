"""The LLaVA model: a LLaMA decoder that reads image features as tokens, and how it generates.

LLaVA (llava-dissertation.txt, section 3.4, Figure 3.1 and Eq. 3.1): an image X_v goes through
the CLIP encoder g (vision.py), a connector W maps its grid features Z_v to word-embedding width
(H_v = W . Z_v; connectors.py), and the LLM f_phi (Vicuna = LLaMA, this file) reads H_v in place
of the image tokens and predicts the answer autoregressively (Eq. 3.3). LLaVA-1.5 (section 4.3)
changes W to a two-layer MLP, uses the 336 px encoder and its layer -2 features.

Reading order of this file:
1. TextConfig and the LLaMA decoder (RMSNorm, rotary positions, SwiGLU, GQA through
   vision.Attention), LanguageModel = decoder + head in the LlamaForCausalLM key layout;
2. KVCache, preallocated, so that generation writes in place instead of concatenating;
3. MLLMConfig and MLLM: vision tower -> connector -> features written into the image-token
   positions -> LanguageModel;
4. decoding: logits processors as plain functions, then greedy / sampling and beam search;
5. checkpoints: one key-mapping table per on-disk layout, loading and saving.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adapters import merged_state_dict
from connectors import build_connector
from vision import (WEIGHTS_NAME, Attention, JsonConfig, VisionConfig, VisionTransformer, clip_state_to_ours,
                    load_safetensors, load_state_strict, our_state_to_clip, read_config_json, save_safetensors,
                    write_config_json)

IGNORE_INDEX = -100  # label of positions without loss (LLaVA / transformers convention)


# ----------------------------------------------------------------------------------------------
# 1. The LLaMA decoder

@dataclass
class TextConfig(JsonConfig):
    """LLaMA / Vicuna dimensions. Field names are transformers' LlamaConfig's so config.json maps 1:1;
    the defaults are Vicuna-7B v1.5's."""
    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5  # LLaMA-2 / Vicuna v1.5: 1e-5; LLaMA-1: 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> "TextConfig":
        """From a LlamaConfig dict (config.json). Fields it lacks take LlamaConfig's defaults, because
        that is what they mean there (llava-hf's text_config lists only what differs). Options this
        decoder does not implement raise instead of being silently ignored."""
        unsupported = {"hidden_act": ("silu", None), "attention_bias": (False, None), "mlp_bias": (False, None)}
        for name, allowed in unsupported.items():
            if config.get(name) not in allowed:
                raise ValueError(f"text config: {name}={config[name]!r} is not supported (only {allowed[0]!r})")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"text config: rope scaling {rope} is not supported (only the default rotary embedding)")
        llama_defaults = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)
        values = {**llama_defaults, **{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}}
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        return cls(**values)

    def to_dict(self) -> dict:
        """LlamaConfig dict: transformers 5 reads `rope_parameters`, 4.x reads `rope_theta`; write both."""
        return {**super().to_dict(), "hidden_act": "silu",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}}


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalize in fp32 (half-precision sums of squares overflow), cast back,
    then multiply by the weight, in this order (REFERENCE.md section 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normalized = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalized.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (batch, 1, length, head_dim), for vision.apply_rotary.
    Frequencies theta^(-2i/head_dim) use the same expression as transformers' LlamaRotaryEmbedding,
    so angles agree to the last bit; they are computed in fp32 (large positions lose their low bits
    in half precision) and repeated over the two halves of a head (rotate-half, `cat(freqs, freqs)`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inverse_frequencies = 1.0 / (theta ** exponents)
    angles = position_ids[:, :, None].float() * inverse_frequencies[None, None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward of LLaMA: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA block: x + attention(norm(x)), then + mlp(norm(x)). Submodule names are
    LlamaDecoderLayer's, so checkpoint keys map 1:1."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                   head_dim=config.head_dim, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None,
                is_causal: bool, cache: "LayerKVCache | None" = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn_mask=attn_mask, is_causal=is_causal,
                               rotary=rotary, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_attention_mask(attention_mask: torch.Tensor | None, query_length: int,
                          past_length: int) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention, building a mask only when needed.

    attention_mask: (batch, past_length + query_length), 1 = real token, 0 = padding, or None.
    - No padding (or RIGHT padding only, as in training): the causal structure alone is exact for
      every real token, because a real token never looks right of itself, so SDPA's `is_causal`
      fast path is used; outputs at right-padding positions are garbage and carry no loss.
    - One new token with a cache: it may see every cached key, so only padding needs masking.
    - LEFT padding (batched generation): a boolean (batch, 1, query, key) mask. A padding query
      would see no key at all, and SDPA returns NaN for such rows, so every query may always see
      itself; padding outputs are never used.
    """
    device = attention_mask.device if attention_mask is not None else None
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
        is_right_padded = bool((attention_mask.cummin(dim=-1).values == attention_mask).all())
        if attention_mask.all() or (past_length == 0 and is_right_padded):
            attention_mask = None
    if attention_mask is None:
        if query_length == 1:
            return None, False
        if past_length == 0:
            return None, True
    key_length = past_length + query_length
    query_positions = torch.arange(past_length, key_length, device=device)[:, None]
    key_positions = torch.arange(key_length, device=device)[None, :]
    allowed = key_positions <= query_positions
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :]) | (key_positions == query_positions)
    return allowed, False


class LanguageModel(nn.Module):
    """LLaMA decoder with its language-model head: transformers' LlamaForCausalLM, same state-dict
    keys (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # train.py sets it: recompute each layer in backward
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """With tie_word_embeddings the head is the embedding matrix (one Parameter, two names)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """LLaMA's initialization (normal, std 0.02), used for fresh models in tests and stage 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: "KVCache | None" = None,
                last_logits_only: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, length, vocab), or (logits, loss) with labels.

        attention_mask covers the cached positions and the new ones (transformers convention);
        position ids default to the count of real tokens before each position, so left padding
        does not shift positions. `last_logits_only` skips the head for all but the last position
        (generation's prefill needs only that one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length, _ = x.shape
        past_length = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_length, past_length + length, device=x.device).expand(batch, -1)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask, is_causal = causal_attention_mask(attention_mask, length, past_length)
        for index, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rotary, attn_mask, is_causal, layer_cache, use_reentrant=False)
            else:
                x = layer(x, rotary, attn_mask, is_causal, layer_cache)
        x = self.model.norm(x)
        logits = self.lm_head(x[:, -1:] if last_logits_only else x)
        if labels is None:
            return logits
        return logits, shifted_cross_entropy(x, labels, self.lm_head)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the vocabulary (new special tokens such as <image> / <pad>). New rows start at the
        mean of the existing ones, as LLaVA's `smart_tokenizer_and_embedding_resize` does, so a
        new token's first logits are ordinary instead of random."""
        old_size = self.config.vocab_size
        if vocab_size < old_size:
            raise ValueError(f"resize_token_embeddings only grows the vocabulary ({old_size} -> {vocab_size})")
        matrices = [self.model.embed_tokens.weight]
        if not self.config.tie_word_embeddings:
            matrices.append(self.lm_head.weight)
        grown = []
        for weight in matrices:
            new = weight.data.new_empty(vocab_size, weight.shape[1])
            new[:old_size] = weight.data
            new[old_size:] = weight.data.mean(0)
            grown.append(nn.Parameter(new, requires_grad=weight.requires_grad))
        self.model.embed_tokens.weight = grown[0]
        self.lm_head.weight = grown[-1]
        self.model.embed_tokens.num_embeddings = self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **decoding) -> torch.Tensor:
        """New tokens only, (batch, new_length); see `generate_tokens` for the decoding options."""
        return generate_tokens(self, input_ids, inputs_embeds, attention_mask, **decoding)

    @classmethod
    def from_pretrained(cls, path: str) -> "LanguageModel":
        """A LlamaForCausalLM checkpoint directory (config.json + safetensors)."""
        config, state = read_checkpoint(path)
        model = build_without_init(cls, TextConfig.from_dict(config), torch.float32)
        load_state(model, state, LLAMA_LAYOUT, path)
        return model

    def save_pretrained(self, path: str) -> None:
        """LlamaForCausalLM layout; transformers loads it."""
        config = {**self.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
        write_checkpoint(path, config, save_state(self, LLAMA_LAYOUT))


def shifted_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX (Eq. 3.3), in fp32, from the final
    hidden states (batch, length, width). The head runs again on the supervised positions only:
    in LLaVA most positions (image tokens, the prompt) carry no loss, and the softmax and the
    backward through the head over all of them cost more than this small second head. The labels
    shift left (padded with IGNORE_INDEX) rather than the hidden states shifting right."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = lm_head(hidden.flatten(0, 1)[supervised])
    return F.cross_entropy(logits.float(), targets[supervised])


def row_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its supervised next tokens (labels != IGNORE_INDEX)
    and how many there are, from logits (batch, length, vocab). Only the supervised positions go
    through the softmax, so memory stays (#supervised tokens, vocab), not (rows, length, vocab)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    token_log_probs = F.log_softmax(logits[:, :-1][scored].float(), dim=-1).gather(-1, targets[scored][:, None])[:, 0]
    row_of_token = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[scored]
    totals = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, row_of_token, token_log_probs)
    return totals, scored.sum(1)


# ----------------------------------------------------------------------------------------------
# 2. KV cache

class LayerKVCache:
    """Keys and values of one layer in preallocated (batch, kv_heads, max_length, head_dim)
    buffers: each step writes in place and attention reads a view, so decoding allocates nothing
    per step (concatenating would copy the whole cache every token)."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.keys = torch.empty(batch, kv_heads, max_length, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache is full: {end} positions > {self.keys.shape[2]} allocated")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One LayerKVCache per decoder layer."""

    def __init__(self, config: TextConfig, batch: int, max_length: int, dtype: torch.dtype, device: torch.device):
        self.layers = [LayerKVCache(batch, config.num_key_value_heads, max_length, config.head_dim, dtype, device)
                       for _ in range(config.num_hidden_layers)]

    @property
    def length(self) -> int:
        """Positions stored so far (every layer stores the same ones)."""
        return self.layers[0].length

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search: each surviving beam continues from its parent)."""
        for layer in self.layers:
            layer.keys[:, :, :self.length] = layer.keys[rows, :, :self.length]
            layer.values[:, :, :self.length] = layer.values[rows, :, :self.length]

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row `times` times in a row (beam search starts every beam from its prompt's prefill)."""
        for layer in self.layers:
            layer.keys = layer.keys.repeat_interleave(times, dim=0)
            layer.values = layer.values.repeat_interleave(times, dim=0)
        return self


# ----------------------------------------------------------------------------------------------
# 3. The multimodal model

@dataclass
class MLLMConfig:
    """LLaVA / LLaVA-1.5 composition. Field names follow transformers' LlavaConfig where it has them."""
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # LLaVA-1.5 (section 4.3); "linear" = LLaVA (Eq. 3.1)
    image_token_index: int = 32000  # llava-1.5-hf; an id >= the vocabulary is fine, it is never embedded
    pad_token_id: int = 32001
    vision_feature_layer: int = -2  # LLaVA-1.5; -1 = last layer (LLaVA's ablation, 0.96 points worse)
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_aspect_ratio: str = "pad"  # "pad" (LLaVA-1.5 stage 2) or "square" (CLIP center crop)

    @property
    def num_image_tokens(self) -> int:
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches + (self.vision_feature_select_strategy == "full")


class MLLM(nn.Module):
    """LLaVA: vision tower -> connector -> LLaMA, reading the projected features in place of the
    image tokens (section 3.4, Figure 3.1; LLaVA-1.5: section 4.3)."""

    def __init__(self, config: MLLMConfig):
        super().__init__()
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"not {config.vision_feature_select_strategy!r}")
        self.config = config
        self.vision_tower = VisionTransformer(config.vision_config)
        self.multi_modal_projector = build_connector(config.projector_type, config.vision_config.hidden_size,
                                                     config.text_config.hidden_size)
        self.language_model = LanguageModel(config.text_config)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """H_v of Eq. 3.1: (num_images, num_image_tokens, text width). LLaVA-1.5 takes layer -2 of
        the ViT without its final LayerNorm and drops CLS (REFERENCE.md section 1)."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        layer = self.config.vision_feature_layer % (self.config.vision_config.num_hidden_layers + 1)
        hidden = self.vision_tower(pixel_values.to(dtype), num_layers=layer)[layer]
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings with each image's features written over its num_image_tokens image
        tokens, images taken in batch order (transformers' convention); text-only samples have no
        image tokens and need no image."""
        is_image = input_ids == self.config.image_token_index
        images_per_sample = is_image.sum(1).tolist()
        bad = [f"sample {index}: {count} image tokens" for index, count in enumerate(images_per_sample)
               if count % self.num_image_tokens]
        if bad:
            raise ValueError(f"each image must be exactly {self.num_image_tokens} copies of image token "
                             f"{self.config.image_token_index}; got " + ", ".join(bad))
        images_needed = sum(images_per_sample) // self.num_image_tokens
        images_given = 0 if pixel_values is None else pixel_values.shape[0]
        if images_needed != images_given:
            holders = ", ".join(f"sample {index}: {count // self.num_image_tokens}"
                                for index, count in enumerate(images_per_sample) if count)
            raise ValueError(f"input_ids hold {images_needed} images ({holders or 'none'}) "
                             f"but pixel_values has {images_given}")
        # The image token id may lie outside the vocabulary (original LLaVA), so embed a harmless id there.
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if images_needed == 0:
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None], features)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, length, vocab); with labels, (logits, mean cross-entropy over shifted
        labels != -100). pixel_values: (num_images, 3, H, W) for the samples holding images only."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixel_values),
                                   attention_mask=attention_mask, labels=labels)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **decoding) -> torch.Tensor:
        """New tokens only, (batch, new_length), padded with pad_token_id after the end; the batch
        is LEFT-padded. Options: see `generate_tokens`."""
        decoding.setdefault("pad_token_id", self.config.pad_token_id)
        return generate_tokens(self.language_model, input_ids, self.embed(input_ids, pixel_values), attention_mask,
                               **decoding)

    @classmethod
    def from_pretrained(cls, path: str, vision_tower_path: str | None = None,
                        dtype: torch.dtype = torch.float32) -> "MLLM":
        """Load a LLaVA checkpoint directory in any layout of LLAVA_LAYOUTS; dims from config.json.
        The original LLaVA layout takes its vision tower from the CLIP checkpoint `vision_tower_path`
        (its config's `mm_vision_tower` names the public one). Nothing tokenizer-related is attached."""
        values, state = read_checkpoint(path)
        name, layout = detect_layout(state, path)
        if layout is not ORIGINAL_LLAVA_LAYOUT:
            model = build_without_init(cls, llava_hf_config_to_ours(values), dtype)
            load_state(model, state, layout, f"{path} (layout: {name})")
            return model
        state = rename_keys(state, layout)
        if not any(key.startswith("vision_tower.") for key in state):
            if vision_tower_path is None:
                raise ValueError(f"{path} is an original LLaVA checkpoint without a vision tower: pass "
                                 f"vision_tower_path, a CLIP checkpoint ({values.get('mm_vision_tower', 'CLIP')})")
            tower = VisionTransformer.from_pretrained(vision_tower_path)
            state.update({f"vision_tower.{key}": value for key, value in tower.state_dict().items()})
            vision_config = tower.config
        else:
            vision_config = VisionConfig.from_dict(values.get("vision_config", {}))
        model = build_without_init(cls, original_llava_config_to_ours(values, vision_config), dtype)
        load_state(model, state, (), f"{path} (layout: {name})")
        return model

    @classmethod
    def from_vision_and_language(cls, vision_path: str, language_path: str, **config_overrides) -> "MLLM":
        """The start of stage-1 pretraining (section 3.4, "Stage 1"): a CLIP checkpoint (CLIPModel or
        CLIPVisionModel), a LlamaForCausalLM checkpoint and a freshly initialized connector.
        `config_overrides` set MLLMConfig fields. If image_token_index or pad_token_id lies outside
        the LLM's vocabulary, the vocabulary grows to hold them (new rows = mean embedding)."""
        vision_tower = VisionTransformer.from_pretrained(vision_path)
        language_model = LanguageModel.from_pretrained(language_path)
        config = MLLMConfig(vision_config=vision_tower.config, text_config=language_model.config, **config_overrides)
        needed_vocab = max(config.image_token_index, config.pad_token_id) + 1
        if needed_vocab > language_model.config.vocab_size:
            language_model.resize_token_embeddings(needed_vocab)
        model = build_without_init(cls, config, torch.float32)
        model.vision_tower, model.language_model = vision_tower, language_model
        model.multi_modal_projector = build_connector(config.projector_type, config.vision_config.hidden_size,
                                                      config.text_config.hidden_size)
        return model

    def save_pretrained(self, path: str) -> None:
        """llava-hf layout + config.json: transformers' LlavaForConditionalGeneration loads it (for the
        "mlp2x_gelu" projector; transformers has no single-linear one). LoRA is saved merged."""
        write_checkpoint(path, our_config_to_llava_hf(self.config), save_state(self, LLAVA_HF_LAYOUT))


# ----------------------------------------------------------------------------------------------
# 4. Decoding. Processors follow transformers' LogitsProcessors and are applied in their order
# (repetition penalty, no-repeat n-gram, min new tokens, then temperature, top-k, top-p).

def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): scores of tokens already present are divided
    by `penalty` when positive and multiplied when negative. `history` ids outside the vocabulary
    (padding, image tokens mapped to vocab_size) land in a scratch column that is dropped."""
    vocab = scores.shape[-1]
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, history)
    padded = padded.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))
    return padded[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """No n-gram occurs twice (fairseq / transformers `no_repeat_ngram_size`; Lynx Table 9): a token
    that would complete an n-gram already in the row gets -inf. Ids >= vocab_size (padding, image
    tokens) break n-grams instead of forming them."""
    vocab = scores.shape[-1]
    scores = scores.clone()
    for row, tokens in enumerate(history.tolist()):
        if len(tokens) < ngram_size:
            continue
        prefix = tuple(tokens[len(tokens) - ngram_size + 1:])
        banned = {ngram[-1] for ngram in zip(*(tokens[i:] for i in range(ngram_size)))
                  if ngram[:-1] == prefix and max(ngram) < vocab}
        scores[row, list(banned)] = -math.inf
    return scores


def apply_sampling_filters(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then keep the top_k best tokens, then the smallest set whose probability
    reaches top_p (nucleus sampling, Holtzman et al. 2020); the rest get -inf."""
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth_best = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # the best token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return scores


def ends_with_any(generated: torch.Tensor, sequences: list[torch.Tensor]) -> torch.Tensor:
    """Rows of `generated` (rows, length) that end with one of the stop token sequences."""
    hit = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    for sequence in sequences:
        if generated.shape[1] >= len(sequence):
            hit |= (generated[:, -len(sequence):] == sequence).all(-1)
    return hit


def generate_tokens(language_model: LanguageModel, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, min_new_tokens: int = 0,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    num_beams: int = 1, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                    repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                    stop_token_sequences: list[list[int]] | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Batched decoding with a KV cache; returns only the new tokens (batch, new_length).

    The batch is LEFT-padded (attention_mask 0 on the left) so that every row's next token sits in
    the same column. A row ends at EOS (any of eos_token_id, default the config's; [] = none) or
    when its new tokens end with one of `stop_token_sequences` (both kept in the output); after
    that it is padded with pad_token_id. Greedy by default; `do_sample` samples after temperature /
    top_k / top_p; `num_beams > 1` is beam search (with `do_sample`, beam sampling as in Lynx's
    open-ended generation). input_ids give the context of repetition penalty and no-repeat n-gram.
    """
    state = start_decoding(language_model, input_ids, inputs_embeds, attention_mask, max_new_tokens, min_new_tokens,
                           do_sample, temperature, top_k, top_p, no_repeat_ngram_size, repetition_penalty,
                           eos_token_id, stop_token_sequences, pad_token_id)
    if num_beams > 1:
        return beam_search(**state, num_beams=num_beams, length_penalty=length_penalty)
    return sample_or_greedy(**state)


def start_decoding(language_model: LanguageModel, input_ids: torch.Tensor | None,
                   inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None, max_new_tokens: int,
                   min_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                   no_repeat_ngram_size: int, repetition_penalty: float, eos_token_id: int | list[int] | None,
                   stop_token_sequences: list[list[int]] | None, pad_token_id: int | None) -> dict:
    """Run the prompt through the model once (prefill, filling the KV cache) and gather what every
    search needs: the keyword arguments of sample_or_greedy and beam_search."""
    config = language_model.config
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else int(eos_ids[0])
    reference = inputs_embeds if inputs_embeds is not None else input_ids
    batch, prompt_length = reference.shape[:2]
    device = reference.device
    eos_ids = eos_ids.to(device)
    stop_sequences = [torch.tensor(s, device=device) for s in stop_token_sequences or []]
    if attention_mask is None:
        attention_mask = torch.ones(batch, prompt_length, dtype=torch.long, device=device)
    # Context for the penalties: prompt ids, with padding (and ids outside the vocabulary, e.g.
    # the image token of original LLaVA) mapped to the scratch id vocab_size.
    context = torch.full((batch, prompt_length), config.vocab_size, dtype=torch.long, device=device)
    if input_ids is not None:
        context = torch.where(attention_mask.bool() & (input_ids < config.vocab_size), input_ids, context)

    def process(logits: torch.Tensor, history: torch.Tensor, step: int) -> torch.Tensor:
        """Penalties and the min-new-tokens rule on fp32 scores (logits, or log-probs for beams)."""
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, repetition_penalty)
        if no_repeat_ngram_size > 0:
            logits = ban_repeated_ngrams(logits, history, no_repeat_ngram_size)
        if step < min_new_tokens:
            logits = logits.index_fill(1, eos_ids, -math.inf)
        return logits

    cache = KVCache(config, batch, prompt_length + max_new_tokens,
                    language_model.lm_head.weight.dtype, device)
    # The mask grows by one column per step; preallocating it keeps steps free of concatenation.
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, max_new_tokens).long()], dim=1)
    logits = language_model(input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
                            attention_mask=full_mask[:, :prompt_length], cache=cache, last_logits_only=True)[:, -1]
    return dict(language_model=language_model, cache=cache, full_mask=full_mask, first_logits=logits.float(),
                context=context, process=process, eos_ids=eos_ids, stop_sequences=stop_sequences,
                max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, do_sample=do_sample,
                temperature=temperature, top_k=top_k, top_p=top_p)


def decode_step(language_model: LanguageModel, cache: KVCache, full_mask: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """Feed one new token per row, return fp32 next-token logits (rows, vocab)."""
    mask = full_mask[:, :cache.length + 1]
    return language_model(tokens[:, None], attention_mask=mask, cache=cache)[:, -1].float()


def sample_or_greedy(language_model, cache, full_mask, first_logits, context, process, eos_ids, stop_sequences,
                     max_new_tokens, pad_token_id, do_sample, temperature, top_k, top_p) -> torch.Tensor:
    """Greedy (argmax) or sampled decoding, one row per prompt."""
    batch = first_logits.shape[0]
    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=first_logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=first_logits.device)
    logits = first_logits
    for step in range(max_new_tokens):
        scores = process(logits, torch.cat([context, generated[:, :step]], dim=1), step)
        if do_sample:
            probabilities = apply_sampling_filters(scores, temperature, top_k, top_p).softmax(-1)
            next_tokens = torch.multinomial(probabilities, 1)[:, 0]
        else:
            next_tokens = scores.argmax(-1)
        generated[:, step] = next_tokens.masked_fill(finished, pad_token_id)
        finished |= torch.isin(next_tokens, eos_ids) | ends_with_any(generated[:, :step + 1], stop_sequences)
        if finished.all() or step == max_new_tokens - 1:
            return generated[:, :step + 1]
        logits = decode_step(language_model, cache, full_mask, generated[:, step])
    return generated


def beam_search(language_model, cache, full_mask, first_logits, context, process, eos_ids, stop_sequences,
                max_new_tokens, pad_token_id, do_sample, temperature, top_k, top_p, num_beams,
                length_penalty) -> torch.Tensor:
    """Beam search with transformers' rules (generation/utils.py `_beam_search`, early_stopping=False):

    - each step scores every beam's continuations by summed log-probabilities and keeps the best
      `keep = max(2, 1 + number of EOS ids) * num_beams` (sampled without replacement when
      do_sample), so that num_beams unfinished ones survive even if the best ones end;
    - a candidate ending (EOS, stop sequence, or max_new_tokens reached) among the top num_beams
      enters the finished list with score = sum of log-probs / new_length ** length_penalty;
    - a prompt stops when no candidate is running or when its best running beam, normalized at
      the current length, cannot beat its worst finished one while all num_beams are finished;
    - the answer is the best finished hypothesis.
    """
    batch = first_logits.shape[0]
    vocab = first_logits.shape[-1]
    device = first_logits.device
    keep = max(2, 1 + len(eos_ids)) * num_beams
    in_top_beams = torch.arange(keep, device=device) < num_beams
    rows = torch.arange(batch, device=device)[:, None] * num_beams  # first flat row of each prompt
    cache.repeat_rows(num_beams)
    full_mask = full_mask.repeat_interleave(num_beams, dim=0)
    context = context.repeat_interleave(num_beams, dim=0)
    logits = first_logits.repeat_interleave(num_beams, dim=0)

    running = torch.full((batch, num_beams, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: let only the first one expand at step 0
    best = running.clone()
    best_scores = torch.full((batch, num_beams), -1e9, device=device)
    best_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    best_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for step in range(max_new_tokens):
        log_probs = process(logits.log_softmax(-1), torch.cat([context, running.flatten(0, 1)[:, :step]], 1), step)
        if do_sample:
            log_probs = apply_sampling_filters(log_probs, temperature, top_k, top_p)
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[..., None]).view(batch, -1)
        if do_sample:
            candidates = torch.multinomial(totals.softmax(-1), keep)
            candidate_scores = totals.gather(1, candidates)
        else:
            candidate_scores, candidates = totals.topk(keep, dim=-1)
        parents = candidates // vocab
        candidate_tokens = running.gather(1, parents[..., None].expand(-1, -1, max_new_tokens)).clone()
        candidate_tokens[:, :, step] = candidates % vocab
        new_tokens = candidate_tokens[:, :, :step + 1].flatten(0, 1)
        ended = (torch.isin(candidates % vocab, eos_ids)
                 | ends_with_any(new_tokens, stop_sequences).view(batch, keep)
                 | (step == max_new_tokens - 1))

        # Running beams: the best candidates that did not end.
        survivors = (candidate_scores - 1e9 * ended).topk(num_beams, dim=-1).indices
        running = candidate_tokens.gather(1, survivors[..., None].expand(-1, -1, max_new_tokens))
        running_scores = (candidate_scores - 1e9 * ended).gather(1, survivors)
        source_rows = (parents.gather(1, survivors) + rows).flatten()

        # Finished hypotheses: merge the ones that just ended with the best so far.
        normalized = candidate_scores / (step + 1) ** length_penalty
        eligible = ended & in_top_beams & improvable
        normalized = normalized - 1e9 * ~eligible
        merged = torch.cat([best_scores, normalized], 1).topk(num_beams, dim=-1).indices
        best = torch.cat([best, candidate_tokens], 1).gather(1, merged[..., None].expand(-1, -1, max_new_tokens))
        best_scores = torch.cat([best_scores, normalized], 1).gather(1, merged)
        best_lengths = torch.cat([best_lengths, torch.full_like(ended, step + 1, dtype=torch.long)], 1).gather(1, merged)
        best_finished = torch.cat([best_finished, eligible], 1).gather(1, merged)

        best_possible = running_scores[:, :1] / (step + 1) ** length_penalty
        worst_finished = torch.where(best_finished, best_scores.min(1, keepdim=True).values, -1e9)
        improvable &= (best_possible > worst_finished).any(-1, keepdim=True)
        if not improvable.any() or ended.all() or step == max_new_tokens - 1:
            break
        cache.reorder(source_rows)
        logits = decode_step(language_model, cache, full_mask, running[:, :, step].flatten())
    return best[:, 0, :int(best_lengths[:, 0].max())]


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints

# One table per layout: (checkpoint key prefix, our key prefix), first match wins. CLIP's own
# renames inside the vision tower (out_proj -> o_proj) come from vision.py's CLIP table.

# LlamaForCausalLM: our LanguageModel uses its names.
LLAMA_LAYOUT = (("model.", "model."), ("lm_head.", "lm_head."))
# llava-hf on disk: the hub's llava-1.5-*-hf checkpoints (CLIPVisionModel keeps `vision_model.`);
# our save_pretrained writes this one.
LLAVA_HF_LAYOUT = (
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
)
# What transformers 5 `save_pretrained` writes: the same, but CLIPVisionModel lost its `vision_model.` level.
TRANSFORMERS5_SAVED_LAYOUT = (("vision_tower.", "vision_tower."),) + LLAVA_HF_LAYOUT[1:]
# transformers 5 in memory (LlavaForConditionalGeneration.state_dict()): the LLaMA body without
# its "model." level under `model.language_model.`, the head at the root.
TRANSFORMERS5_MEMORY_LAYOUT = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Original LLaVA (haotian-liu/LLaVA): a LlamaForCausalLM whose `model.` also holds the projector
# (`mm_projector.0/2` = LLaVA-1.5's Sequential(Linear, GELU, Linear); bare `mm_projector` =
# LLaVA v1's Linear) and, in some checkpoints, the CLIP tower; usually the tower comes from a
# separate CLIP checkpoint.
ORIGINAL_LLAVA_LAYOUT = (
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_projector.", "multi_modal_projector.linear_1."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# How each layout is recognised: a key prefix only it has, checked in this order.
LLAVA_LAYOUTS = {
    "llava-hf (vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*)":
        ("vision_tower.vision_model.", LLAVA_HF_LAYOUT),
    "transformers 5 in memory (model.vision_tower.*, model.language_model.*, lm_head.weight)":
        ("model.vision_tower.embeddings.", TRANSFORMERS5_MEMORY_LAYOUT),
    "transformers 5 save_pretrained (vision_tower.embeddings.*, language_model.model.*)":
        ("vision_tower.embeddings.", TRANSFORMERS5_SAVED_LAYOUT),
    "original LLaVA (model.* LLaMA, model.mm_projector.*, lm_head.weight) + a CLIP checkpoint":
        ("model.mm_projector.", ORIGINAL_LLAVA_LAYOUT),
}


def rename_keys(state: dict[str, torch.Tensor], layout: tuple[tuple[str, str], ...],
                reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename by the first matching prefix of `layout` (ours -> theirs with reverse). Keys matching
    no prefix keep their name, so the strict loader reports them as unexpected."""
    pairs = [(ours, theirs) for theirs, ours in layout] if reverse else layout
    renamed = {}
    for key, value in state.items():
        source, target = next(((a, b) for a, b in pairs if key.startswith(a)), ("", ""))
        renamed[target + key[len(source):]] = value
    return renamed


def load_state(model: nn.Module, state: dict[str, torch.Tensor], layout: tuple[tuple[str, str], ...],
               source: str) -> None:
    """Rename a checkpoint to our keys and load it strictly (every bad key named, no partial load).
    A tied head is absent from transformers checkpoints; it is the embedding."""
    state = vision_keys_converted(rename_keys(state, layout), clip_state_to_ours)
    for name, module in model.named_modules():
        if isinstance(module, LanguageModel) and module.config.tie_word_embeddings:
            prefix = f"{name}." if name else ""
            if prefix + "model.embed_tokens.weight" in state:
                state.setdefault(prefix + "lm_head.weight", state[prefix + "model.embed_tokens.weight"])
    load_state_strict(model, state, source)


def save_state(model: nn.Module, layout: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Our state in a checkpoint layout. LoRA factors are merged into the base weights (a plain
    checkpoint any loader reads); a tied head is dropped, as transformers does."""
    state = merged_state_dict(model)
    for name, module in model.named_modules():
        if isinstance(module, LanguageModel) and module.config.tie_word_embeddings:
            state.pop(f"{name}.lm_head.weight" if name else "lm_head.weight")
    return rename_keys(vision_keys_converted(state, our_state_to_clip), layout, reverse=True)


def vision_keys_converted(state: dict[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """Apply vision.py's CLIP key table to the vision tower's keys only (LLaMA has its own o_proj)."""
    vision = {key: value for key, value in state.items() if key.startswith("vision_tower.")}
    return {**{key: value for key, value in state.items() if key not in vision}, **convert(vision)}


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all tensors) of a checkpoint directory (single or sharded safetensors)."""
    return read_config_json(path), load_safetensors(path)


def write_checkpoint(path: str, config: dict, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors, each written atomically."""
    dtype = next(iter(state.values())).dtype
    write_config_json({**config, "dtype": str(dtype).removeprefix("torch.")}, path)
    save_safetensors(state, os.path.join(path, WEIGHTS_NAME))


def build_without_init(module_class: type[nn.Module], config, dtype: torch.dtype) -> nn.Module:
    """A model whose weights will all be overwritten by a checkpoint: built on the meta device and
    then given uninitialized storage, which skips a random initialization that for a 7B model
    costs longer than the load itself. Modules here hold no buffers that need init."""
    with torch.device("meta"):
        model = module_class(config)
    model = model.to_empty(device="cpu").to(dtype)
    for module in model.modules():  # to_empty gives each module its own storage, untying the head
        if isinstance(module, LanguageModel):
            module.tie_weights()
    return model


def llava_hf_config_to_ours(values: dict) -> MLLMConfig:
    """MLLMConfig from a llava-hf config.json. Fields transformers' LlavaConfig lacks
    (projector_type, image_aspect_ratio) are our extra keys; without them the llava-hf projector
    is LLaVA-1.5's MLP and the aspect ratio LLaVA-1.5's padding."""
    if values.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {values['projector_hidden_act']!r} is not supported (only gelu)")
    if not isinstance(values.get("vision_feature_layer", -2), int):
        raise ValueError("vision_feature_layer must be one layer index (several layers are not supported)")
    text_config = TextConfig.from_dict(values.get("text_config", {}))
    return MLLMConfig(
        vision_config=VisionConfig.from_dict(values.get("vision_config", {})),
        text_config=text_config,
        projector_type=values.get("projector_type", "mlp2x_gelu"),
        image_token_index=values.get("image_token_index", values.get("image_token_id", 32000)),
        pad_token_id=values.get("pad_token_id", text_config.pad_token_id if text_config.pad_token_id is not None
                                else 32001),
        vision_feature_layer=values.get("vision_feature_layer", -2),
        vision_feature_select_strategy=values.get("vision_feature_select_strategy", "default"),
        image_aspect_ratio=values.get("image_aspect_ratio", "pad"),
    )


def our_config_to_llava_hf(config: MLLMConfig) -> dict:
    """A config.json transformers' LlavaForConditionalGeneration reads (it keeps our extra keys)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": config.vision_config.to_dict(),
        "text_config": {**config.text_config.to_dict(), "pad_token_id": config.pad_token_id},
        "image_token_index": config.image_token_index, "pad_token_id": config.pad_token_id,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "image_seq_length": config.num_image_tokens,
        "tie_word_embeddings": config.text_config.tie_word_embeddings,
        "projector_type": config.projector_type, "image_aspect_ratio": config.image_aspect_ratio,
    }


def original_llava_config_to_ours(values: dict, vision_config: VisionConfig) -> MLLMConfig:
    """MLLMConfig from an original LLaVA config.json: LlamaConfig fields plus mm_* fields. Its
    image token never enters the vocabulary (LLaVA splices features at the id -200), so ours is
    vocab_size, an id that is never embedded; padding uses <unk> = 0 as LLaVA's vicuna_v1 does."""
    text_config = TextConfig.from_dict(values)
    feature = values.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    return MLLMConfig(
        vision_config=vision_config, text_config=text_config,
        projector_type=values.get("mm_projector_type", "linear"),
        image_token_index=text_config.vocab_size,
        pad_token_id=values["pad_token_id"] if values.get("pad_token_id") is not None else 0,
        vision_feature_layer=values.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        image_aspect_ratio="pad" if values.get("image_aspect_ratio") == "pad" else "square",
    )


def detect_layout(state: dict[str, torch.Tensor], path: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(name, table) of the LLAVA_LAYOUTS entry whose marker prefix occurs in the checkpoint."""
    for name, (marker, layout) in LLAVA_LAYOUTS.items():
        if any(key.startswith(marker) for key in state):
            return name, layout
    understood = "\n".join(f"  {name}" for name in LLAVA_LAYOUTS)
    example = ", ".join(sorted(state)[:5])
    raise ValueError(f"{path}: unknown checkpoint layout (first keys: {example}); understood layouts:\n{understood}")
