"""Every on-disk layout: config.json, safetensors I/O, key-mapping tables, and pickle conversion.

A public checkpoint names its tensors its own way (transformers' CLIP says `self_attn.out_proj`,
original LLaVA puts the projector under `model.mm_projector`, EVA fuses q/k/v). Our modules have
one set of names (layers.py). Between the two stands ONE mechanism: a layout is a tuple of `Rule`s,
each a key pattern on their side, one on ours, and optionally a tensor transform (split a fused
qkv, fold q/v biases, transpose), used in both directions: `to_ours` on load, `to_theirs` on save.
Every layout table lives in this file; `detect_layout` says which one a checkpoint is in, and
lists the known ones when none matches.

Official pickles (`.pth`, `.pt`, `.bin`: LION, Lynx, Lyrics and REACT ship nothing else) are
converted once, here, by `python checkpoints.py convert SRC DST`, with
`torch.load(weights_only=True)` (which refuses anything but tensors and plain containers, so no
code in the file runs); the rest of the codebase only ever reads safetensors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import safetensors.torch
import torch
import torch.nn as nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


# ----------------------------------------------------------------------------------------------
# config.json


class JsonConfig:
    """A config dataclass that round-trips through a transformers config.json: field names are
    transformers', `to_dict` adds `model_type`, `from_dict` keeps only the declared fields
    (config.json also carries bookkeeping such as architectures, dtype, initializer_range)."""

    model_type: ClassVar[str]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **asdict(self)}


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


# ----------------------------------------------------------------------------------------------
# safetensors


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


def read_checkpoint(path: str | Path, config: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, all tensors) of a checkpoint directory (single or sharded safetensors);
    without `config`, ({}, tensors): a converted release that ships no config.json."""
    return read_config_json(path) if config else {}, load_safetensors(path)


def write_checkpoint(path: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """config.json (with the weights' dtype, as transformers writes it) + model.safetensors,
    each written atomically."""
    dtype = next(iter(state.values())).dtype
    write_config_json({**config, "dtype": str(dtype).removeprefix("torch.")}, path)
    save_safetensors(state, Path(path) / WEIGHTS_NAME)


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


# ----------------------------------------------------------------------------------------------
# The conversion mechanism: rules

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Rule:
    """Their key pattern(s) <-> our key pattern(s). A `*` matches any run of characters (dots
    too); both sides hold the same `*`s, filled in order. A rule with several keys on a side
    (EVA's fused `qkv.weight` on theirs, q/k/v on ours) converts tensors with `to_ours` /
    `to_theirs`, functions from that side's tensors (in pattern order) to the other's."""

    theirs: str | tuple[str, ...]
    ours: str | tuple[str, ...]
    to_ours: Callable[..., Tensors] | None = None
    to_theirs: Callable[..., Tensors] | None = None

    def __post_init__(self) -> None:
        wildcards = {pattern.count("*") for side in ("theirs", "ours") for pattern in self.side(side)}
        if len(wildcards) != 1:
            raise ValueError(f"{self}: every pattern of a rule needs the same number of '*'")
        if (self.to_ours is None) != (self.to_theirs is None) or (
                self.to_ours is None and len(self.side("theirs")) != len(self.side("ours"))):
            raise ValueError(f"{self}: a rule that changes tensors needs to_ours and to_theirs both")

    def side(self, name: str) -> tuple[str, ...]:
        patterns = getattr(self, name)
        return (patterns,) if isinstance(patterns, str) else patterns


Layout = tuple[Rule, ...]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("(.*)".join(re.escape(part) for part in pattern.split("*")))


def _fill(pattern: str, groups: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    return parts[0] + "".join(group + part for group, part in zip(groups, parts[1:]))


def convert_keys(state: dict[str, torch.Tensor], layout: Layout, to: str) -> dict[str, torch.Tensor]:
    """Rewrite a state dict between a public layout and ours: `to="ours"` on load, `to="theirs"`
    on save. Each key takes the first rule that matches it on the source side; keys matching no
    rule keep their name (so a strict load reports them). A multi-key rule needs all its keys:
    a checkpoint holding only some of them raises, naming the ones present and the ones missing."""
    if to not in ("ours", "theirs"):
        raise ValueError(f"convert_keys: to must be 'ours' or 'theirs', not {to!r}")
    source_side, target_side = ("theirs", "ours") if to == "ours" else ("ours", "theirs")
    compiled = [[_compile(pattern) for pattern in rule.side(source_side)] for rule in layout]
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}

    def put(key: str, tensor: torch.Tensor, source: str) -> None:
        if key in converted:
            raise CheckpointError(f"{source_of[key]} and {source} both become {key}")
        converted[key], source_of[key] = tensor, source

    groups_of: dict[tuple[int, tuple[str, ...]], dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = next(((index, part, found) for index, patterns in enumerate(compiled)
                      for part, pattern in enumerate(patterns) if (found := pattern.fullmatch(key))), None)
        if match is None:
            put(key, tensor, key)
            continue
        index, part, found = match
        groups_of.setdefault((index, found.groups()), {})[part] = tensor
    for (index, groups), parts in groups_of.items():
        rule = layout[index]
        sources, targets = rule.side(source_side), rule.side(target_side)
        if len(parts) != len(sources):
            present = [_fill(sources[part], groups) for part in sorted(parts)]
            absent = [_fill(pattern, groups) for part, pattern in enumerate(sources) if part not in parts]
            raise CheckpointError(f"{present} need {absent} too, to make {[_fill(t, groups) for t in targets]}")
        tensors = tuple(parts[part] for part in range(len(sources)))
        transform = rule.to_ours if to == "ours" else rule.to_theirs
        if transform is not None:
            tensors = transform(*tensors)
        for pattern, tensor in zip(targets, tensors, strict=True):
            put(_fill(pattern, groups), tensor, " + ".join(_fill(source, groups) for source in sources))
    return converted


# Tensor transforms for multi-key rules, each with its inverse.

def split_in_three(fused: torch.Tensor) -> Tensors:
    """A fused q/k/v projection (rows q, then k, then v) into its three parts."""
    return tuple(fused.chunk(3, dim=0))


def join_three(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors:
    return (torch.cat([q, k, v], dim=0),)


def split_in_two(fused: torch.Tensor) -> Tensors:
    """A fused key / value projection (rows k, then v: the resampler's `to_kv`) into its two parts."""
    return tuple(fused.chunk(2, dim=0))


def join_two(k: torch.Tensor, v: torch.Tensor) -> Tensors:
    return (torch.cat([k, v], dim=0),)


def split_folded_bias(qkv_bias: torch.Tensor) -> Tensors:
    """EVA's attention bias as transformers folds it, cat(q_bias, 0, v_bias), into the query and
    value biases (our EVA attention has no key bias). A nonzero middle third is dropped without
    loss: a key bias adds q . b_k to every score of a query alike, which the softmax cancels."""
    q_bias, _, v_bias = qkv_bias.chunk(3)
    return q_bias, v_bias


def fold_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> Tensors:
    return (torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),)


def flatten(tensor: torch.Tensor) -> Tensors:
    """(1, 1, width) -> (width,): a class embedding stored with batch and token axes."""
    return (tensor.flatten(),)


def as_one_token(tensor: torch.Tensor) -> Tensors:
    return (tensor.reshape(1, 1, -1),)


def drop_batch_axis(tensor: torch.Tensor) -> Tensors:
    """(1, positions, width) -> (positions, width): a position table stored as a batch of one."""
    return (tensor[0],)


def add_batch_axis(tensor: torch.Tensor) -> Tensors:
    return (tensor[None],)


def stack(*tensors: torch.Tensor) -> Tensors:
    return (torch.stack(tensors),)


def unstack(stacked: torch.Tensor) -> Tensors:
    return tuple(stacked.unbind(0))


def transpose(weight: torch.Tensor) -> Tensors:
    """(in, out) <-> (out, in): layouts that store linear maps as x @ W (Conv1D-style)."""
    return (weight.t().contiguous(),)


# ----------------------------------------------------------------------------------------------
# Layout tables. Ours are the module names of vision.py, model.py and connectors.py.


def clip_tower_rules(theirs: str, ours: str) -> Layout:
    """transformers' CLIP tower under prefix `theirs` -> our VisionTransformer / TextTransformer
    under `ours`: its pre-LN block names onto PreNormBlock's, `out_proj` onto Attention's `o_proj`.
    `encoder.layers.N` and the rest keep their names."""
    return (
        Rule(f"{theirs}*.self_attn.out_proj.*", f"{ours}*.self_attn.o_proj.*"),
        Rule(f"{theirs}*.layer_norm1.*", f"{ours}*.input_layernorm.*"),
        Rule(f"{theirs}*.layer_norm2.*", f"{ours}*.post_attention_layernorm.*"),
        Rule(f"{theirs}*", f"{ours}*"),
    )


def bert_layer_rules(theirs: str, ours: str, attention: str = "self") -> Layout:
    """A BERT layer under `theirs` (the Q-Former's layers are BERT's) -> our layers.PostNormBlock
    under `ours`: BERT's query/key/value/dense onto Attention's projections, its output LayerNorms
    onto the block's norms, intermediate/output onto FeedForward, and the Q-Former's query
    feed-forward (intermediate_query/output_query) onto `query_mlp`; Lyrics' MQ-Former adds the
    grounding queries' `detection_crossattention` (our `grounding_cross_attn`). `attention` is the
    name of the level holding query/key/value: BERT's and LAVIS's "self", transformers' Q-Former "attention"."""
    rules: list[Rule] = []
    for bert, block in (("attention", "self_attn"), ("crossattention", "cross_attn"),
                        ("detection_crossattention", "grounding_cross_attn")):
        rules += [Rule(f"{theirs}{bert}.{attention}.{name}.*", f"{ours}{block}.{projection}.*")
                  for name, projection in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))]
        rules += [Rule(f"{theirs}{bert}.output.dense.*", f"{ours}{block}.o_proj.*"),
                  Rule(f"{theirs}{bert}.output.LayerNorm.*", f"{ours}{block}_norm.*")]
    for suffix, mlp in (("", "mlp"), ("_query", "query_mlp")):
        rules += [Rule(f"{theirs}intermediate{suffix}.dense.*", f"{ours}{mlp}.fc1.*"),
                  Rule(f"{theirs}output{suffix}.dense.*", f"{ours}{mlp}.fc2.*"),
                  Rule(f"{theirs}output{suffix}.LayerNorm.*", f"{ours}{mlp}_norm.*")]
    return tuple(rules)


