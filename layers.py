"""The building blocks every model here is made of, with no model-specific code.

A vision tower, a language model and a connector differ in how they stack these pieces, not in
the pieces: one attention (through F.scaled_dot_product_attention), one rotary embedding, one
RMSNorm, two feed-forward shapes, and two block layouts (pre-LN as in CLIP and LLaMA, post-LN as
in BERT and the BLIP-2 Q-Former). Submodule names are the ones the state dicts use; each
checkpoint layout's table in checkpoints.py translates a public layout's names to these.

Contents, top to bottom: activations, RMSNorm, rotary position embedding and T5's relative
position buckets, Attention, the attention masks of a decoder, the feed-forward family,
PreNormBlock, PostNormBlock, initialize_blocks (CLIP's initialization of a stack of blocks), and
the language-model losses.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions without loss (LLaVA / transformers convention)


class KVCacheLike(Protocol):
    """What Attention asks of a cache (decoding.LayerKVCache is one): store this step's keys
    and values, return all of them so far."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------
# Activations


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x): the OpenAI checkpoints were
    trained with it, so exact GELU would change their features."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (transformers' `gelu_new`, the Flan-T5 checkpoints')."""
    return F.gelu(x, approximate="tanh")


# Keys are the `hidden_act` strings of the public config.json files.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": gelu_tanh, "silu": F.silu}


