"""Decoding: the KV cache, logits processors, greedy / sampling and beam search.

The searches know nothing of the model's architecture. A language model offers three methods:
- `new_cache(batch, max_length, device)`: its cache, any object with `length`,
  `reorder(rows)` and `repeat_rows(times)` (KVCache for a decoder; EncoderDecoderCache holds the
  decoder's self-attention keys/values plus the keys/values of the encoder output its
  cross-attention reads, computed once by the prefill);
- `prefill(input_ids, inputs_embeds, attention_mask, cache)`: the prompt once, the next-token
  logits of its last position;
- `decode_step(tokens, attention_mask, cache)`: one new token per row, its next-token logits.
What the searches carry between steps is one `DecodingState`. Processors follow transformers'
LogitsProcessors and are applied in their order (repetition penalty, no-repeat n-gram, min new
tokens, then temperature, top-k, top-p), so the same options give the same tokens.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# KV cache

class LayerKVCache:
    """Keys and values of one layer in preallocated (B, nkv, max_length, hs) buffers: each step
    writes in place and attention reads a view, so decoding allocates nothing per step
    (concatenating would copy the whole cache every token)."""

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
    """One LayerKVCache per attention layer of a decoder."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = [LayerKVCache(batch, kv_heads, max_length, head_dim, dtype, device) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions stored so far (every layer stores the same ones)."""
        return self.layers[0].length

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search: each surviving beam continues from its parent)."""
        for layer in self.layers:
            layer.keys[:, :, :self.length] = layer.keys[rows, :, :self.length]
            layer.values[:, :, :self.length] = layer.values[rows, :, :self.length]

    def repeat_rows(self, times: int) -> None:
        """Each row `times` times in a row (beam search starts every beam from its prompt's prefill)."""
        for layer in self.layers:
            layer.keys = layer.keys.repeat_interleave(times, dim=0)
            layer.values = layer.values.repeat_interleave(times, dim=0)


class EncoderDecoderCache:
    """An encoder-decoder's cache (T5): the decoder's self-attention KVCache, and what every
    decoding step's cross-attention reads, set once by the prefill: the encoder output's keys and
    values per decoder layer, and the encoder's padding mask (B, 1, 1, S)."""

    def __init__(self, self_attention: KVCache):
        self.self_attention = self_attention
        self.cross_keys_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.encoder_mask: torch.Tensor | None = None

    @property
    def layers(self) -> list[LayerKVCache]:
        return self.self_attention.layers

    @property
    def length(self) -> int:
        return self.self_attention.length

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search only moves rows among the beams of one prompt, which share one encoder
        output: the cross-attention keys / values stay as they are."""
        self.self_attention.reorder(rows)

    def repeat_rows(self, times: int) -> None:
        self.self_attention.repeat_rows(times)
        self.cross_keys_values = [(k.repeat_interleave(times, dim=0), v.repeat_interleave(times, dim=0))
                                  for k, v in self.cross_keys_values]
        self.encoder_mask = self.encoder_mask.repeat_interleave(times, dim=0)


# ----------------------------------------------------------------------------------------------
# Options and state

@dataclass
class DecodingOptions:
    """Everything `generate` can be asked; names and meanings are transformers' GenerationConfig's.
    eos_token_id None = the model config's ([] = none); pad_token_id None = the config's, else the
    first EOS. `streamer` receives each step's new tokens (B,) as they come (greedy / sampling)."""
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    stop_token_sequences: list[list[int]] | None = None
    pad_token_id: int | None = None
    streamer: Callable[[torch.Tensor], None] | None = None

    def __post_init__(self) -> None:
        """Values that would otherwise decode silently wrong or fail deep inside a search."""
        problems = [text for text, bad in (
            (f"max_new_tokens {self.max_new_tokens} < 1", self.max_new_tokens < 1),
            (f"min_new_tokens {self.min_new_tokens} < 0", self.min_new_tokens < 0),
            (f"num_beams {self.num_beams} < 1", self.num_beams < 1),
            (f"temperature {self.temperature} <= 0 (greedy is do_sample=False)", self.temperature <= 0),
            (f"top_k {self.top_k} < 0", self.top_k < 0),
            (f"top_p {self.top_p} not in (0, 1]", not 0 < self.top_p <= 1),
            (f"repetition_penalty {self.repetition_penalty} <= 0", self.repetition_penalty <= 0),
            (f"no_repeat_ngram_size {self.no_repeat_ngram_size} < 0", self.no_repeat_ngram_size < 0),
            ("an empty stop token sequence", any(len(s) == 0 for s in self.stop_token_sequences or [])),
            ("streaming needs greedy or sampled decoding: beam search picks its tokens at the end",
             self.streamer is not None and self.num_beams > 1)) if bad]
        if problems:
            raise ValueError("decoding options: " + "; ".join(problems))

    @classmethod
    def from_kwargs(cls, options: dict) -> DecodingOptions:
        """The options, or an error naming the unknown ones (a typo would otherwise be ignored)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


@dataclass
class DecodingState:
    """What a search carries from step to step."""
    model: nn.Module  # offers new_cache / prefill / decode_step (module docstring)
    cache: KVCache | EncoderDecoderCache
    full_mask: torch.Tensor  # (B, prompt + max_new_tokens): grows one real column per step, preallocated
    logits: torch.Tensor  # (B, vocab) fp32: the next-token logits of the last position
    context: torch.Tensor  # (B, prompt) ids the penalties see before the new ones; padding = the scratch id vocab_size
    eos_ids: torch.Tensor
    stop_sequences: list[torch.Tensor]
    pad_token_id: int
    options: DecodingOptions

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one new token per row; `logits` becomes the next position's, in fp32."""
        mask = self.full_mask[:, :self.cache.length + 1]
        self.logits = self.model.decode_step(tokens, mask, self.cache).float()

    def process(self, scores: torch.Tensor, history: torch.Tensor, step: int) -> torch.Tensor:
        """Penalties and the min-new-tokens rule on fp32 scores (logits, or log-probs for beams)."""
        options = self.options
        if options.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, history, options.repetition_penalty)
        if options.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(scores, history, options.no_repeat_ngram_size)
        if step < options.min_new_tokens:
            scores = scores.index_fill(1, self.eos_ids, -math.inf)
        return scores