def eva_tower_rules(theirs: str, ours: str) -> Layout:
    """transformers' Blip2VisionModel / InstructBlipVisionModel (BLIP-2's EVA ViT-g) under
    `theirs` -> our VisionTransformer under `ours`. The attention is fused (`qkv.weight`, split
    in three) with its bias in either hub form: folded into one `qkv.bias` (what transformers
    writes now, and so what we write) or separate `q_bias` / `v_bias` (older uploads)."""
    return (
        Rule(f"{theirs}embeddings.class_embedding", f"{ours}embeddings.class_embedding",
             to_ours=flatten, to_theirs=as_one_token),
        Rule(f"{theirs}embeddings.position_embedding", f"{ours}embeddings.position_embedding.weight",
             to_ours=drop_batch_axis, to_theirs=add_batch_axis),
        Rule(f"{theirs}*.self_attn.qkv.weight",
             tuple(f"{ours}*.self_attn.{name}_proj.weight" for name in "qkv"), to_ours=split_in_three,
             to_theirs=join_three),
        Rule(f"{theirs}*.self_attn.qkv.bias", (f"{ours}*.self_attn.q_proj.bias", f"{ours}*.self_attn.v_proj.bias"),
             to_ours=split_folded_bias, to_theirs=fold_bias),
        Rule(f"{theirs}*.self_attn.q_bias", f"{ours}*.self_attn.q_proj.bias"),
        Rule(f"{theirs}*.self_attn.v_bias", f"{ours}*.self_attn.v_proj.bias"),
        Rule(f"{theirs}*.self_attn.projection.*", f"{ours}*.self_attn.o_proj.*"),
        Rule(f"{theirs}*.layer_norm1.*", f"{ours}*.input_layernorm.*"),
        Rule(f"{theirs}*.layer_norm2.*", f"{ours}*.post_attention_layernorm.*"),
        Rule(f"{theirs}*", f"{ours}*"),
    )


def qformer_rules(theirs: str, ours: str, embeddings: str) -> Layout:
    """A Q-Former under `theirs` -> our connectors.QFormer under `ours`. Where its word/position
    embeddings and their LayerNorm live differs by model: `embeddings` is "qformer" for
    InstructBLIP (`qformer.embeddings.{word,position}_embeddings`, `qformer.embeddings.layernorm`),
    "root" for Blip2ForImageTextRetrieval (top-level `embeddings.*`, `qformer.layernorm`), "none"
    for BLIP-2 generation (`qformer.layernorm` only), "lavis" for LAVIS and the code built on it
    (LION: `Qformer.bert.embeddings.LayerNorm`, BERT's `attention.self.*` names), "lyrics" for
    Lyrics' `LyricsQFormerModel` (transformers' names but BERT's `qformer.embeddings.LayerNorm`)."""
    if embeddings not in ("qformer", "root", "none", "lavis", "lyrics"):
        raise ValueError(f"qformer_rules: embeddings must be 'qformer', 'root', 'none', 'lavis' or 'lyrics', "
                         f"not {embeddings!r}")
    home = {"root": "embeddings.", "none": None}.get(embeddings, f"{theirs}embeddings.")
    layernorm = {"qformer": f"{theirs}embeddings.layernorm.*", "lavis": f"{theirs}embeddings.LayerNorm.*",
                 "lyrics": f"{theirs}embeddings.LayerNorm.*"}.get(embeddings, f"{theirs}layernorm.*")
    rules = (Rule(layernorm, f"{ours}layernorm.*"),)
    if home is not None:
        rules += tuple(Rule(f"{home}{table}.*", f"{ours}{table}.*")
                       for table in ("word_embeddings", "position_embeddings"))
    return rules + bert_layer_rules(f"{theirs}encoder.layer.*.", f"{ours}layers.*.",
                                    attention="self" if embeddings == "lavis" else "attention")


