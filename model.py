"""The language models and the one MLLM class: image tokens in, logits out.

LLaVA (the dissertation, section 3.4, Figure 3.1 and eq. 3.1): an image X_v goes through the
CLIP encoder g (vision.py), a connector W maps its grid features Z_v to word-embedding width
(H_v = W . Z_v; connectors.py), and the LLM f_phi (Vicuna = LLaMA, this file) reads H_v in place
of the image tokens and predicts the answer autoregressively (eq. 3.3). LLaVA-1.5 (section 4.3)
changes W to a two-layer MLP, uses the 336 px encoder and its layer -2 features.

Reading order of this file:
1. TextConfig and the LLaMA decoder (layers.py's pre-LN block with RMSNorm, rotary positions,
   SwiGLU and GQA); LanguageModel = decoder + head in the LlamaForCausalLM key layout, with the
   three methods decoding.py's searches call (new_cache, prefill, decode_step);
2. T5Config and T5 v1.1 / Flan-T5 (the same blocks, with relative position buckets, unscaled
   attention, GeGLU and cross-attention in the decoder): T5LanguageModel, the encoder-decoder LLM
   of BLIP-2-FlanT5, InstructBLIP-FlanT5 and LION, with the same three methods;
3. MLLMConfig and MLLM: vision tower -> connector -> features written into the image-token
   positions -> the LLM (for T5, its encoder);
4. checkpoints: loading and saving through checkpoints.py's layout tables, and the config.json
   translations of llava-hf, BLIP-2 / InstructBLIP and original LLaVA.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import decoding
from adapters import insert_output_adapters, insert_parallel_adapters, merged_state_dict, set_task_level
from checkpoints import (BLIP2_LAYOUT, INSTRUCTBLIP_LAYOUT, LION_LAYOUT, LLAMA_LAYOUT, LLAVA_HF_LAYOUT, LYNX_LAYOUT,
                         LYRICS_LAYOUT, MLLM_LAYOUTS, ORIGINAL_LLAVA_LAYOUT, T5_LAYOUT, JsonConfig, Layout,
                         blip2_config_fields, without_refiner_models,
                         blip2_config_json, detect_layout, fitted_to_release, llava_hf_config_fields,
                         llava_hf_config_json, load_over, load_state_strict, lynx_config_fields, lynx_config_json,
                         original_llava_config_fields, read_checkpoint, read_config_json, state_to_ours,
                         state_to_theirs, t5_head_tying, write_checkpoint)
from connectors import (HighResolution, LIONConnector, PerceiverResampler, QFormerConfig, ResamplerConfig,
                        VisionAggregatorConfig, bert_initialization, build_connector)
from layers import (IGNORE_INDEX, Attention, GatedFeedForward, PreNormBlock, RMSNorm, activation_named, additive_mask,
                    causal_attention_mask, positions_in_samples, relative_position_buckets, rotary_cos_sin,
                    shifted_cross_entropy, supervised_cross_entropy)
from pretraining import load_stage1
from vision import VisionConfig, VisionTransformer, vision_config_from_dict


# ----------------------------------------------------------------------------------------------
# 1. The LLaMA decoder

@dataclass
class TextConfig(JsonConfig):
    """LLaMA / Vicuna dimensions. Field names are transformers' LlamaConfig's so config.json maps 1:1;
    the defaults are Vicuna-7B v1.5's."""
    model_type: ClassVar[str] = "llama"
    is_encoder_decoder: ClassVar[bool] = False
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
        if config.get("model_type") == "t5":
            raise ValueError("text config: model_type 't5' is not a LLaMA-family decoder (it loads as model.T5LanguageModel)")
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


def llama_block(config: TextConfig) -> PreNormBlock:
    """One LLaMA decoder layer: RMSNorm, bias-free GQA attention with rotary positions, RMSNorm,
    SwiGLU (Touvron et al. 2023, section 2.2). Submodule names are LlamaDecoderLayer's."""
    return PreNormBlock(
        Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                  head_dim=config.head_dim, bias=False),
        GatedFeedForward(config.hidden_size, config.intermediate_size, "silu"),
        RMSNorm(config.hidden_size, config.rms_norm_eps), RMSNorm(config.hidden_size, config.rms_norm_eps))