def activation_named(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown hidden_act {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------
# Normalization and positions


class RMSNorm(nn.Module):
    """RMSNorm (LLaMA; T5's "LayerNorm" is the same): no mean, no bias. Normalize in fp32
    (half-precision sums of squares overflow), cast back, then multiply by the weight, in this
    order, as the reference implementations do (the products differ in the last bit otherwise)."""

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
    """cos and sin of position * frequency, each (B, 1, T, head_dim), for `apply_rotary`.

    Frequencies theta^(-2i/head_dim) use the same expression as transformers'
    LlamaRotaryEmbedding, so angles agree to the last bit; they are computed in fp32 (large
    positions lose their low bits in half precision) and repeated over the two halves of a head
    (rotate-half, `cat(freqs, freqs)`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inverse_frequencies = 1.0 / (theta ** exponents)
    angles = position_ids[:, :, None].float() * inverse_frequencies[None, None, :]  # (B, T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021, eq. 34) in the rotate-half convention
    of LLaMA / Vicuna: the two halves of each head form the rotated pairs, not interleaved
    neighbours. x: (B, nh, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def relative_position_buckets(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset (Raffel et al. 2020, sec. 2.1, "Model"): one
    bucket per offset for the nearest num_buckets / 2, then logarithmically wider ones up to
    max_distance, beyond which all offsets share the last bucket. Bidirectional (the encoder):
    half the buckets are for keys after the query. Causal (the decoder): only offsets <= 0 count.
    The arithmetic (float log, truncation to int) is mesh-tensorflow's, so buckets equal the
    checkpoints'."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    logarithmic = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                           * (num_buckets - exact)).long()  # distance 0 gives -inf here; torch.where drops it
    return buckets + torch.where(distance < exact, distance, logarithmic.clamp(max=num_buckets - 1))


# ----------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention, with the options the papers need.

    - self-attention (`context=None`) or cross-attention (keys and values from `context`, whose
      width is `context_dim`), as the Q-Former and T5's decoder use it (and, planned, the
      resampler and LION's vision aggregator);
    - grouped-query attention (`num_key_value_heads < num_heads`): LLaMA-family LLMs;
    - biases on/off (CLIP has them, LLaMA has none, EVA has q and v biases but no k bias);
    - rotary embedding, given as (cos, sin) by the caller, applied to queries and keys;
    - an additive position bias (T5's relative position buckets), given by the caller;
    - `scale`: the softmax temperature, 1/sqrt(head_dim) when None (T5 uses 1);
    - a KV cache: any object with `update(k, v) -> (k, v)` that stores this step's keys/values
      and returns all of them (decoding.KVCache).
    Projections are always named q_proj / k_proj / v_proj / o_proj.
    """

    def __init__(self, dim: int, num_heads: int, num_key_value_heads: int | None = None,
                 context_dim: int | None = None, head_dim: int | None = None, bias: bool = True,
                 key_bias: bool | None = None, out_bias: bool | None = None, scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = scale
        context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, self.num_key_value_heads * self.head_dim,
                                bias=bias if key_bias is None else key_bias)
        self.v_proj = nn.Linear(context_dim, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)

    def project_keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `source` (B, S, width), each (B, nkv, S, hs). A decoder computes its
        cross-attention's once per prompt with this and passes them as `keys_values`."""
        B, S, _ = source.shape
        k = self.k_proj(source).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCacheLike | None = None,
                position_bias: torch.Tensor | None = None,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, dim); context: (B, S, context_dim) or None (S = T); keys_values: the context's
        keys and values already projected (project_keys_values), instead of the context.
        attn_mask: boolean (True = may attend) or additive float, broadcastable to (B, nh, T, S).
        position_bias: additive float, broadcastable to (B, nh, T, S), added to the scores."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = keys_values if keys_values is not None else self.project_keys_values(x if context is None else context)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        if position_bias is not None:
            if is_causal and attn_mask is None:
                raise ValueError("with a position bias, give the causal structure as attn_mask (SDPA takes one mask)")
            attn_mask = position_bias if attn_mask is None else position_bias + additive_mask(attn_mask, q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None, scale=self.scale,
            enable_gqa=self.num_key_value_heads != self.num_heads)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive one SDPA also takes: 0 or the dtype's
    minimum (not -inf, so a fully masked row stays finite once a bias is added)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def causal_attention_mask(attention_mask: torch.Tensor | None, query_length: int,
                          past_length: int) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) of a decoder for scaled_dot_product_attention, building a mask
    only when needed.

    attention_mask: (B, past_length + query_length), 1 = real token, 0 = padding, or None; a
      packed training row numbers its samples 1, 2, ... instead (axolotl's convention).
    - No padding (or RIGHT padding only, as in training): the causal structure alone is exact for
      every real token, because a real token never looks right of itself, so SDPA's `is_causal`
      fast path is used; outputs at right-padding positions are garbage and carry no loss.
    - One new token with a cache: it may see every cached key, so only padding needs masking.
    - LEFT padding (batched generation): a boolean (B, 1, T, past + T) mask. A padding query
      would see no key at all, and SDPA returns NaN for such rows, so every query may always see
      itself; padding outputs are never used.
    """
    device = attention_mask.device if attention_mask is not None else None
    if attention_mask is not None and past_length == 0 and attention_mask.max() > 1:
        # Packed rows (data.pack_rows): a token sees the earlier tokens of its own sample only.
        query_sample, key_sample = attention_mask[:, None, :, None], attention_mask[:, None, None, :]
        diagonal = torch.eye(query_length, dtype=torch.bool, device=device)
        return (diagonal.cumsum(0).bool() & (query_sample == key_sample) & (key_sample != 0)) | diagonal, False
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


def positions_in_samples(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position: the count of real tokens before it, so left padding shifts nothing,
    and in a packed row (samples numbered 1, 2, ...) the count within its own sample."""
    mask = attention_mask.long()
    if mask.max() <= 1:
        return (mask.cumsum(-1) - 1).clamp(min=0)
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


# ----------------------------------------------------------------------------------------------
# Feed-forward


class FeedForward(nn.Module):
    """The plain feed-forward half of a block, fc2(activation(fc1(x))): CLIP, BERT, the
    Q-Former. Names are CLIP's."""

    def __init__(self, width: int, intermediate_size: int, activation: str, bias: bool = True):
        super().__init__()
        self.activation = activation_named(activation)
        self.fc1 = nn.Linear(width, intermediate_size, bias=bias)
        self.fc2 = nn.Linear(intermediate_size, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class GatedFeedForward(nn.Module):
    """The gated feed-forward, down(activation(gate(x)) * up(x)) (GLU variants, Shazeer 2020):
    SwiGLU with silu in LLaMA, GeGLU in T5 v1.1. Names are LLaMA's; no biases."""

    def __init__(self, width: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation_named(activation)
        self.gate_proj = nn.Linear(width, intermediate_size, bias=False)
        self.up_proj = nn.Linear(width, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# Blocks


class PreNormBlock(nn.Module):
    """The pre-LN transformer block, x + attn(norm(x)) then x + mlp(norm(x)): CLIP's encoder layer
    in both towers (Radford et al. 2021, section 2.4), the LLaMA decoder layer and T5's encoder
    layer. With `cross_attn`, x + cross_attn(norm(x), context) comes between the two: T5's decoder
    layer (Raffel et al. 2020, sec. 2.1). The caller gives the parts (LayerNorm or RMSNorm, plain
    or gated feed-forward); the names are LLaMA's (`input_layernorm`, `self_attn`,
    `post_attention_layernorm`, `mlp`), and the layout tables map CLIP's `layer_norm1` /
    `layer_norm2` and T5's `layer.N` onto them. `parallel_adapter` (None until
    adapters.insert_parallel_adapters sets one): LION's adapter beside the feed-forward, reading
    the same pre-norm input, x + mlp(norm(x)) + adapter(x) (LION eq. 1). `output_adapter` (set by
    adapters.insert_output_adapters): Lynx's adapter on the block's output h, h + adapter(h).

    REACT's gated blocks (dissertation section 2.3, Figure 2.3(d)) are this block twice over:
    `residual_gates` makes each residual branch x + tanh(alpha) * branch(norm(x)), with the
    scalars `alpha_attn` and `alpha_dense` at 0, so a new block starts as the identity; and
    `gated_block` (None until vision.VisionTransformer.add_gated_blocks sets one) is such a block,
    run on x before this one, as OpenCLIP's `gated_attn_block` in REACT's code."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, cross_attn: Attention | None = None,
                 cross_attn_layernorm: nn.Module | None = None, residual_gates: bool = False):
        super().__init__()
        if (cross_attn is None) != (cross_attn_layernorm is None):
            raise ValueError("a cross-attention needs its own norm (cross_attn and cross_attn_layernorm together)")
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.cross_attn_layernorm = cross_attn_layernorm
        self.cross_attn = cross_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.alpha_attn = nn.Parameter(torch.zeros(())) if residual_gates else None
        self.alpha_dense = nn.Parameter(torch.zeros(())) if residual_gates else None
        self.gated_block: nn.Module | None = None
        self.parallel_adapter: nn.Module | None = None
        self.output_adapter: nn.Module | None = None

    def gated(self, branch: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
        return branch if alpha is None else torch.tanh(alpha) * branch

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCacheLike | None = None,
                position_bias: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None,
                context_keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, width); the options are Attention's. A block with cross-attention needs the
        context (B, S, width) or its projected keys and values, and its mask (B, 1, 1, S)."""
        if self.gated_block is not None:
            x = self.gated_block(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.gated(self.self_attn(self.input_layernorm(x), attn_mask=attn_mask, is_causal=is_causal,
                                          rotary=rotary, cache=cache, position_bias=position_bias), self.alpha_attn)
        if self.cross_attn is not None:
            if context is None and context_keys_values is None:
                raise ValueError("this block cross-attends: give `context` or `context_keys_values`")
            x = x + self.cross_attn(self.cross_attn_layernorm(x), context=context, attn_mask=context_mask,
                                    keys_values=context_keys_values)
        if self.parallel_adapter is not None:
            x = x + self.mlp(self.post_attention_layernorm(x)) + self.parallel_adapter(x)
        else:
            x = x + self.gated(self.mlp(self.post_attention_layernorm(x)), self.alpha_dense)
        return x if self.output_adapter is None else x + self.output_adapter(x)


class PostNormBlock(nn.Module):
    """The post-LN transformer block of BERT (Devlin et al. 2019; Vaswani et al. 2017, sec. 3.1),
    norm(x + attn(x)), then optionally norm(x + cross_attn(x, context)), then norm(x + mlp(x)):
    the layer of the BLIP-2 Q-Former (connectors.QFormer) and of LION's vision aggregator.

    The Q-Former's variant (BLIP-2, sec. 3.1, Figure 2: "the image transformer and the text
    transformer share the same self-attention layers"): the first `num_queries` positions are
    learned queries, the rest text; self-attention mixes both, but only the queries cross-attend
    to the image and they have their own feed-forward (`query_mlp`, BLIP-2 initializes it as a
    copy of BERT's); the text keeps BERT's (`mlp`). A Q-Former that never reads text (BLIP-2's
    generation checkpoints) has no `mlp`. BERT's dropout (0.1) is left out, as everywhere in this
    codebase: the recipes here do not use it.

    Lyrics' MQ-Former (sec. 3.1, Figure 2) splits the queries: the last `num_grounding_queries`
    of them cross-attend the visual refiner's object features through a second cross-attention
    of their own (`grounding_cross_attn`, keys and values `grounding_context_dim` wide), the others
    the image; both groups share the self-attention and the query feed-forward."""

    def __init__(self, width: int, num_heads: int, intermediate_size: int, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12, context_dim: int | None = None, query_mlp: bool = False,
                 text_mlp: bool = True, grounding_context_dim: int | None = None):
        super().__init__()
        self.self_attn = Attention(width, num_heads)
        self.self_attn_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.cross_attn = Attention(width, num_heads, context_dim=context_dim) if context_dim else None
        self.cross_attn_norm = nn.LayerNorm(width, eps=layer_norm_eps) if context_dim else None
        grounding = bool(context_dim and grounding_context_dim)
        self.grounding_cross_attn = Attention(width, num_heads, context_dim=grounding_context_dim) if grounding else None
        self.grounding_cross_attn_norm = nn.LayerNorm(width, eps=layer_norm_eps) if grounding else None
        self.mlp = FeedForward(width, intermediate_size, activation) if text_mlp else None
        self.mlp_norm = nn.LayerNorm(width, eps=layer_norm_eps) if text_mlp else None
        self.query_mlp = FeedForward(width, intermediate_size, activation) if query_mlp else None
        self.query_mlp_norm = nn.LayerNorm(width, eps=layer_norm_eps) if query_mlp else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                num_queries: int | None = None, cache: KVCacheLike | None = None,
                num_grounding_queries: int = 0, grounding_context: torch.Tensor | None = None,
                grounding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, width); context: (B, S, context_dim); masks and `cache` as Attention's.
        grounding_context: (B, N, grounding_context_dim) object features with grounding_mask (B, N),
        True on real objects; an image without any leaves its grounding queries' cross-attention
        out (nothing to read), rather than attending to padding.

        num_queries None: a BERT layer, every position alike; the context is required exactly when
        the block has a cross-attention. num_queries = Q: x is Q queries then T - Q text tokens;
        the context is needed when Q > 0 and the block cross-attends (a text-only pass, Q = 0,
        takes none: BLIP-2's text encoder and its image-grounded text decoder, whose queries come
        in through `cache` instead)."""
        x = self.self_attn_norm(x + self.self_attn(x, attn_mask=attn_mask, cache=cache))
        if num_queries is None:
            if (context is None) != (self.cross_attn is None):
                raise ValueError("a PostNormBlock with cross-attention needs `context`, one without takes none")
            if self.cross_attn is not None:
                x = self.cross_attn_norm(x + self.cross_attn(x, context=context, attn_mask=context_mask))
            return self.mlp_norm(x + self.mlp(x))
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Q, width), (B, T - Q, width)
        parts = []
        if num_queries > 0:
            if self.cross_attn is not None:
                if context is None:
                    raise ValueError("the queries of a cross-attention layer need `context` (the image features)")
                visual, grounding = queries[:, :num_queries - num_grounding_queries], queries[:, num_queries - num_grounding_queries:]
                queries = self.cross_attn_norm(visual + self.cross_attn(visual, context=context, attn_mask=context_mask))
                if num_grounding_queries:
                    queries = torch.cat([queries, self.read_objects(grounding, grounding_context, grounding_mask)], 1)
            parts.append(self.query_mlp_norm(queries + self.query_mlp(queries)))
        if text.shape[1] > 0:
            if self.mlp is None:
                raise ValueError("this block has no text feed-forward (a Q-Former built without text input)")
            parts.append(self.mlp_norm(text + self.mlp(text)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


    def read_objects(self, grounding: torch.Tensor, objects: torch.Tensor | None,
                     present: torch.Tensor | None) -> torch.Tensor:
        """The grounding queries' cross-attention over the objects (MQ-Former's second one)."""
        if self.grounding_cross_attn is None or objects is None or present is None:
            raise ValueError("grounding queries need a block with grounding_cross_attn, the objects and their mask")
        has_objects = present.any(dim=1)  # (B,)
        # A row with no key to attend to would be NaN; it reads all (padding) keys and is discarded.
        keys = (present | ~has_objects[:, None])[:, None, None, :]
        read = self.grounding_cross_attn(grounding, context=objects, attn_mask=keys)
        return self.grounding_cross_attn_norm(grounding + read * has_objects[:, None, None].to(read.dtype))


def initialize_blocks(blocks: nn.ModuleList, width: int) -> None:
    """OpenAI CLIP's initialization of a stack of pre-LN blocks (its `initialize_parameters`):
    weights normal with std shrinking with width and depth so the residual stream stays O(1),
    biases 0. Only matters when training from scratch (the shapes world's CLIP, REACT's blocks)."""
    attention_std = width ** -0.5
    residual_projection_std = attention_std * (2 * len(blocks)) ** -0.5
    for block in blocks:
        attention, mlp = block.self_attn, block.mlp
        for linear, std in ((attention.q_proj, attention_std), (attention.k_proj, attention_std),
                            (attention.v_proj, attention_std), (attention.o_proj, residual_projection_std),
                            (mlp.fc1, (2 * width) ** -0.5), (mlp.fc2, residual_projection_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


# ----------------------------------------------------------------------------------------------
# Losses

def shifted_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX (Eq. 3.3) of a decoder-only LLM:
    position t predicts label t + 1. The labels shift left (padded with IGNORE_INDEX) rather than
    the hidden states shifting right."""
    return supervised_cross_entropy(hidden, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX), lm_head)


def supervised_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean cross-entropy of the targets != IGNORE_INDEX, each predicted from the final hidden
    state at its own position (batch, length, width), in fp32. The head runs again on the
    supervised positions only: in LLaVA most positions (image tokens, the prompt) carry no loss,
    and the softmax and the backward through the head over all of them cost more than this small
    second head."""
    targets = targets.flatten()
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = lm_head(hidden.flatten(0, 1)[supervised])
    return F.cross_entropy(logits.float(), targets[supervised])


def row_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor,
                        shifted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its supervised tokens (labels != IGNORE_INDEX) and
    how many there are, from logits (batch, length, vocab): next tokens of a decoder-only LLM
    (`shifted`), or tokens at their own positions (an encoder-decoder's decoder). Only the
    supervised positions go through the softmax, so memory stays (#supervised tokens, vocab),
    not (rows, length, vocab)."""
    targets, logits = (labels[:, 1:], logits[:, :-1]) if shifted else (labels, logits)
    scored = targets != IGNORE_INDEX
    token_log_probs = F.log_softmax(logits[scored].float(), dim=-1).gather(-1, targets[scored][:, None])[:, 0]
    row_of_token = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[scored]
    totals = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, row_of_token, token_log_probs)
    return totals, scored.sum(1)