# Lyrics (`LyricsLMForConditionalGeneration`, the IDEA-CCNL code; Ziya-Visual-Lyrics-14B): BLIP-2's
# hub names (transformers' EVA `vision_model.*`, `query_tokens` of visual then grounding queries,
# `language_projection`, `language_model.*`) with the MQ-Former's `detection_crossattention` in
# its cross-attention layers (bert_layer_rules) and BERT's `qformer.embeddings.LayerNorm`. Its
# `ram.*` and `grounding_dino.*` (the refiner's models) are not loaded: without_refiner_models.
LYRICS_REFINER_MODELS = ("ram.", "grounding_dino.")


def without_refiner_models(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Lyrics release without its visual refiner's models (RAM, Grounding-DINO), which run
    outside this codebase and reach it as data (refiner.py); says what it left out."""
    left = {prefix: sum(key.startswith(prefix) for key in state) for prefix in LYRICS_REFINER_MODELS}
    if any(left.values()):
        print(f"{source}: not loaded, the visual refiner's models (refiner.py reads their outputs): "
              + ", ".join(f"{prefix}* ({count} tensors)" for prefix, count in left.items() if count), file=sys.stderr)
    return {key: value for key, value in state.items() if not key.startswith(LYRICS_REFINER_MODELS)}


def lavis_eva_rules(theirs: str, ours: str, split_qkv: bool = False) -> Layout:
    """LAVIS's EVA ViT-g (`lavis/models/eva_vit.py`, as LION and Lyrics keep it) under `theirs` ->
    our VisionTransformer under `ours`: fused `qkv.weight` with separate `q_bias` / `v_bias`,
    `norm1` / `norm2`, `attn.proj`, a (1, 1, D) `cls_token` and a (1, N, D) `pos_embed`. It has
    no final norm: BLIP-2's `ln_vision` is a root module (our tower's post_layernorm). Lynx's copy
    (`split_qkv`) re-keys the attention as `q_proj` (with bias), `k_proj` (none), `v_proj` (with bias)."""
    block, ours_block = f"{theirs}blocks.*.", f"{ours}encoder.layers.*."
    attention = (Rule(f"{block}attn.q_proj.*", f"{ours_block}self_attn.q_proj.*"),
                 Rule(f"{block}attn.k_proj.*", f"{ours_block}self_attn.k_proj.*"),
                 Rule(f"{block}attn.v_proj.*", f"{ours_block}self_attn.v_proj.*")) if split_qkv else (
        Rule(f"{block}attn.qkv.weight", tuple(f"{ours_block}self_attn.{name}_proj.weight" for name in "qkv"),
             to_ours=split_in_three, to_theirs=join_three),
        Rule(f"{block}attn.q_bias", f"{ours_block}self_attn.q_proj.bias"),
        Rule(f"{block}attn.v_bias", f"{ours_block}self_attn.v_proj.bias"))
    return (
        Rule(f"{theirs}cls_token", f"{ours}embeddings.class_embedding", to_ours=flatten, to_theirs=as_one_token),
        Rule(f"{theirs}pos_embed", f"{ours}embeddings.position_embedding.weight",
             to_ours=drop_batch_axis, to_theirs=add_batch_axis),
        Rule(f"{theirs}patch_embed.proj.*", f"{ours}embeddings.patch_embedding.*"),
        *attention,
        Rule(f"{block}attn.proj.*", f"{ours_block}self_attn.o_proj.*"),
        Rule(f"{block}norm1.*", f"{ours_block}input_layernorm.*"),
        Rule(f"{block}norm2.*", f"{ours_block}post_attention_layernorm.*"),
        Rule(f"{block}mlp.*", f"{ours_block}mlp.*"),
        Rule(f"{theirs}*", f"{ours}*"),
    )


def t5_rules(theirs: str, ours: str) -> Layout:
    """transformers' T5ForConditionalGeneration under `theirs` -> our model.T5LanguageModel under
    `ours`. T5 numbers the sublayers of a block (`layer.0` self-attention, in the decoder `layer.1`
    cross-attention, then the feed-forward) where ours name them; the relative position bias,
    which T5 keeps in the first block, belongs to the stack here."""
    rules = [Rule(f"{theirs}shared.*", f"{ours}shared.*"), Rule(f"{theirs}lm_head.*", f"{ours}lm_head.*")]
    for stack, feed_forward in (("encoder", 1), ("decoder", 2)):
        block, ours_block = f"{theirs}{stack}.block.*.layer.", f"{ours}{stack}.layers.*."
        rules += [Rule(f"{theirs}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       f"{ours}{stack}.relative_attention_bias.weight"),
                  Rule(f"{theirs}{stack}.final_layer_norm.weight", f"{ours}{stack}.norm.weight"),
                  Rule(f"{block}0.layer_norm.weight", f"{ours_block}input_layernorm.weight"),
                  Rule(f"{block}{feed_forward}.layer_norm.weight", f"{ours_block}post_attention_layernorm.weight")]
        rules += [Rule(f"{block}{feed_forward}.DenseReluDense.{name}.weight", f"{ours_block}mlp.{projection}.weight")
                  for name, projection in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))]
        attentions = [("0.SelfAttention", "self_attn")]
        if stack == "decoder":
            attentions.append(("1.EncDecAttention", "cross_attn"))
            rules.append(Rule(f"{block}1.layer_norm.weight", f"{ours_block}cross_attn_layernorm.weight"))
        for theirs_name, ours_name in attentions:
            rules += [Rule(f"{block}{theirs_name}.{name}.weight", f"{ours_block}{ours_name}.{name}_proj.weight")
                      for name in "qkvo"]
    return tuple(rules)


# transformers' CLIPModel (our vision.CLIPModel); the arange `position_ids` buffer older
# transformers saved holds no weights and is dropped before conversion (IGNORED_KEY_SUFFIXES).
CLIP_LAYOUT = clip_tower_rules("vision_model.", "vision_model.") + clip_tower_rules("text_model.", "text_model.")
# LlamaForCausalLM: our LanguageModel uses its names.
LLAMA_LAYOUT: Layout = (Rule("model.*", "model.*"), Rule("lm_head.*", "lm_head.*"))
T5_LAYOUT = t5_rules("", "")
# llava-hf on disk: the hub's llava-1.5-*-hf and llava-v1.6-*-hf checkpoints (CLIPVisionModel keeps
# `vision_model.`); our save_pretrained writes this one. Projector, LLaVA-NeXT's `image_newline` and
# the LLM keep their names.
LLAVA_HF_PROJECTOR_AND_LLM: Layout = (
    Rule("multi_modal_projector.*", "multi_modal_projector.*"),
    Rule("image_newline", "image_newline"),
    Rule("language_model.model.*", "language_model.model.*"),
    Rule("language_model.lm_head.*", "language_model.lm_head.*"),
)
LLAVA_HF_LAYOUT = clip_tower_rules("vision_tower.vision_model.", "vision_tower.") + LLAVA_HF_PROJECTOR_AND_LLM
# What transformers 5 `save_pretrained` writes: the same, but CLIPVisionModel lost its `vision_model.` level.
TRANSFORMERS5_SAVED_LAYOUT = clip_tower_rules("vision_tower.", "vision_tower.") + LLAVA_HF_PROJECTOR_AND_LLM
# transformers 5 in memory (LlavaForConditionalGeneration.state_dict()): the LLaMA body without
# its "model." level under `model.language_model.`, the head at the root.
TRANSFORMERS5_MEMORY_LAYOUT = clip_tower_rules("model.vision_tower.", "vision_tower.") + (
    Rule("model.multi_modal_projector.*", "multi_modal_projector.*"),
    Rule("model.image_newline", "image_newline"),
    Rule("model.language_model.*", "language_model.model.*"),
    Rule("lm_head.*", "language_model.lm_head.*"),
)
# Original LLaVA (haotian-liu/LLaVA): a LlamaForCausalLM whose `model.` also holds the projector
# (`mm_projector.0/2` = LLaVA-1.5's Sequential(Linear, GELU, Linear); bare `mm_projector` =
# LLaVA v1's Linear) and, in some checkpoints, the CLIP tower; usually the tower comes from a
# separate CLIP checkpoint (model.MLLM.from_pretrained's vision_tower_path).
ORIGINAL_LLAVA_LAYOUT = clip_tower_rules("model.vision_tower.vision_tower.vision_model.", "vision_tower.") + (
    Rule("model.mm_projector.0.*", "multi_modal_projector.linear_1.*"),
    Rule("model.mm_projector.2.*", "multi_modal_projector.linear_2.*"),
    Rule("model.mm_projector.*", "multi_modal_projector.linear_1.*"),
    Rule("model.image_newline", "image_newline"),
    Rule("model.*", "language_model.model.*"),
    Rule("lm_head.*", "language_model.lm_head.*"),
)

# BLIP-2 / InstructBLIP, as on the hub and as transformers 5 saves them: vision_model.* (EVA),
# query_tokens, qformer.*, language_projection.*, language_model.* (a LlamaForCausalLM, whose
# names are ours, or a T5ForConditionalGeneration, whose T5 rules match only T5 keys on either
# side). Ours: the Q-Former is the connector (multi_modal_projector).
BLIP2_CONNECTOR_AND_LLM: Layout = (
    Rule("query_tokens", "multi_modal_projector.query_tokens"),
    Rule("language_projection.*", "multi_modal_projector.language_projection.*"),
) + t5_rules("language_model.", "language_model.") + (Rule("language_model.*", "language_model.*"),)
BLIP2_LAYOUT = (eva_tower_rules("vision_model.", "vision_tower.") + BLIP2_CONNECTOR_AND_LLM
                + qformer_rules("qformer.", "multi_modal_projector.qformer.", embeddings="none"))
INSTRUCTBLIP_LAYOUT = (eva_tower_rules("vision_model.", "vision_tower.") + BLIP2_CONNECTOR_AND_LLM
                       + qformer_rules("qformer.", "multi_modal_projector.qformer.", embeddings="qformer"))
LYRICS_LAYOUT = (eva_tower_rules("vision_model.", "vision_tower.") + BLIP2_CONNECTOR_AND_LLM
                 + qformer_rules("qformer.", "multi_modal_projector.qformer.", embeddings="lyrics"))
# Blip2ForImageTextRetrieval (BLIP-2 stage 1, pretraining.QFormerStage1): the Q-Former with text
# input, its projections to the 256-d contrastive space and the ITM head, as transformers has
# them; the ITG head and the temperature, which transformers leaves out, under LAVIS's names.
BLIP2_RETRIEVAL_LAYOUT = eva_tower_rules("vision_model.", "vision_tower.") + (
    Rule("query_tokens", "query_tokens"),
    Rule("cls.predictions.transform.dense.*", "itg_head.dense.*"),
    Rule("cls.predictions.transform.LayerNorm.*", "itg_head.layer_norm.*"),
    Rule("cls.predictions.bias", "itg_head.bias"),
    Rule("temp", "temperature"),
    Rule("vision_projection.*", "vision_projection.*"),
    Rule("text_projection.*", "text_projection.*"),
    Rule("itm_head.*", "itm_head.*"),
) + qformer_rules("qformer.", "qformer.", embeddings="root")

# LION (JiuTian-LION's lion_t5.py, LAVIS names): the EVA tower with `ln_vision`, InstructBLIP's
# Q-Former (`query_tokens`, `Qformer.bert.*`, `t5_proj`), the vision aggregator (`fusion_adapter`:
# HF BertLayers; `ln_adapter`; `adapter_proj` = Sequential(Linear, GELU, Linear)), the soft prompt,
# and the Flan-T5 (`t5_model.*`) with an AdapterRouter in every feed-forward (`layer.1` of an
# encoder block, `layer.2` of a decoder block), whose two gate rows per adapter are
# `router_ratio1` / `router_ratio2` there and one (adapters, levels, width) tensor here. A LLaMA
# LLM (this codebase's decoder-only LION) sits under `llm_model.` with our names.
LION_LAYOUT: Layout = (
    Rule("ln_vision.*", "vision_tower.post_layernorm.*"),
    *lavis_eva_rules("visual_encoder.", "vision_tower."),
    Rule("query_tokens", "multi_modal_projector.query_tokens"),
    Rule("t5_proj.*", "multi_modal_projector.language_projection.*"),
    Rule("ln_adapter.*", "multi_modal_projector.vision_aggregator.layernorm.*"),
    Rule("adapter_proj.0.*", "multi_modal_projector.aggregator_projector.linear_1.*"),
    Rule("adapter_proj.2.*", "multi_modal_projector.aggregator_projector.linear_2.*"),
    Rule("soft_prompt_hint", "soft_prompt_hint"),
    *bert_layer_rules("fusion_adapter.blocks.*.", "multi_modal_projector.vision_aggregator.blocks.*.", attention="self"),
    *(rule for stack_name, feed_forward in (("encoder", 1), ("decoder", 2)) for rule in (
        Rule(f"t5_model.{stack_name}.block.*.layer.{feed_forward}.adapter.adapters.*",
             f"language_model.{stack_name}.layers.*.parallel_adapter.adapters.*"),
        Rule(tuple(f"t5_model.{stack_name}.block.*.layer.{feed_forward}.adapter.router_ratio{k}" for k in (1, 2)),
             f"language_model.{stack_name}.layers.*.parallel_adapter.router_gates", to_ours=stack, to_theirs=unstack))),
    *t5_rules("t5_model.", "language_model."),
    Rule("llm_model.*", "language_model.*"),
    *qformer_rules("Qformer.bert.", "multi_modal_projector.qformer.", embeddings="lavis"),
)

# Lynx (bytedance/lynx-llm `models/lynx.py`): the EVA ViT (`vision_encoder.*`, q/k/v split), the
# Perceiver resampler (`bridge.*`: per layer an attention `0` and a Sequential feed-forward `1` =
# LayerNorm, Linear, GELU, Linear), the LLaMA (`LLM.*`, LlamaForCausalLM names) with its output
# adapters, and the video frame positions.
LYNX_LAYOUT: Layout = (
    *lavis_eva_rules("vision_encoder.", "vision_tower.", split_qkv=True),
    Rule("bridge.latents", "multi_modal_projector.latents"),
    Rule("bridge.layers.*.0.norm_media.*", "multi_modal_projector.layers.*.norm_media.*"),
    Rule("bridge.layers.*.0.norm_latents.*", "multi_modal_projector.layers.*.norm_latents.*"),
    Rule("bridge.layers.*.0.to_q.weight", "multi_modal_projector.layers.*.cross_attn.q_proj.weight"),
    Rule("bridge.layers.*.0.to_kv.weight", tuple(f"multi_modal_projector.layers.*.cross_attn.{name}_proj.weight"
                                                  for name in "kv"), to_ours=split_in_two, to_theirs=join_two),
    Rule("bridge.layers.*.0.to_out.weight", "multi_modal_projector.layers.*.cross_attn.o_proj.weight"),
    Rule("bridge.layers.*.1.0.*", "multi_modal_projector.layers.*.mlp_norm.*"),
    Rule("bridge.layers.*.1.1.weight", "multi_modal_projector.layers.*.mlp.fc1.weight"),
    Rule("bridge.layers.*.1.3.weight", "multi_modal_projector.layers.*.mlp.fc2.weight"),
    Rule("bridge.norm.*", "multi_modal_projector.norm.*"),
    Rule("absolute_frame_pos_embed", "multi_modal_projector.frame_position_embedding"),
    *(Rule(f"LLM.model.layers.*.output_adapter.{theirs}", f"language_model.model.layers.*.output_adapter.{ours}")
      for theirs, ours in (("adapter_norm_before.*", "norm.*"), ("adapter_down.*", "down_proj.*"),
                           ("adapter_up.*", "up_proj.*"), ("scaling", "scale"))),
    Rule("LLM.*", "language_model.*"),
)

def openclip_block_rules(theirs: str, ours: str) -> Layout:
    """An OpenCLIP `ResidualAttentionBlock` (ln_1, nn.MultiheadAttention `attn`, ln_2, `mlp.c_fc` /
    `mlp.c_proj`) under `theirs` -> our PreNormBlock under `ours`: the attention's fused
    `in_proj_weight` / `in_proj_bias` (rows q, then k, then v) split in three. Matches every
    block number (the `*`)."""
    return (
        Rule(f"{theirs}attn.in_proj_weight", tuple(f"{ours}self_attn.{name}_proj.weight" for name in "qkv"),
             to_ours=split_in_three, to_theirs=join_three),
        Rule(f"{theirs}attn.in_proj_bias", tuple(f"{ours}self_attn.{name}_proj.bias" for name in "qkv"),
             to_ours=split_in_three, to_theirs=join_three),
        Rule(f"{theirs}attn.out_proj.*", f"{ours}self_attn.o_proj.*"),
        Rule(f"{theirs}ln_1.*", f"{ours}input_layernorm.*"),
        Rule(f"{theirs}ln_2.*", f"{ours}post_attention_layernorm.*"),
        Rule(f"{theirs}mlp.c_fc.*", f"{ours}mlp.fc1.*"),
        Rule(f"{theirs}mlp.c_proj.*", f"{ours}mlp.fc2.*"),
    )


# OpenCLIP's `CLIP` (and OpenAI's, whose names it keeps) -> our vision.CLIPModel, REACT's gated
# image blocks included (microsoft/react: `visual.transformer.resblocks.N.gated_attn_block.*`
# with scalar `alpha_attn` / `alpha_dense`, run before block N; our `gated_block`). The two
# projections are stored as x @ W, (width, embed_dim); ours are nn.Linear, so transposed.
OPENCLIP_LAYOUT: Layout = (
    *openclip_block_rules("visual.transformer.resblocks.*.gated_attn_block.",
                          "vision_model.encoder.layers.*.gated_block."),
    Rule("visual.transformer.resblocks.*.gated_attn_block.alpha_attn", "vision_model.encoder.layers.*.gated_block.alpha_attn"),
    Rule("visual.transformer.resblocks.*.gated_attn_block.alpha_dense",
         "vision_model.encoder.layers.*.gated_block.alpha_dense"),
    *openclip_block_rules("visual.transformer.resblocks.*.", "vision_model.encoder.layers.*."),
    Rule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    Rule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    Rule("visual.conv1.*", "vision_model.embeddings.patch_embedding.*"),
    Rule("visual.ln_pre.*", "vision_model.pre_layrnorm.*"),
    Rule("visual.ln_post.*", "vision_model.post_layernorm.*"),
    Rule("visual.proj", "visual_projection.weight", to_ours=transpose, to_theirs=transpose),
    *openclip_block_rules("transformer.resblocks.*.", "text_model.encoder.layers.*."),
    Rule("token_embedding.*", "text_model.embeddings.token_embedding.*"),
    Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Rule("ln_final.*", "text_model.final_layer_norm.*"),
    Rule("text_projection", "text_projection.weight", to_ours=transpose, to_theirs=transpose),
    Rule("logit_scale", "logit_scale"),
)


def openclip_config(state: dict[str, torch.Tensor], hidden_act: str = "quick_gelu",
                    head_width: int = 64) -> dict[str, Any]:
    """A CLIPConfig dict (transformers' CLIPConfig layout) read off an OpenCLIP state dict's
    shapes, for a converted release that ships no config.json. What shapes cannot say comes from
    OpenCLIP's conventions: heads = width / `head_width` (64 in every OpenCLIP ViT and text
    config), LayerNorm eps 1e-5, and `hidden_act`: quick_gelu for OpenAI-trained weights (REACT's
    `react_clip_*` names force it), "gelu" for OpenCLIP's own LAION-trained ones. The text is
    pooled at its highest token id (OpenCLIP's `text.argmax(dim=-1)`: EOT is the last id of
    CLIP's BPE), which a CLIP text config says with eos_token_id 2 (transformers' legacy rule)."""
    def blocks(prefix: str) -> list[str]:
        return sorted({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)}, key=int)

    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"not an OpenCLIP CLIP state dict: no {missing}")
    vision_width, _, patch_size, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision_layers = blocks("visual.transformer.resblocks.")
    gated = [n for n in vision_layers if f"visual.transformer.resblocks.{n}.gated_attn_block.alpha_attn" in state]
    text_width = state["token_embedding.weight"].shape[1]
    return {
        "projection_dim": state["visual.proj"].shape[1],
        "vision_config": dict(hidden_size=vision_width, patch_size=patch_size, image_size=grid * patch_size,
                              num_hidden_layers=len(vision_layers), num_attention_heads=vision_width // head_width,
                              intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                              hidden_act=hidden_act, layer_norm_eps=1e-5, num_gated_layers=len(gated)),
        "text_config": dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=text_width,
                            max_position_embeddings=state["positional_embedding"].shape[0],
                            num_hidden_layers=len(blocks("transformer.resblocks.")),
                            num_attention_heads=text_width // head_width,
                            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            hidden_act=hidden_act, layer_norm_eps=1e-5, eos_token_id=2),
    }


# Keys that hold no weights of their own in any layout: older transformers saved CLIP's arange
# position ids, T5 checkpoints may repeat the shared embedding under each stack's name, and old
# ones carry an unused position bias in the first cross-attention (transformers ignores it too).
IGNORED_KEY_SUFFIXES: tuple[str, ...] = ("embeddings.position_ids", "encoder.embed_tokens.weight",
                                         "decoder.embed_tokens.weight", "EncDecAttention.relative_attention_bias.weight")

# The layouts MLLM.from_pretrained reads, each recognised by a key prefix only it has, checked
# in this order.
MLLM_LAYOUTS: dict[str, tuple[str, Layout]] = {
    "LION (LAVIS names: visual_encoder.*, ln_vision, Qformer.bert.*, fusion_adapter.*, t5_model.*)":
        ("Qformer.bert.", LION_LAYOUT),
    "Lynx (vision_encoder.*, bridge.*, LLM.model.*)": ("bridge.", LYNX_LAYOUT),
    "BLIP-2 (vision_model.*, query_tokens, qformer.layernorm, language_projection.*, language_model.*)":
        ("qformer.layernorm.", BLIP2_LAYOUT),
    "Lyrics (vision_model.*, query_tokens, qformer.embeddings.LayerNorm, detection_crossattention, language_model.*)":
        ("qformer.embeddings.LayerNorm.", LYRICS_LAYOUT),
    "InstructBLIP (vision_model.*, query_tokens, qformer.embeddings.*, language_projection.*, language_model.*)":
        ("qformer.embeddings.", INSTRUCTBLIP_LAYOUT),
    "llava-hf (vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*)":
        ("vision_tower.vision_model.", LLAVA_HF_LAYOUT),
    "transformers 5 in memory (model.vision_tower.*, model.language_model.*, lm_head.weight)":
        ("model.vision_tower.embeddings.", TRANSFORMERS5_MEMORY_LAYOUT),
    "transformers 5 save_pretrained (vision_tower.embeddings.*, language_model.model.*)":
        ("vision_tower.embeddings.", TRANSFORMERS5_SAVED_LAYOUT),
    "original LLaVA (model.* LLaMA, model.mm_projector.*, lm_head.weight) + a CLIP checkpoint":
        ("model.mm_projector.", ORIGINAL_LLAVA_LAYOUT),
}


def detect_layout(state: dict[str, torch.Tensor], layouts: dict[str, tuple[str, Layout]],
                  source: str) -> tuple[str, Layout]:
    """(name, rules) of the first layout whose marker prefix occurs in the checkpoint, or an error
    that shows the checkpoint's first keys and every layout understood."""
    for name, (marker, layout) in layouts.items():
        if any(key.startswith(marker) for key in state):
            return name, layout
    understood = "\n".join(f"  {name}" for name in layouts)
    example = ", ".join(sorted(state)[:5])
    raise CheckpointError(f"{source}: unknown checkpoint layout (first keys: {example}); "
                          f"understood layouts:\n{understood}")