class LanguageModel(nn.Module):
    """LLaMA decoder with its language-model head: transformers' LlamaForCausalLM, same state-dict
    keys (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`)."""
    embedding_key: ClassVar[str] = "model.embed_tokens.weight"  # what a tied head is, in a checkpoint

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(llama_block(config) for _ in range(config.num_hidden_layers)),
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

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: decoding.KVCache | None = None,
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
                position_ids = positions_in_samples(attention_mask)[:, -length:]
        rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask, is_causal = causal_attention_mask(attention_mask, length, past_length)
        for index, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, is_causal, rotary, layer_cache, use_reentrant=False)
            else:
                x = layer(x, attn_mask, is_causal, rotary, layer_cache)
        x = self.model.norm(x)
        logits = self.lm_head(x[:, -1:] if last_logits_only else x)
        if labels is None:
            return logits
        return logits, shifted_cross_entropy(x, labels, self.lm_head)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the vocabulary (new special tokens such as <image> / <pad>). New rows start at the
        mean of the existing ones, as LLaVA's `smart_tokenizer_and_embedding_resize` does, so a
        new token's first logits are ordinary instead of random."""
        self.model.embed_tokens.weight = grown_rows(self.model.embed_tokens.weight, vocab_size)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = grown_rows(self.lm_head.weight, vocab_size)
        self.model.embed_tokens.num_embeddings = self.lm_head.out_features = self.config.vocab_size = vocab_size

    def new_cache(self, batch: int, max_length: int, device: torch.device) -> decoding.KVCache:
        config = self.config
        return decoding.KVCache(config.num_hidden_layers, batch, config.num_key_value_heads, max_length,
                                config.head_dim, self.lm_head.weight.dtype, device)

    def prefill(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                attention_mask: torch.Tensor, cache: decoding.KVCache) -> torch.Tensor:
        """The prompt once, filling the cache; next-token logits of its last position (B, vocab)."""
        return self(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                    last_logits_only=True)[:, -1]

    def decode_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                    cache: decoding.KVCache) -> torch.Tensor:
        """One new token per row (B,); next-token logits (B, vocab). The mask covers the cache too."""
        return self(tokens[:, None], attention_mask=attention_mask, cache=cache)[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """New tokens only, (batch, new_length); options: decoding.DecodingOptions."""
        return decoding.generate(self, input_ids, inputs_embeds, attention_mask, **options)

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


def grown_rows(weight: nn.Parameter, vocab_size: int) -> nn.Parameter:
    """An embedding or head matrix with rows added up to vocab_size, each the mean of the old ones."""
    old_size = weight.shape[0]
    if vocab_size < old_size:
        raise ValueError(f"resize_token_embeddings only grows the vocabulary ({old_size} -> {vocab_size})")
    new = weight.data.new_empty(vocab_size, weight.shape[1])
    new[:old_size] = weight.data
    new[old_size:] = weight.data.mean(0)
    return nn.Parameter(new, requires_grad=weight.requires_grad)


# ----------------------------------------------------------------------------------------------
# 2. T5: the encoder-decoder LLM of BLIP-2-FlanT5, InstructBLIP-FlanT5 and LION

@dataclass
class T5Config(JsonConfig):
    """T5 v1.1 / Flan-T5 dimensions (Raffel et al. 2020; Chung et al. 2022). Field names are
    transformers' T5Config's so config.json maps 1:1; the defaults are Flan-T5-XL's."""
    model_type: ClassVar[str] = "t5"
    is_encoder_decoder: ClassVar[bool] = True
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64  # head width; need not be d_model / num_heads
    d_ff: int = 5120
    num_layers: int = 24  # encoder
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1's GeGLU; the original T5's "relu" is not implemented
    dense_act_fn: str | None = None  # None = what feed_forward_proj says ("gelu_new"); BLIP-2 and LION set "gelu"
    tie_word_embeddings: bool = False  # v1.1 / Flan-T5 have their own head; the original T5 shares it
    scale_decoder_outputs: bool | None = None  # d_model**-0.5 before the head; None = tie_word_embeddings
    decoder_start_token_id: int = 0  # T5 starts decoding from <pad>
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1

    def __post_init__(self):
        if not self.feed_forward_proj.startswith("gated-"):
            raise ValueError(f"text config: feed_forward_proj={self.feed_forward_proj!r} is not supported "
                             f"(only the gated feed-forward of T5 v1.1 / Flan-T5, 'gated-gelu')")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.dense_act_fn is None:
            activation = self.feed_forward_proj.removeprefix("gated-")
            self.dense_act_fn = "gelu_new" if activation == "gelu" else activation  # transformers' legacy rule
        activation_named(self.dense_act_fn)
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def hidden_size(self) -> int:
        """The width the connectors project to (the encoder's input embeddings)."""
        return self.d_model

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        """From a T5Config dict (config.json); missing fields take transformers' T5Config defaults
        (t5-small's), which is what they mean there."""
        t5_defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                           feed_forward_proj="relu", tie_word_embeddings=True)
        values = {**t5_defaults, **{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}}
        return cls(**values)


def t5_block(config: T5Config, cross_attention: bool) -> PreNormBlock:
    """One T5 layer (Raffel et al. 2020, sec. 2.1): RMSNorm ("simplified layer normalization ...
    no additive bias"), bias-free attention with no 1/sqrt(d) scale (Mesh TensorFlow folds it into
    the initialization), in the decoder a cross-attention on the encoder output, and the gated
    feed-forward wo(act(wi_0 x) * wi_1 x) of T5 v1.1."""
    def attention() -> Attention:
        return Attention(config.d_model, config.num_heads, head_dim=config.d_kv, bias=False, scale=1.0)

    def norm() -> RMSNorm:
        return RMSNorm(config.d_model, config.layer_norm_epsilon)

    return PreNormBlock(attention(), GatedFeedForward(config.d_model, config.d_ff, config.dense_act_fn), norm(), norm(),
                        cross_attn=attention() if cross_attention else None,
                        cross_attn_layernorm=norm() if cross_attention else None)


class T5Stack(nn.Module):
    """T5's encoder (bidirectional) or decoder (causal, cross-attending): layers, a final RMSNorm,
    and one relative position bias table per stack, computed once and added in every layer (the
    hub layout keeps it in the first layer, `block.0.layer.0.SelfAttention.relative_attention_bias`)."""

    def __init__(self, config: T5Config, num_layers: int, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        self.layers = nn.ModuleList(t5_block(config, cross_attention=is_decoder) for _ in range(num_layers))
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """(1, nh, T, S): the learned scalar of each (query, key) offset's bucket, per head."""
        offsets = torch.arange(key_length, device=query_positions.device)[None, :] - query_positions[:, None]
        buckets = relative_position_buckets(offsets, not self.is_decoder, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                cache: decoding.EncoderDecoderCache | None = None, checkpointing: bool = False) -> torch.Tensor:
        """x: (B, T, d_model) embeddings. Encoder: attention_mask (B, T), 1 = real token. Decoder:
        causal; `context` (B, S, d_model) is the encoder output and context_mask (B, S) its
        padding, or, while decoding, the cache holds both (its cross-attention keys / values)."""
        past_length = cache.length if cache is not None else 0
        length = x.shape[1]
        query_positions = torch.arange(past_length, past_length + length, device=x.device)
        bias = self.position_bias(query_positions, past_length + length).to(x.dtype)  # (1, nh, T, S)
        mask = None  # one new token with a cache may see every key: no mask
        if self.is_decoder:
            if length > 1:
                mask = torch.arange(past_length + length, device=x.device)[None, :] <= query_positions[:, None]
            if cache is not None:
                context_mask = cache.encoder_mask
            elif context_mask is not None:
                context_mask = context_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        elif attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        if mask is not None:  # once for all layers, not in each layer's attention
            bias = bias + additive_mask(mask, x.dtype)
        for index, layer in enumerate(self.layers):
            arguments = dict(position_bias=bias, context=context, context_mask=context_mask)
            if cache is not None:
                arguments.update(cache=cache.layers[index], context_keys_values=cache.cross_keys_values[index])
            if checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False, **arguments)
            else:
                x = layer(x, **arguments)
        return self.norm(x)