# ----------------------------------------------------------------------------------------------
# Logits processors

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


# ----------------------------------------------------------------------------------------------
# Searches

def generate(model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Batched decoding with a KV cache; returns only the new tokens (B, new_length).

    The batch is LEFT-padded (attention_mask 0 on the left) so that every row's next token sits in
    the same column. A row ends at EOS (any of eos_token_id) or when its new tokens end with one of
    `stop_token_sequences` (both kept in the output); after that it is padded with pad_token_id.
    Greedy by default; `do_sample` samples after temperature / top_k / top_p; `num_beams > 1` is
    beam search (with `do_sample`, beam sampling as in Lynx's open-ended generation). input_ids
    give the context of repetition penalty and no-repeat n-gram. Options: DecodingOptions.
    """
    state = start_decoding(model, input_ids, inputs_embeds, attention_mask, DecodingOptions.from_kwargs(options))
    if state.options.num_beams > 1:
        return beam_search(state)
    return sample_or_greedy(state)


def start_decoding(model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, options: DecodingOptions) -> DecodingState:
    """Run the prompt through the model once (prefill, filling the cache) and gather what every
    search needs."""
    config = model.config
    eos_token_id = config.eos_token_id if options.eos_token_id is None else options.eos_token_id
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)
    pad_token_id = options.pad_token_id if options.pad_token_id is not None else config.pad_token_id
    if pad_token_id is None:
        if not len(eos_ids):
            raise ValueError("decoding without an EOS id needs a pad_token_id (the model config has none)")
        pad_token_id = int(eos_ids[0])
    reference = inputs_embeds if inputs_embeds is not None else input_ids
    batch, prompt_length = reference.shape[:2]
    device = reference.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, prompt_length, dtype=torch.long, device=device)
    # Context for the penalties: what transformers' processors see as input_ids. A decoder's
    # prompt ids, with padding (and ids outside the vocabulary, e.g. the image token of original
    # LLaVA) mapped to the scratch id vocab_size; an encoder-decoder's decoder start token (the
    # encoder's prompt is not part of what is generated).
    if getattr(config, "is_encoder_decoder", False):
        context = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
    else:
        context = torch.full((batch, prompt_length), config.vocab_size, dtype=torch.long, device=device)
        if input_ids is not None:
            context = torch.where(attention_mask.bool() & (input_ids < config.vocab_size), input_ids, context)
    cache = model.new_cache(batch, prompt_length + options.max_new_tokens, device)
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, options.max_new_tokens).long()], 1)
    logits = model.prefill(None if inputs_embeds is not None else input_ids, inputs_embeds,
                           full_mask[:, :prompt_length], cache)
    return DecodingState(model=model, cache=cache, full_mask=full_mask, logits=logits.float(), context=context,
                         eos_ids=eos_ids.to(device), pad_token_id=pad_token_id, options=options,
                         stop_sequences=[torch.tensor(s, device=device) for s in options.stop_token_sequences or []])


def sample_or_greedy(state: DecodingState) -> torch.Tensor:
    """Greedy (argmax) or sampled decoding, one row per prompt."""
    options = state.options
    batch, device = state.logits.shape[0], state.logits.device
    generated = torch.full((batch, options.max_new_tokens), state.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(options.max_new_tokens):
        scores = state.process(state.logits, torch.cat([state.context, generated[:, :step]], dim=1), step)
        if options.do_sample:
            probabilities = apply_sampling_filters(scores, options.temperature, options.top_k, options.top_p).softmax(-1)
            next_tokens = torch.multinomial(probabilities, 1)[:, 0]
        else:
            next_tokens = scores.argmax(-1)
        generated[:, step] = next_tokens.masked_fill(finished, state.pad_token_id)
        if options.streamer is not None:
            options.streamer(generated[:, step])
        finished |= torch.isin(next_tokens, state.eos_ids) | ends_with_any(generated[:, :step + 1],
                                                                              state.stop_sequences)
        if finished.all() or step == options.max_new_tokens - 1:
            return generated[:, :step + 1]
        state.advance(generated[:, step])
    return generated


def beam_search(state: DecodingState) -> torch.Tensor:
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
    options = state.options
    num_beams, max_new_tokens, length_penalty = options.num_beams, options.max_new_tokens, options.length_penalty
    batch, vocab = state.logits.shape
    device = state.logits.device
    keep = max(2, 1 + len(state.eos_ids)) * num_beams
    in_top_beams = torch.arange(keep, device=device) < num_beams
    rows = torch.arange(batch, device=device)[:, None] * num_beams  # first flat row of each prompt
    state.cache.repeat_rows(num_beams)
    state.full_mask = state.full_mask.repeat_interleave(num_beams, dim=0)
    context = state.context.repeat_interleave(num_beams, dim=0)
    state.logits = state.logits.repeat_interleave(num_beams, dim=0)

    running = torch.full((batch, num_beams, max_new_tokens), state.pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: let only the first one expand at step 0
    best = running.clone()
    best_scores = torch.full((batch, num_beams), -1e9, device=device)
    best_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    best_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for step in range(max_new_tokens):
        log_probs = state.process(state.logits.log_softmax(-1),
                                  torch.cat([context, running.flatten(0, 1)[:, :step]], 1), step)
        if options.do_sample:
            log_probs = apply_sampling_filters(log_probs, options.temperature, options.top_k, options.top_p)
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[..., None]).view(batch, -1)
        if options.do_sample:
            candidates = torch.multinomial(totals.softmax(-1), keep)
            candidate_scores = totals.gather(1, candidates)
        else:
            candidate_scores, candidates = totals.topk(keep, dim=-1)
        parents = candidates // vocab
        candidate_tokens = running.gather(1, parents[..., None].expand(-1, -1, max_new_tokens)).clone()
        candidate_tokens[:, :, step] = candidates % vocab
        new_tokens = candidate_tokens[:, :, :step + 1].flatten(0, 1)
        ended = (torch.isin(candidates % vocab, state.eos_ids)
                 | ends_with_any(new_tokens, state.stop_sequences).view(batch, keep)
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
        state.cache.reorder(source_rows)
        state.advance(running[:, :, step].flatten())
    return best[:, 0, :int(best_lengths[:, 0].max())]