def state_to_ours(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names, weightless buffers dropped."""
    return convert_keys({key: value for key, value in state.items() if not key.endswith(IGNORED_KEY_SUFFIXES)},
                        layout, to="ours")


def state_to_theirs(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    return convert_keys(state, layout, to="theirs")


def load_over(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint (our names) that may hold only part of `model`: every key it has must
    be one of the model's, with its shape; what it lacks keeps the model's values. Prints which
    parts (module names two levels deep) the checkpoint held and which it left as they were."""
    load_state_strict(model, {**model.state_dict(), **state}, source)

    def parts(keys) -> str:
        return ", ".join(sorted({".".join(key.split(".")[:2]) for key in keys})) or "nothing"

    print(f"{source}: loaded {parts(state)}; kept as built: {parts(model.state_dict().keys() - state.keys())}",
          file=sys.stderr)


def fitted_to_release(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A partial release (our names) made to fit the model built from its components: a tower
    stored at another resolution (Lynx's 420 px) resizes the model's position grid to it, and an
    embedding or head with fewer rows than the model's grown vocabulary (Lynx's 32001 = Vicuna +
    [PAD], our image token after it) keeps the model's extra rows."""
    positions = state.get("vision_tower.embeddings.position_embedding.weight")
    if positions is not None and positions.shape != model.vision_tower.embeddings.position_embedding.weight.shape:
        model.vision_tower.interpolate_position_embedding(math.isqrt(positions.shape[0] - 1) *
                                                          model.config.vision_config.patch_size)
    own = model.state_dict()
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in state and key in own and state[key].shape[1:] == own[key].shape[1:] \
                and len(state[key]) < len(own[key]):
            state[key] = torch.cat([state[key], own[key][len(state[key]):].to(state[key].dtype)])
    return state


# ----------------------------------------------------------------------------------------------
# config.json translations: a public config.json <-> the fields of model.MLLMConfig, nested
# configs as their config.json dicts (MLLMConfig builds them; `config` below is an MLLMConfig)

# LION's MLLMConfig fields, kept in its config.json beside InstructBLIP's.
LION_FIELDS = ("aggregator_config", "visual_input", "num_adapters", "adapter_bottleneck", "adapter_router",
               "hint_token_index")


def llava_hf_config_fields(values: dict[str, Any]) -> dict[str, Any]:
    """From a llava-hf config.json (LlavaConfig, or LlavaNextConfig: AnyRes with its
    image_grid_pinpoints). Fields transformers lacks (projector_type, image_aspect_ratio,
    mm_patch_merge_type, Lynx's output_adapter_every) are our extra keys; without them the llava-hf
    projector is LLaVA-1.5's MLP, the aspect ratio LLaVA-1.5's padding (LLaVA-NeXT's AnyRes with
    unpadding for llava_next), and there are no adapters."""
    if values.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {values['projector_hidden_act']!r} is not supported (only gelu)")
    if not isinstance(values.get("vision_feature_layer", -2), int):
        raise ValueError("vision_feature_layer must be one layer index (several layers are not supported)")
    text = values.get("text_config", {})
    anyres = values.get("model_type") == "llava_next"
    next_fields = {key: values[key] for key in ("image_grid_pinpoints", "mm_patch_merge_type") if key in values}
    return dict(
        vision_config={"model_type": "clip_vision_model", **values.get("vision_config", {})}, text_config=text,
        projector_type=values.get("projector_type", "mlp2x_gelu"),
        image_token_index=values.get("image_token_index", values.get("image_token_id", 32000)),
        pad_token_id=values.get("pad_token_id", text["pad_token_id"] if text.get("pad_token_id") is not None
                                else 32001),
        vision_feature_layer=values.get("vision_feature_layer", -2),
        vision_feature_select_strategy=values.get("vision_feature_select_strategy", "default"),
        image_aspect_ratio=values.get("image_aspect_ratio", "anyres" if anyres else "pad"),
        output_adapter_every=values.get("output_adapter_every", 0), **next_fields)


def llava_hf_config_json(config: Any, num_image_tokens: int) -> dict[str, Any]:
    """A config.json transformers' LlavaForConditionalGeneration reads (it keeps our extra keys), or
    with AnyRes LlavaNextForConditionalGeneration's (which knows only LLaVA-NeXT's unpadded merge:
    LLaVA-1.5-HD's `mm_patch_merge_type` "spatial" is read here only)."""
    anyres = config.image_aspect_ratio == "anyres"
    return {
        "architectures": ["LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if anyres else "llava",
        **({"image_grid_pinpoints": config.image_grid_pinpoints, "mm_patch_merge_type": config.mm_patch_merge_type}
           if config.image_grid_pinpoints else {}),
        "vision_config": config.vision_config.to_dict(),
        "text_config": {**config.text_config.to_dict(), "pad_token_id": config.pad_token_id},
        "image_token_index": config.image_token_index, "pad_token_id": config.pad_token_id,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "image_seq_length": num_image_tokens,
        "tie_word_embeddings": config.text_config.tie_word_embeddings,
        "projector_type": config.projector_type, "image_aspect_ratio": config.image_aspect_ratio,
        **({"output_adapter_every": config.output_adapter_every} if config.output_adapter_every else {}),
    }


def t5_head_tying(values: dict[str, Any], state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """A T5 config.json with its head tied exactly when the checkpoint has no head of its own:
    transformers 5 writes `tie_word_embeddings: true` for every T5 (with `scale_decoder_outputs`
    saying whether to rescale) and then keeps an lm_head that differs from the embedding untied;
    we do the same."""
    head, embedding = state.get(f"{prefix}lm_head.weight"), state.get(f"{prefix}shared.weight")
    own_head = head is not None and not (embedding is not None and torch.equal(head, embedding))
    return {**values, "tie_word_embeddings": values.get("tie_word_embeddings", True) and not own_head}


def blip2_config_fields(values: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """From a transformers Blip2Config / InstructBlipConfig config.json (and its checkpoint, which
    says whether a T5 head is tied). InstructBLIP's Q-Former always reads text. The LLM must be
    LLaMA-family or T5. LION's config.json is InstructBLIP's with model_type "lion" and LION_FIELDS;
    Lyrics' (model_type "lyrics") adds `num_grounding_queries`, or the official code's split of
    its queries, `num_vit_query_tokens` + `num_dino_query_tokens` (names as the code has them; the
    release's config.json was not available to check)."""
    lion = values.get("model_type") == "lion"
    instruct = values.get("model_type") in ("instructblip", "lion")
    qformer = values.get("qformer_config", {})
    grounding = values.get("num_grounding_queries", qformer.get("num_dino_query_tokens", 0))
    visual = qformer.get("num_vit_query_tokens", values.get("num_query_tokens", 32))
    text = values.get("text_config", {})
    if text.get("model_type", "llama") not in ("llama", "t5"):
        raise ValueError(f"text_config.model_type {text['model_type']!r}: only LLaMA-family and T5 language "
                         f"models load here (BLIP-2's OPT does not)")
    image_token_index = values.get("image_token_index", values.get("image_token_id"))
    if image_token_index is None:
        raise ValueError("config.json has no image_token_index: transformers >= 4.47 writes num_query_tokens image "
                         "tokens before BOS and fills them with the query outputs; set it to the image token's id")
    if text.get("model_type") == "t5":
        text = t5_head_tying(text, state, "language_model.")
    return dict(
        vision_config={"model_type": "blip_2_vision_model", **values.get("vision_config", {})}, text_config=text,
        projector_type="lion" if lion else "qformer",
        qformer_config={**qformer, "use_qformer_text_input": instruct or qformer.get("use_qformer_text_input", False)},
        num_query_tokens=visual, num_grounding_queries=grounding, spatial_prompt=values.get("spatial_prompt", False),
        image_token_index=image_token_index,
        pad_token_id=text["pad_token_id"] if text.get("pad_token_id") is not None else 0,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_aspect_ratio=values.get("image_aspect_ratio", "square"),
        **{key: values[key] for key in LION_FIELDS if lion and key in values})


def blip2_config_json(config: Any) -> dict[str, Any]:
    """A config.json transformers' Blip2ForConditionalGeneration (or InstructBLIP's) reads; LION's
    and Lyrics' add their fields (transformers has neither)."""
    instruct = config.qformer_config.use_qformer_text_input
    family = "instructblip" if instruct else "blip_2"
    lion = {key: getattr(config, key) for key in LION_FIELDS} if config.projector_type == "lion" else {}
    if lion:
        lion["aggregator_config"] = config.aggregator_config.to_dict()
    lyrics = ({"num_grounding_queries": config.num_grounding_queries, "spatial_prompt": config.spatial_prompt}
              if config.num_grounding_queries else {})
    vision = config.vision_config.to_dict()
    if vision["model_type"] == "blip_2_vision_model":
        vision["model_type"] = f"{family}_vision_model"
    return {
        "architectures": ["LION"] if lion else ["LyricsLMForConditionalGeneration"] if lyrics else
        ["InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"],
        "model_type": "lion" if lion else "lyrics" if lyrics else "instructblip" if instruct else "blip-2",
        "vision_config": vision,
        "qformer_config": {**config.qformer_config.to_dict(), "model_type": f"{family}_qformer"},
        "text_config": {**config.text_config.to_dict(), "pad_token_id": config.pad_token_id},
        "num_query_tokens": config.num_query_tokens, "image_token_index": config.image_token_index,
        "use_decoder_only_language_model": not config.text_config.is_encoder_decoder,
        "tie_word_embeddings": config.text_config.tie_word_embeddings,
        "image_aspect_ratio": config.image_aspect_ratio, **lion, **lyrics,
    }


# Lynx's MLLMConfig fields in its config.json (our own: the official code has none), beside the
# nested vision, text and resampler configs.
LYNX_FIELDS = ("projector_type", "output_adapter_every", "image_token_index", "pad_token_id", "vision_feature_layer",
               "vision_feature_select_strategy", "image_aspect_ratio")


def lynx_config_fields(values: dict[str, Any]) -> dict[str, Any]:
    """From the config.json lynx_config_json writes."""
    return dict(vision_config=values["vision_config"], text_config=values["text_config"],
                resampler_config=values["resampler_config"], **{key: values[key] for key in LYNX_FIELDS if key in values})


def lynx_config_json(config: Any) -> dict[str, Any]:
    return {"architectures": ["Lynx"], "model_type": "lynx", "vision_config": config.vision_config.to_dict(),
            "text_config": config.text_config.to_dict(), "resampler_config": config.resampler_config.to_dict(),
            **{key: getattr(config, key) for key in LYNX_FIELDS}}


def original_llava_config_fields(values: dict[str, Any]) -> dict[str, Any]:
    """From an original LLaVA config.json (LlamaConfig fields plus mm_* fields), all but the vision
    tower's, which comes from its CLIP checkpoint. Its image token never enters the vocabulary
    (LLaVA splices features at the id -200), so ours is vocab_size, an id that is never embedded;
    padding uses <unk> = 0 as LLaVA's vicuna_v1 does. LLaVA-NeXT's `image_grid_pinpoints` are
    (width, height) pairs there, (height, width) here."""
    feature = values.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    aspect = values.get("image_aspect_ratio")
    return dict(
        text_config=values, projector_type=values.get("mm_projector_type", "linear"),
        image_token_index=values.get("vocab_size", 32000),
        pad_token_id=values["pad_token_id"] if values.get("pad_token_id") is not None else 0,
        vision_feature_layer=values.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        image_aspect_ratio=aspect if aspect in ("pad", "anyres") else "square",
        **(dict(image_grid_pinpoints=[[height, width] for width, height in values["image_grid_pinpoints"]],
                mm_patch_merge_type=values.get("mm_patch_merge_type", "flat")) if aspect == "anyres" else {}))


# ----------------------------------------------------------------------------------------------
# Converting official pickles, once: python checkpoints.py convert SRC DST

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def tensors_in(value: Any, prefix: str, where: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle, flattened to dotted keys (list items by index). Plain
    values beside them (an "epoch", a "config") are skipped, with their names printed; anything
    else than tensors, containers and plain values is refused."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        found = {}
        for key, item in items:
            found.update(tensors_in(item, f"{prefix}.{key}" if prefix else str(key), where))
        return found
    if value is None or isinstance(value, (int, float, str, bool)):
        print(f"{where}: skipped {prefix or '(top level)'} ({type(value).__name__}, not a tensor)", file=sys.stderr)
        return {}
    raise CheckpointError(f"{where}: {prefix or '(top level)'} is a {type(value).__name__}; "
                          f"a checkpoint must hold only tensors (in dicts and lists)")


def state_dict_of_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official pickled checkpoint, read without running code from it:
    `weights_only=True` unpickles tensors and plain containers only. When every tensor sits
    under one wrapper key ("model" in LAVIS and lynx-llm, "state_dict", "module"; REACT's OpenCLIP
    files nest two, "state_dict" then DDP's "module"), the wrappers are dropped from the names;
    otherwise key names stay as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: expected a pickled checkpoint ({', '.join(PICKLE_SUFFIXES)})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others by cause
        # torch's message goes on to suggest weights_only=False; keep only what it found.
        lines = str(error).splitlines() or [repr(error)]
        found = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise CheckpointError(f"{path}: not a weights-only checkpoint (it holds something other than "
                              f"tensors and plain containers, or is not a torch pickle): {found}") from error
    state = tensors_in(loaded, "", path)
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    while wrapper := next((w for w in ("model.", "state_dict.", "module.") if all(k.startswith(w) for k in state)), None):
        state = {key.removeprefix(wrapper): value for key, value in state.items()}
    return state


def convert_pickle(source: str | Path, destination: str | Path) -> Path:
    """Write the tensors of a pickled checkpoint as safetensors, keys unchanged. `destination` is
    a .safetensors file or a directory (then DIR/model.safetensors). Tied tensors are copied,
    since safetensors refuses shared storage."""
    state = state_dict_of_pickle(source)
    destination = Path(destination)
    target = destination if destination.suffix == ".safetensors" else destination / WEIGHTS_NAME
    save_safetensors({key: value.clone() for key, value in state.items()}, target)
    return target


def convert_shards(sources: list[str | Path], destination: str | Path) -> Path:
    """A sharded pickled release (pytorch_model-0000k-of-0000n.bin, as Lyrics' 14B ships) as
    sharded safetensors in DIR with the hub's model.safetensors.index.json, which
    load_safetensors reads; one shard in memory at a time. A key in two shards is an error."""
    destination = Path(destination)
    weight_map: dict[str, str] = {}
    for number, source in enumerate(sources, start=1):
        name = f"model-{number:05d}-of-{len(sources):05d}.safetensors"
        keys = load_safetensors(convert_pickle(source, destination / name)).keys()
        repeated = sorted(set(keys) & set(weight_map))
        if repeated:
            raise CheckpointError(f"{source}: {repeated[:5]} are in {weight_map[repeated[0]]} already")
        weight_map.update(dict.fromkeys(keys, name))
    index = destination / WEIGHTS_INDEX_NAME
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="an official .pth/.pt/.bin checkpoint -> safetensors, "
                                                  "key names unchanged")
    convert.add_argument("sources", nargs="+", help="the pickled checkpoint file, or its shards in order")
    convert.add_argument("destination", help="a .safetensors file, or a directory for model.safetensors "
                                             "(shards: model-0000k-of-0000n.safetensors + the index)")
    args = parser.parse_args(argv)
    if len(args.sources) > 1:
        target = convert_shards(args.sources, args.destination)
    else:
        target = convert_pickle(args.sources[0], args.destination)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