class T5LanguageModel(nn.Module):
    """T5 v1.1 / Flan-T5 with its head: transformers' T5ForConditionalGeneration. The encoder reads
    the prompt (in an MLLM: the visual tokens, then the text), the decoder writes the answer from
    `decoder_start_token_id`, cross-attending to the encoder's output. The three decoding methods
    are LanguageModel's: prefill runs the encoder once and keeps each decoder layer's
    cross-attention keys / values in the cache."""
    embedding_key: ClassVar[str] = "shared.weight"

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, config.num_layers, is_decoder=False)
        self.decoder = T5Stack(config, config.num_decoder_layers, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def _init_weights(self, module: nn.Module) -> None:
        """Mesh TensorFlow's initialization (transformers' T5PreTrainedModel): every matrix normal
        with std = fan_in**-0.5 (the queries' also folds in the missing 1/sqrt(d_kv)), embeddings
        std 1 (the head too, untied), so training from scratch (the shapes world) starts where T5 did."""
        config = self.config
        if module is self.shared or (module is self.lm_head and not config.tie_word_embeddings):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, T5Stack):
            nn.init.normal_(module.relative_attention_bias.weight, std=config.d_model ** -0.5)
        elif isinstance(module, Attention):
            nn.init.normal_(module.q_proj.weight, std=(config.d_model * config.d_kv) ** -0.5)
            for linear in (module.k_proj, module.v_proj):
                nn.init.normal_(linear.weight, std=config.d_model ** -0.5)
            nn.init.normal_(module.o_proj.weight, std=(config.num_heads * config.d_kv) ** -0.5)
        elif isinstance(module, GatedFeedForward):
            for linear in (module.gate_proj, module.up_proj):
                nn.init.normal_(linear.weight, std=config.d_model ** -0.5)
            nn.init.normal_(module.down_proj.weight, std=config.d_ff ** -0.5)

    def input_embeddings(self) -> nn.Embedding:
        return self.shared

    def encode(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, d_model)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        return self.encoder(x, attention_mask=attention_mask, checkpointing=self.gradient_checkpointing)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_output: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               cache: decoding.EncoderDecoderCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d_model), rescaled for a tied head."""
        x = self.decoder(self.shared(decoder_input_ids), context=encoder_output, context_mask=attention_mask,
                         cache=cache, checkpointing=self.gradient_checkpointing)
        return x * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else x

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels: the start token, then the labels but the last, ignored
        positions read as <pad> (teacher forcing, as T5ForConditionalGeneration._shift_right)."""
        shifted = F.pad(labels[:, :-1], (1, 0), value=self.config.decoder_start_token_id)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits (B, T, vocab), or (logits, loss) with labels. Labels are the decoder's
        targets, aligned with its positions (no shift); without decoder_input_ids they are
        `shift_right(labels)`."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 needs decoder_input_ids or labels (the decoder's inputs are the shifted labels)")
            decoder_input_ids = self.shift_right(labels)
        encoder_output = self.encode(input_ids, inputs_embeds, attention_mask)
        hidden = self.decode(decoder_input_ids, encoder_output, attention_mask)
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        return logits, supervised_cross_entropy(hidden, labels, self.lm_head)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the vocabulary, new rows at the mean (LanguageModel.resize_token_embeddings)."""
        self.shared.weight = grown_rows(self.shared.weight, vocab_size)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        else:
            self.lm_head.weight = grown_rows(self.lm_head.weight, vocab_size)
        self.shared.num_embeddings = self.lm_head.out_features = self.config.vocab_size = vocab_size

    def new_cache(self, batch: int, max_length: int, device: torch.device) -> decoding.EncoderDecoderCache:
        config = self.config
        return decoding.EncoderDecoderCache(decoding.KVCache(
            config.num_decoder_layers, batch, config.num_heads, max_length, config.d_kv, self.lm_head.weight.dtype,
            device))

    def prefill(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                attention_mask: torch.Tensor, cache: decoding.EncoderDecoderCache) -> torch.Tensor:
        """Encode the prompt once, keep its cross-attention keys / values, and decode the start
        token: the first answer token's logits (B, vocab)."""
        encoder_output = self.encode(input_ids, inputs_embeds, attention_mask)
        cache.encoder_mask = attention_mask.bool()[:, None, None, :]
        cache.cross_keys_values = [layer.cross_attn.project_keys_values(encoder_output) for layer in self.decoder.layers]
        start = torch.full((encoder_output.shape[0],), self.config.decoder_start_token_id, device=encoder_output.device)
        return self.decode_step(start, attention_mask, cache)

    def decode_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                    cache: decoding.EncoderDecoderCache) -> torch.Tensor:
        """One new token per row (B,), next-token logits (B, vocab). The mask is not needed: every
        row's answer starts at the same decoder position, so the decoder has no padding."""
        return self.lm_head(self.decode(tokens[:, None], cache=cache))[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """The answer's tokens (B, new_length), without the start token; options: decoding.DecodingOptions."""
        return decoding.generate(self, input_ids, inputs_embeds, attention_mask, **options)

    @classmethod
    def from_pretrained(cls, path: str) -> "T5LanguageModel":
        """A T5ForConditionalGeneration checkpoint directory (config.json + safetensors)."""
        values, state = read_checkpoint(path)
        model = build_without_init(cls, T5Config.from_dict(t5_head_tying(values, state, "")), torch.float32)
        load_state(model, state, T5_LAYOUT, path)
        return model

    def save_pretrained(self, path: str) -> None:
        """T5ForConditionalGeneration layout; transformers loads it."""
        config = {**self.config.to_dict(), "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}
        write_checkpoint(path, config, save_state(self, T5_LAYOUT))


# ----------------------------------------------------------------------------------------------
# 3. The multimodal model

@dataclass
class MLLMConfig:
    """The composition: vision tower, connector, LLM. Field names follow transformers' LlavaConfig
    (and Blip2Config for the Q-Former's) where it has them."""
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig | T5Config = field(default_factory=TextConfig)  # LLaMA, or T5 (encoder-decoder)
    # LLaVA-1.5's "mlp2x_gelu" (section 4.3); "linear" = LLaVA (eq. 3.1); "qformer" = BLIP-2 /
    # InstructBLIP (qformer_config.use_qformer_text_input), which read the tower their own way.
    projector_type: str = "mlp2x_gelu"
    qformer_config: QFormerConfig | None = None
    num_query_tokens: int = 32  # BLIP-2, sec. 3.1: 32 queries of 768
    # Lyrics (sec. 3.1): the MQ-Former, a "qformer" whose last `num_grounding_queries` queries
    # read the visual refiner's objects (refiner.py) beside the visual ones; `spatial_prompt`: the
    # objects' spatial representation also goes before each image's first question (sec. 3.3).
    num_grounding_queries: int = 0
    spatial_prompt: bool = False
    image_token_index: int = 32000  # llava-1.5-hf; an id >= the vocabulary is fine, it is never embedded
    pad_token_id: int = 32001
    vision_feature_layer: int = -2  # LLaVA-1.5; -1 = last layer (LLaVA's ablation, 0.96 points worse)
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    # "pad" (LLaVA-1.5 stage 2), "square" (CLIP center crop) or "anyres": LLaVA-NeXT (section 4.5) and
    # LLaVA-1.5-HD (section 4.3) tile each image into the best of `image_grid_pinpoints` (height,
    # width); `mm_patch_merge_type` "spatial_unpad" (NeXT) or "spatial" (1.5-HD): connectors.HighResolution.
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: list[list[int]] | None = None
    mm_patch_merge_type: str = "spatial_unpad"
    # LION (projector_type "lion"): the vision aggregator and which visual tokens the LLM reads;
    # `num_adapters` AdapterRouters beside every feed-forward of the LLM (0: none), without
    # `adapter_router` summed alone; `hint_token_index`: the token the soft prompt replaces.
    aggregator_config: VisionAggregatorConfig | None = None
    visual_input: str = "ALL"
    num_adapters: int = 0
    adapter_bottleneck: int = 64
    adapter_router: bool = True
    hint_token_index: int | None = None
    # Lynx (projector_type "resampler"): the Perceiver resampler's dims, and an OutputAdapter after
    # every `output_adapter_every`-th LLaMA layer, from layer 0 (Lynx: 2; 0: none).
    resampler_config: ResamplerConfig | None = None
    output_adapter_every: int = 0

    def __post_init__(self):
        """Nested configs may come as config.json dicts (checkpoints' translations): built here,
        the Q-Former's cross-attention as wide as the tower (transformers overwrites it too)."""
        if isinstance(self.vision_config, dict):
            self.vision_config = vision_config_from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            text_class = T5Config if self.text_config.get("model_type") == "t5" else TextConfig
            self.text_config = text_class.from_dict(self.text_config)
        if isinstance(self.qformer_config, dict):
            self.qformer_config = QFormerConfig.from_dict(
                {**self.qformer_config, "encoder_hidden_size": self.vision_config.hidden_size})
        if isinstance(self.aggregator_config, dict):
            self.aggregator_config = VisionAggregatorConfig.from_dict(self.aggregator_config)
        if isinstance(self.resampler_config, dict) or (self.projector_type == "resampler" and not self.resampler_config):
            self.resampler_config = ResamplerConfig.from_dict(self.resampler_config or {})
        self.check_image_aspect_ratio()

    def check_image_aspect_ratio(self) -> None:
        """AnyRes lays out the LLaVA connector's patch grid; its pinpoints must be whole tiles."""
        if self.image_aspect_ratio not in ("pad", "square", "anyres"):
            raise ValueError(f"image_aspect_ratio must be 'pad', 'square' or 'anyres', not {self.image_aspect_ratio!r}")
        if self.image_aspect_ratio != "anyres":
            return
        tile = self.vision_config.image_size
        if not self.image_grid_pinpoints:
            raise ValueError("image_aspect_ratio 'anyres' needs image_grid_pinpoints, [[height, width], ...]")
        uneven = [pinpoint for pinpoint in self.image_grid_pinpoints
                  if len(pinpoint) != 2 or pinpoint[0] % tile or pinpoint[1] % tile or min(pinpoint) <= 0]
        if uneven:
            raise ValueError(f"image_grid_pinpoints {uneven} are not [height, width] multiples of the tower's {tile} px")
        if self.mm_patch_merge_type not in ("spatial_unpad", "spatial"):
            raise ValueError(f"mm_patch_merge_type must be 'spatial_unpad' (LLaVA-NeXT) or 'spatial' (LLaVA-1.5-HD), "
                             f"not {self.mm_patch_merge_type!r}")
        if self.projector_type not in ("linear", "mlp2x_gelu") or self.vision_feature_select_strategy != "default":
            raise ValueError("image_aspect_ratio 'anyres' tiles the patch grid of LLaVA's connector: it needs "
                             "projector_type 'linear' or 'mlp2x_gelu' and vision_feature_select_strategy 'default', "
                             f"not {self.projector_type!r} and {self.vision_feature_select_strategy!r}")


class MLLM(nn.Module):
    """LLaVA: vision tower -> connector -> LLaMA, reading the projected features in place of the
    image tokens (section 3.4, Figure 3.1; LLaVA-1.5: section 4.3). The connector decides which
    tower features it reads and how many tokens it makes; `embed` is the same for every connector.
    BLIP-2 / InstructBLIP are the same class with EVA ViT-g and the Q-Former as the connector
    (Li et al. 2023, Figure 3: the query outputs are "soft visual prompts" before the text). With a
    T5 text config the LLM is an encoder-decoder (BLIP-2-FlanT5, Figure 3 bottom): the visual
    tokens and the prompt go into the encoder, the answer comes out of the decoder."""

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config.vision_config)
        self.multi_modal_projector = self.new_connector()
        self.language_model = language_model_class(config.text_config)(config.text_config)
        self.add_adapters()
        if config.hint_token_index is not None:  # LION's soft prompt (sec. 3.2, Fig. 5)
            self.soft_prompt_hint = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.high_resolution: HighResolution | None = None
        self.set_image_aspect_ratio(config.image_aspect_ratio)

    def set_image_aspect_ratio(self, image_aspect_ratio: str, image_grid_pinpoints: list[list[int]] | None = None,
                               mm_patch_merge_type: str | None = None) -> None:
        """How images are prepared, in the config (as LLaVA's train.py saves a stage's choice) and
        the model: "anyres" lays out the tiles (with the pinpoints and merge given, else the
        config's) and, with unpadding, adds a fresh `image_newline` unless there is one (LLaVA-NeXT
        starts from LLaVA-1.5's connector, trained at one tile)."""
        config = self.config
        config.image_aspect_ratio = image_aspect_ratio
        config.image_grid_pinpoints = image_grid_pinpoints or config.image_grid_pinpoints
        config.mm_patch_merge_type = mm_patch_merge_type or config.mm_patch_merge_type
        config.check_image_aspect_ratio()
        if image_aspect_ratio != "anyres":
            self.high_resolution = None
            if hasattr(self, "image_newline"):
                del self.image_newline
            return
        tower = config.vision_config
        self.high_resolution = HighResolution(tuple(map(tuple, config.image_grid_pinpoints)), tower.image_size,
                                              tower.image_size // tower.patch_size,
                                              unpad=config.mm_patch_merge_type == "spatial_unpad")
        if self.high_resolution.unpad and not hasattr(self, "image_newline"):
            self.image_newline = self.new_image_newline()
        elif not self.high_resolution.unpad and hasattr(self, "image_newline"):
            del self.image_newline

    def new_image_newline(self) -> nn.Parameter:
        """LLaVA-NeXT's learned row end, fresh: N(0, 1 / width), the scale of word embeddings."""
        width = self.config.text_config.hidden_size
        like = next(self.language_model.parameters())
        return nn.Parameter(torch.randn(width, device=like.device, dtype=like.dtype) / width ** 0.5)

    def new_connector(self) -> nn.Module:
        """A fresh connector of the config's kind (connectors.build_connector)."""
        config = self.config
        return build_connector(config.projector_type, config.vision_config, config.text_config.hidden_size,
                               config.vision_feature_layer, config.vision_feature_select_strategy,
                               config.qformer_config, config.num_query_tokens, config.aggregator_config,
                               config.visual_input, config.resampler_config, config.num_grounding_queries)

    def add_adapters(self) -> None:
        """Fresh adapters in the LLM, as the config asks: LION's AdapterRouters beside every
        feed-forward (both T5 stacks, or LLaMA's decoder layers; they change nothing until
        trained), Lynx's OutputAdapters after every `output_adapter_every`-th LLaMA layer."""
        if self.config.num_adapters:
            insert_parallel_adapters(self.language_model, [r"layers\.\d+$"], self.config.adapter_bottleneck,
                                     self.config.num_adapters, self.config.adapter_router)
        if self.config.output_adapter_every:
            if self.config.text_config.is_encoder_decoder:
                raise ValueError("output_adapter_every: Lynx's output adapters follow LLaMA decoder layers; this LLM is T5")
            insert_output_adapters(self.language_model, self.config.text_config.num_hidden_layers,
                                   self.config.output_adapter_every)

    def initialize_lion_parts(self) -> None:
        """What LION adds to InstructBLIP, fresh: the aggregator (its official initialization),
        its MLP (nn.Linear's), the adapters, and the soft prompt if the config has one."""
        connector = self.multi_modal_projector
        connector.vision_aggregator.initialize_weights()
        for linear in (connector.aggregator_projector.linear_1, connector.aggregator_projector.linear_2):
            linear.reset_parameters()
        self.add_adapters()
        if self.config.hint_token_index is not None:
            self.add_soft_prompt(self.config.hint_token_index)

    def add_soft_prompt(self, hint_token_index: int) -> None:
        """LION's soft prompt (sec. 3.2), fresh, for the token `hint_token_index`: drawn at the
        scale of the word embeddings it sits among (the official N(0, initializer_factor) is T5's)."""
        embeddings = self.language_model.input_embeddings().weight
        self.config.hint_token_index = hint_token_index
        self.soft_prompt_hint = nn.Parameter(torch.randn(embeddings.shape[1], device=embeddings.device,
                                                         dtype=embeddings.dtype) * float(embeddings.detach().std()))

    @property
    def num_image_tokens(self) -> int:
        return self.multi_modal_projector.num_image_tokens

    def image_features(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                       qformer_attention_mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                       object_features: torch.Tensor | None = None, object_mask: torch.Tensor | None = None,
                       ) -> torch.Tensor:
        """H_v of eq. 3.1: (num_images, num_image_tokens, text width). The tower runs only up to the
        layer the connector reads (LLaVA-1.5's layer -2: the last block would be wasted).
        InstructBLIP's Q-Former also reads each image's instruction (qformer_input_ids, one row per image).
        Lynx's resampler also reads videos, pixel_values (num_videos, frames, 3, H, W).
        AnyRes (LLaVA-NeXT, LLaVA-1.5-HD): pixel_values (num_images, max tiles, 3, H, W) with
        zero tiles after each image's own (LlavaNextImageProcessor's), image_sizes (num_images, 2)
        as (height, width); every image's tiles go through tower and connector in one batch, and
        the result is the images' packed tokens one after another, (total image tokens, text width).
        Lyrics' MQ-Former also reads each image's objects (object_features / object_mask, refiner.py)."""
        connector = self.multi_modal_projector
        self.check_instruction(qformer_input_ids, has_images=True)
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        frames = pixel_values.shape[1] if pixel_values.ndim == 5 and self.high_resolution is None else 0
        if frames and not isinstance(connector, PerceiverResampler):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} is a video; only Lynx's resampler reads videos")
        if self.high_resolution is not None:
            sizes = [tuple(size) for size in image_sizes.tolist()]
            tiles = [self.high_resolution.num_tiles(size) for size in sizes]
            pixels = torch.cat([image[:count] for image, count in zip(pixel_values, tiles)])
        else:
            pixels = pixel_values.flatten(0, 1) if frames else pixel_values
        hidden_states = self.vision_tower(pixels.to(dtype), num_layers=connector.num_vision_layers_used,
                                          normalize_last=connector.normalizes_last_layer)
        if self.high_resolution is not None:
            newline = getattr(self, "image_newline", None)
            return torch.cat([self.high_resolution.pack(image, size, newline)
                              for image, size in zip(connector(hidden_states).split(tiles), sizes)])
        if frames:  # each video's frames side by side: (videos, frames, tokens, width)
            return connector.project(connector.select_features(hidden_states).unflatten(0, (-1, frames)))
        objects = {"object_features": object_features, "object_mask": object_mask} \
            if getattr(connector, "num_grounding_queries", 0) else {}
        if not connector.takes_instruction:
            return connector(hidden_states, **objects)
        if qformer_input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"qformer_input_ids has {qformer_input_ids.shape[0]} rows but pixel_values "
                             f"{pixel_values.shape[0]} images (one instruction per image)")
        if isinstance(connector, LIONConnector):  # the Q-Former's ln_vision is the tower's final norm
            return connector(hidden_states, qformer_input_ids, qformer_attention_mask, self.vision_tower.post_layernorm)
        return connector(hidden_states, qformer_input_ids, qformer_attention_mask, **objects)

    def check_instruction(self, qformer_input_ids: torch.Tensor | None, has_images: bool) -> None:
        """InstructBLIP's Q-Former needs the instruction of every image; any other connector must
        not get one."""
        if self.multi_modal_projector.takes_instruction and has_images and qformer_input_ids is None:
            raise ValueError("qformer_input_ids is required: this model's Q-Former reads the instruction "
                             "(InstructBLIP), one row per image")
        if not self.multi_modal_projector.takes_instruction and qformer_input_ids is not None:
            raise ValueError(f"qformer_input_ids given, but this model's connector ({self.config.projector_type}"
                             f"{', BLIP-2' if self.config.projector_type == 'qformer' else ''}) reads no instruction; "
                             f"only InstructBLIP's Q-Former takes one")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None, **objects: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings with each image's features written over its image tokens, images taken
        in batch order (transformers' convention); text-only samples have no image tokens and need
        no image (nor an instruction)."""
        is_image = input_ids == self.config.image_token_index
        self.check_image_tokens(is_image.sum(1).tolist(), pixel_values, image_sizes)
        self.check_instruction(qformer_input_ids, bool(is_image.any()))
        # The image (and hint) token ids may lie outside the vocabulary, so embed a harmless id there.
        hint = self.config.hint_token_index
        is_hint = input_ids == hint if hint is not None else torch.zeros_like(is_image)
        embeds = self.language_model.input_embeddings()(input_ids.masked_fill(is_image | is_hint, 0))
        if hint is not None:  # LION: one learned vector in place of <hint>
            embeds = torch.where(is_hint[..., None], self.soft_prompt_hint.to(embeds.dtype), embeds)
        if not is_image.any():
            return embeds
        features = self.image_features(pixel_values, qformer_input_ids, qformer_attention_mask, image_sizes, **objects)
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def check_image_tokens(self, tokens_per_sample: list[int], pixel_values: torch.Tensor | None,
                           image_sizes: torch.Tensor | None) -> None:
        """Every sample's image tokens must be exactly what its images fill, images in batch order:
        `num_image_tokens` each, or with AnyRes what each image's size yields (and its tiles must
        be the ones its size asks for); an error names the sample and both counts."""
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if self.high_resolution is None:
            if image_sizes is not None:
                raise ValueError("image_sizes is for AnyRes (image_aspect_ratio 'anyres'); this model "
                                 f"sees every image as one {self.config.vision_config.image_size} px square")
            counts = [self.num_image_tokens] * num_images
        else:
            counts = self.high_resolution.token_counts(pixel_values, image_sizes)
        image, owners = 0, []
        for sample, tokens in enumerate(tokens_per_sample):
            first, filled = image, 0
            while filled < tokens and image < num_images:
                filled, image = filled + counts[image], image + 1
                owners.append(sample)
            if filled != tokens:
                held = f"images {first}..{image - 1} fill {filled}" if image > first else "no image is left for it"
                raise ValueError(f"sample {sample}: {tokens} image tokens (id {self.config.image_token_index}) "
                                 f"in the text, but {held} (pixel_values has {num_images} images; each fills "
                                 f"{'what its image_sizes yields' if self.high_resolution else self.num_image_tokens})")
        if image != num_images:
            raise ValueError(f"pixel_values has {num_images} images but the text's image tokens hold {image}")
        if self.high_resolution is not None and num_images:
            self.high_resolution.check_tiles(pixel_values, image_sizes, owners)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, task_level: int | torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, object_features: torch.Tensor | None = None,
                object_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, length, vocab); with labels, (logits, mean cross-entropy over labels
        != -100). pixel_values: (num_images, 3, H, W) for the samples holding images only;
        qformer_input_ids / qformer_attention_mask: InstructBLIP's instruction, one row per image.
        Decoder-only LLM: labels align with input_ids and are shifted. Encoder-decoder (T5):
        input_ids are the encoder's, labels the decoder's targets, decoder_input_ids (default:
        labels shifted right) its inputs, and the logits are the decoder's. task_level: LION's
        router gates (adapters.TASK_LEVELS; per batch or a (batch,) tensor; None = image-level).
        AnyRes: pixel_values (num_images, max tiles, 3, H, W) and image_sizes (num_images, 2), as
        LlavaNextImageProcessor returns them (image_features). Lyrics: object_features (num_images,
        slots, width) and object_mask (num_images, slots), the refiner's objects of each image."""
        embeds = self.embed(input_ids, pixel_values, qformer_input_ids, qformer_attention_mask, image_sizes,
                            object_features=object_features, object_mask=object_mask)
        decoder = {}
        if self.config.text_config.is_encoder_decoder:
            decoder["decoder_input_ids"] = decoder_input_ids
        elif decoder_input_ids is not None:
            raise ValueError("decoder_input_ids is for an encoder-decoder LLM (T5); this model's LLM is decoder-only")
        set_task_level(self.language_model, task_level)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **decoder)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, task_level: int | torch.Tensor | None = None,
                 image_sizes: torch.Tensor | None = None, object_features: torch.Tensor | None = None,
                 object_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """New tokens only, (batch, new_length), padded with pad_token_id after the end; the batch
        is LEFT-padded. Options: decoding.DecodingOptions."""
        options.setdefault("pad_token_id", self.config.pad_token_id)
        embeds = self.embed(input_ids, pixel_values, qformer_input_ids, qformer_attention_mask, image_sizes,
                            object_features=object_features, object_mask=object_mask)
        set_task_level(self.language_model, task_level)
        return decoding.generate(self.language_model, input_ids, embeds, attention_mask, **options)

    @classmethod
    def from_pretrained(cls, path: str, vision_tower_path: str | None = None, dtype: torch.dtype = torch.float32,
                        components: tuple[str, str] | None = None, **config_overrides) -> MLLM:
        """Load a checkpoint directory in any layout of checkpoints.MLLM_LAYOUTS (LLaVA's, BLIP-2's,
        InstructBLIP's, LION's, Lynx's); dims from config.json. The original LLaVA layout takes its
        vision tower from the CLIP checkpoint `vision_tower_path` (its config's `mm_vision_tower`
        names the public one). A release that holds only what it trained and no config.json (LION's
        `LION-FlanT5-XL.pth`, Lynx's `finetune_lynx.pt`, converted) loads over `components` =
        (stage-1 Q-Former or, for Lynx, vision tower checkpoint; LLM checkpoint) built with
        `config_overrides` (a config file's `model` dict), and says which parts came from where.
        Nothing tokenizer-related is attached."""
        values, state = read_checkpoint(path, config=components is None)
        name, layout = detect_layout(state, MLLM_LAYOUTS, path)
        if components is not None:
            if layout is LYNX_LAYOUT:
                model = cls.from_vision_and_language(*components, **config_overrides)
            else:
                model = cls.from_qformer_and_language(*components, instruction_aware=True, **config_overrides)
            load_over(model, fitted_to_release(model, state_to_ours(state, layout)), f"{path} (layout: {name})")
            return model.to(dtype)
        if layout is LYNX_LAYOUT:
            model = build_without_init(cls, MLLMConfig(**lynx_config_fields(values)), dtype)
            load_state(model, state, layout, f"{path} (layout: {name})")
            return model
        if layout is not ORIGINAL_LLAVA_LAYOUT:
            qformer = layout in (BLIP2_LAYOUT, INSTRUCTBLIP_LAYOUT, LION_LAYOUT, LYRICS_LAYOUT)
            fields = blip2_config_fields(values, state) if qformer else llava_hf_config_fields(values)
            model = build_without_init(cls, MLLMConfig(**fields), dtype)
            if layout is LYRICS_LAYOUT:
                state = without_refiner_models(state, path)
            load_state(model, state, layout, f"{path} (layout: {name})")
            return model
        state = state_to_ours(state, layout)
        if not any(key.startswith("vision_tower.") for key in state):
            if vision_tower_path is None:
                raise ValueError(f"{path} is an original LLaVA checkpoint without a vision tower: pass "
                                 f"vision_tower_path, a CLIP checkpoint ({values.get('mm_vision_tower', 'CLIP')})")
            tower = VisionTransformer.from_pretrained(vision_tower_path)
            state.update({f"vision_tower.{key}": value for key, value in tower.state_dict().items()})
            vision_config = tower.config
        else:
            vision_config = VisionConfig.from_dict(values.get("vision_config", {}))
        model = build_without_init(cls, MLLMConfig(vision_config=vision_config, **original_llava_config_fields(values)),
                                   dtype)
        load_state(model, state, (), f"{path} (layout: {name})")
        return model

    @classmethod
    def from_vision_and_language(cls, vision_path: str, language_path: str, **config_overrides) -> MLLM:
        """The start of stage-1 pretraining (section 3.4, "Stage 1"): a CLIP checkpoint (CLIPModel or
        CLIPVisionModel), a LlamaForCausalLM checkpoint and a freshly initialized connector (a
        T5 goes with the Q-Former: from_qformer_and_language).
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
        model.multi_modal_projector = model.new_connector()
        if hasattr(model, "image_newline"):
            model.image_newline = model.new_image_newline()
        model.add_adapters()  # Lynx's, into the LLM just loaded
        return model

    @classmethod
    def from_qformer_and_language(cls, qformer_path: str, language_path: str, instruction_aware: bool = False,
                                  **config_overrides) -> MLLM:
        """The start of BLIP-2's second stage (sec. 3.3) and of InstructBLIP's instruction tuning:
        the stage-1 checkpoint (pretraining.QFormerStage1: tower, queries, Q-Former), a
        LlamaForCausalLM or T5ForConditionalGeneration and a fresh `language_projection`. BLIP-2's generation Q-Former reads no
        text, so the stage-1 text parts (embeddings, text feed-forwards) are left behind;
        InstructBLIP's (`instruction_aware`) keeps them, as it starts from the stage-1 Q-Former
        (InstructBLIP, sec. 2.3). The vocabulary grows for image_token_index / pad_token_id as in
        from_vision_and_language."""
        stage1 = load_stage1(qformer_path)  # BLIP-2's, or Lyrics' MQ-Former with its grounding queries
        language_model = language_model_from_pretrained(language_path)
        qformer_config = dataclasses.replace(stage1.config.qformer_config, use_qformer_text_input=instruction_aware)
        projector_type = config_overrides.pop("projector_type", "qformer")  # or LION's "lion"
        config = MLLMConfig(vision_config=stage1.config.vision_config, text_config=language_model.config,
                            projector_type=projector_type, qformer_config=qformer_config,
                            num_query_tokens=stage1.config.num_query_tokens,
                            num_grounding_queries=stage1.config.num_grounding_queries, vision_feature_layer=-1,
                            vision_feature_select_strategy="full", **config_overrides)
        needed_vocab = max(config.image_token_index, config.pad_token_id) + 1
        if needed_vocab > language_model.config.vocab_size:
            language_model.resize_token_embeddings(needed_vocab)
        model = build_without_init(cls, config, torch.float32)  # every part is set below
        model.vision_tower, model.language_model = stage1.vision_tower, language_model
        connector = model.multi_modal_projector
        connector.query_tokens = stage1.query_tokens
        kept = {key: value for key, value in stage1.qformer.state_dict().items() if key in connector.qformer.state_dict()}
        load_state_strict(connector.qformer, kept, f"{qformer_path} (the Q-Former)")
        connector.language_projection.apply(bert_initialization)
        if projector_type == "lion":
            model.initialize_lion_parts()
        return model

    def save_pretrained(self, path: str) -> None:
        """The hub layout + config.json of transformers' class for this composition:
        LlavaForConditionalGeneration (for the "mlp2x_gelu" projector; transformers has no
        single-linear one), Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration
        (with an EVA tower; a Q-Former over a CLIP tower, as in the shapes world, keeps the same
        layout, which only this codebase reads); LION in the official code's names, with
        InstructBLIP's config.json plus LION's fields; Lynx in the official code's names, with a
        config.json of our fields. LoRA is saved merged."""
        if self.config.projector_type == "resampler":
            write_checkpoint(path, lynx_config_json(self.config), save_state(self, LYNX_LAYOUT))
            return
        if self.config.projector_type in ("qformer", "lion"):
            instruct = self.multi_modal_projector.takes_instruction
            layout = LION_LAYOUT if self.config.projector_type == "lion" else LYRICS_LAYOUT \
                if self.config.num_grounding_queries else INSTRUCTBLIP_LAYOUT if instruct else BLIP2_LAYOUT
            write_checkpoint(path, blip2_config_json(self.config), save_state(self, layout))
            return
        write_checkpoint(path, llava_hf_config_json(self.config, self.num_image_tokens),
                         save_state(self, LLAVA_HF_LAYOUT))


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints: state dicts through checkpoints.py's layout tables, and config.json translations

LANGUAGE_MODELS = (LanguageModel, T5LanguageModel)


def language_model_class(config: TextConfig | T5Config) -> type[LanguageModel] | type[T5LanguageModel]:
    return T5LanguageModel if config.is_encoder_decoder else LanguageModel


def language_model_from_pretrained(path: str) -> LanguageModel | T5LanguageModel:
    """A LlamaForCausalLM or T5ForConditionalGeneration checkpoint, by its config's model_type."""
    model_type = read_config_json(path).get("model_type", "llama")
    return T5LanguageModel.from_pretrained(path) if model_type == "t5" else LanguageModel.from_pretrained(path)


def tied_heads(model: nn.Module) -> list[tuple[str, str]]:
    """(key prefix, embedding key) of every language model in `model` whose head is its embedding matrix."""
    return [(f"{name}." if name else "", module.embedding_key) for name, module in model.named_modules()
            if isinstance(module, LANGUAGE_MODELS) and module.config.tie_word_embeddings]


def load_state(model: nn.Module, state: dict[str, torch.Tensor], layout: Layout, source: str) -> None:
    """Rename a checkpoint to our keys and load it strictly (every bad key named, no partial load).
    A tied head is absent from transformers checkpoints; it is the embedding."""
    state = state_to_ours(state, layout)
    for prefix, embedding_key in tied_heads(model):
        if prefix + embedding_key in state:
            state.setdefault(prefix + "lm_head.weight", state[prefix + embedding_key])
    load_state_strict(model, state, source)


def save_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """Our state in a checkpoint layout. LoRA factors are merged into the base weights (a plain
    checkpoint any loader reads); a tied head is dropped, as transformers does."""
    state = merged_state_dict(model)
    for prefix, _ in tied_heads(model):
        state.pop(prefix + "lm_head.weight")
    return state_to_theirs(state, layout)


def build_without_init(module_class: type[nn.Module], config: MLLMConfig | TextConfig | T5Config,
                       dtype: torch.dtype) -> nn.Module:
    """A model whose weights will all be overwritten by a checkpoint: built on the meta device and
    then given uninitialized storage, which skips a random initialization that for a 7B model
    costs longer than the load itself. Modules here hold no buffers that need init. Under `with
    torch.device("meta")` it stays there (train.py --estimate_memory builds models that way)."""
    with torch.device("meta"):
        model = module_class(config)
    model = model.to_empty(device=torch.get_default_device()).to(dtype)
    for module in model.modules():  # to_empty gives each module its own storage, untying the head
        if isinstance(module, LANGUAGE_MODELS):
            module.tie_weights()
    return model
