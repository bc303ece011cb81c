"""Train any staged recipe of nanoMLLM from one plain-Python config.

    python train.py configs/llava15.py                    # every stage, in order
    python train.py configs/llava15.py --stage finetune   # one stage (starts from the previous one's output)
    python train.py configs/llava15.py --resume           # continue exactly where the last run stopped
    python train.py configs/llava15.py --micro_batch_size=4 --finetune.learning_rate=1e-5
    python train.py configs/llava15.py --estimate_memory [--processes 8]   # bytes per GPU, DDP vs FSDP
    torchrun --nproc_per_node 8 train.py configs/llava15.py

A recipe is a list of stages (LLaVA: stage 1 "feature alignment" then stage 2 "instruction
tuning", dissertation section 3.4; LLaVA-1.5 section 4.3). A stage says where its model
starts, which parameters train (regexes; everything else frozen), its optimizer and schedule
(AdamW, linear warmup then cosine decay to a floor, no weight decay on norms and biases), its
global batch (micro-batches x gradient accumulation x processes), how long, and its data. Stage
outputs go to `out_dir/<stage>/` in the llava-hf layout, so `eval.py` and transformers read them.

Config precedence, lowest first: StageConfig defaults < top-level names in the config file (they
apply to every stage) < the stage's own dict < `--key=value` on the command line (every stage)
< `--stage_name.key=value`. Unknown keys and values of the wrong type stop the run before any work.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

import conversation
import data
import parallel
import probe
import refiner
from adapters import TASK_LEVELS, apply_lora, set_trainable
from connectors import VISUAL_INPUTS, QFormerConfig
from layers import IGNORE_INDEX
from metrics import vision_ladder
from model import (MLLM, LanguageModel, MLLMConfig, T5Config, T5LanguageModel, TextConfig,
                   language_model_from_pretrained)
from pretraining import LyricsStage1, LyricsStage1Config, QFormerStage1, QFormerStage1Config
from retrieval import CLASSIFICATION_TASK, retrieve_for_task, run_zero_shot_classification
from vision import CLIPConfig, CLIPModel, VisionTransformer


# ----------------------------------------------------------------------------------------------
# 1. Configuration

@dataclass
class StageConfig:
    """One stage of a recipe. Defaults are LLaVA-1.5's stage 2 (the official scripts/v1_5/finetune.sh)."""
    name: str = ""
    # "mllm" (LLaVA / BLIP-2 stage 2 / InstructBLIP stages), "clip" (contrastive pretraining),
    # "lm" (text pretraining), "qformer" (BLIP-2 stage 1: ITC + ITM + ITG, pretraining.QFormerStage1),
    # "lyrics" (the MQ-Former's pretraining: ITC + ITM + ICG + MSP, pretraining.LyricsStage1)
    objective: str = "mllm"
    # Where the model starts: "previous" (the last stage's output), "components" (vision_path +
    # language_path + a fresh connector: LLaVA stage 1; for a "qformer" model.projector_type,
    # vision_path is the stage-1 Q-Former; for the qformer objective, a tower + a fresh Q-Former of
    # `architecture`), "scratch" (`architecture`, random init), or a checkpoint directory.
    init: str = "previous"
    vision_path: str = ""  # a CLIP / EVA checkpoint (or Q-Former stage), or the name of an earlier stage
    refiner: str = ""  # Lyrics: the visual refiner's directory (refiner.py) for the grounding queries
    spatial_prompt: bool = False  # Lyrics (sec. 3.3): the objects' spatial representation before each question
    language_path: str = ""  # a LlamaForCausalLM checkpoint, or the name of an earlier stage
    architecture: dict = field(default_factory=dict)  # config.json-style dims for init="scratch"
    data: str = ""  # LLaVA instruction JSON / jsonl (mllm, clip) or {"text"} jsonl (lm)
    # clip: add the region-phrase loss on the records' grounded "regions" (vision.CLIPModel.forward)
    region_loss: bool = False
    # REACT (dissertation section 2.3), clip objective: gated blocks before the tower's last
    # `gated_image_layers` blocks (locked-text gated-image tuning trains them alone:
    # trainable=[r"\.gated_block\."]); `positive_threshold`, eq. 2.5-2.6's gamma (0: CLIP's
    # one-to-one pairs); `retrieval`, the stage's data retrieved from a pool of image-text pairs
    # (retrieval.retrieve_pairs): {"task": a classification task file (its classes and templates are
    # the queries), "pool": LLaVA caption JSON, "per_concept": K, "by": "text" (T2T) or "image" (T2I)}.
    gated_image_layers: int = 0
    positive_threshold: float = 0.0
    retrieval: dict = field(default_factory=dict)
    image_folder: str = ""
    # "pad" (expand to square with the mean color) or "square" (CLIP's resize + center crop);
    # "" = the model's. LLaVA-1.5 pads in stage 2 only: its pretrain.sh leaves the default.
    image_aspect_ratio: str = ""
    # Lynx's resolution enhancement (sec. 2.2): the tower's input size from this stage on, its
    # position grid interpolated (vision.VisionTransformer.interpolate_position_embedding); 0 = as is.
    image_size: int = 0
    template: str = "vicuna_v1"
    max_seq_len: int = 2048
    # LION (sec. 3.1.2, 3.2): which visual tokens the LLM reads this stage ("ALL", "QFORMER",
    # "AGGREGATOR"; "" = the model's), which task levels of the data it trains on ([] = all), and
    # a tags file whose tag sentence goes before each image's first question, `tag_noise` of it
    # wrong, its hint the token `soft_prompt` whose embedding is learned ("" = plain words).
    visual_input: str = ""
    task_levels: list = field(default_factory=list)
    tags: str = ""
    tag_noise: float = 0.0
    soft_prompt: str = ""
    # The ladder's top rung (the main job's results.json): an objects file (the shapes world's
    # tags.json) whose scene text replaces every image, in training and in eval (perfect vision).
    oracle_text: str = ""
    trainable: list = field(default_factory=lambda: [r"^multi_modal_projector\.", r"^language_model\."])
    lora: dict = field(default_factory=dict)  # {"targets": [...], "rank": 128, "alpha": 256, "dropout": 0.05}
    learning_rate: float = 2e-5
    # After warmup, "cosine" (LLaVA) or "linear" (Lynx, Table 8) decay to learning_rate * min_lr_ratio.
    schedule: str = "cosine"
    # Per-module learning rates: [{"pattern": regex, "learning_rate": x, "schedule": SCHEDULES}].
    # LLaVA-1.5 LoRA trains the projector at 2e-5 beside LoRA at 2e-4; LION keeps its aggregator at 1e-5.
    param_groups: list = field(default_factory=list)
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    global_batch_size: int = 128
    micro_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int = 0  # when > 0, the stage's length in optimizer steps (the schedule follows it)
    gradient_checkpointing: bool = False
    # Several processes: "ddp" (a replica each) or "fsdp" (FSDP2: weights, gradients and AdamW
    # moments sharded, ZeRO-3 as LLaVA's DeepSpeed setting; parallel.py).
    parallel: str = "ddp"
    # Pack each micro-batch's samples into rows of up to max_seq_len tokens, each sample
    # attending to itself only (data.pack_rows); decoder-only LLMs.
    pack: bool = False


@dataclass
class TrainConfig:
    out_dir: str = "out"
    seed: int = 1337
    tokenizer: str = ""  # tokenizer.json, or a directory holding one
    qformer_tokenizer: str = ""  # the Q-Former's own (BERT WordPiece + [DEC]): the qformer objective, InstructBLIP
    model: dict = field(default_factory=dict)  # MLLMConfig overrides for init="components"
    stages: list = field(default_factory=list)
    world: dict = field(default_factory=dict)  # shapes.build_world(**world) before the first stage
    # Lyrics: refiner.write_oracle_refiner(world, tower, out) before the first stage, unless `out` holds one
    oracle_refiner: dict = field(default_factory=dict)
    eval_tasks: list = field(default_factory=list)  # eval.run_eval after the last stage
    eval_blind: bool = False  # also evaluate with every image replaced by zeros
    # The oracle-text run's results.json (configs/shapes_oracle_text.py): with it, results.json's
    # "ladder" gives each reported metric blind / image / oracle_text and the vision gap closed.
    oracle_results: str = ""
    # The last stage's held-out curve: every `curve_every` steps, each eval task on its first
    # `curve_samples` samples (logs/<stage>_held_out.jsonl and .png); 0 = none.
    curve_every: int = 0
    curve_samples: int = 32
    device: str = "auto"  # "auto": cuda if available, else cpu
    # torch.compile each transformer block (parallel.compile_blocks): "auto" = on CUDA only
    compile: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end of each stage)
    stop_after_steps: int = 0  # stop the current stage after this many steps, checkpointed (time-boxed jobs)
    on_data_error: str = "skip"  # "skip" (count, report each epoch) or "raise"
    overwrite: bool = False  # train a stage again although out_dir already holds its finished model


def check_type(key: str, value, annotation) -> None:
    """Raise unless `value` fits the field's annotation (ints pass for floats, lists for tuples)."""
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": (list, tuple),
                "tuple": (list, tuple), "dict": dict}[str(annotation).split("[")[0]]
    is_bool_for_number = isinstance(value, bool) and annotation in ("int", "float")
    if not isinstance(value, expected) or is_bool_for_number:
        raise TypeError(f"config key {key!r} must be {annotation}, got {value!r} ({type(value).__name__})")


def parse_value(text: str):
    """A command-line value: a Python literal if it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str, overrides: list[str]) -> tuple[TrainConfig, list[StageConfig]]:
    """Execute the config file, apply `--key=value` overrides, check every key and type."""
    train_fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    stage_fields = {f.name: f.type for f in dataclasses.fields(StageConfig)}
    namespace: dict = {"__file__": path}  # a config may build on another: see configs/llava15_lora.py
    exec(compile(Path(path).read_text(), path, "exec"), namespace)
    values = {key: value for key, value in namespace.items()
              if not key.startswith("_") and not isinstance(value, type(sys)) and not callable(value)}
    for key in values:
        if key not in train_fields and key not in stage_fields:
            raise KeyError(f"{path}: unknown config key {key!r}")
    stage_dicts = [dict(stage) for stage in values.get("stages", [])]
    stage_names = [stage.get("name", "") for stage in stage_dicts]
    if not all(stage_names) or len(set(stage_names)) != len(stage_names):
        raise ValueError(f"{path}: every stage needs a unique 'name' (got {stage_names})")

    cli_every_stage, cli_per_stage = {}, {}
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"expected --key=value, got {item!r}")
        key, text = item[2:].split("=", 1)
        if "." in key and train_fields.get(key.split(".")[0]) == "dict":  # one key of a dict: --model.num_adapters=2
            setting, key = key.split(".", 1)
            values[setting] = {**values.get(setting, {}), key: parse_value(text)}
        elif "." in key:
            stage_name, key = key.split(".", 1)
            if stage_name not in stage_names:
                raise KeyError(f"--{stage_name}.{key}: no stage named {stage_name!r} (stages: {stage_names})")
            if key not in stage_fields:
                raise KeyError(f"--{stage_name}.{key}: unknown stage key {key!r}")
            cli_per_stage.setdefault(stage_name, {})[key] = parse_value(text)
        elif key == "stages":
            raise KeyError("--stages: stages are edited in the config file; override one with --stage_name.key=value")
        elif key in train_fields:
            values[key] = parse_value(text)
        elif key in stage_fields:
            cli_every_stage[key] = parse_value(text)
        else:
            raise KeyError(f"--{key}: unknown config key")

    config = TrainConfig(**{key: value for key, value in values.items() if key in train_fields})
    shared = {key: value for key, value in values.items() if key in stage_fields}
    stages = []
    for stage in stage_dicts:
        for key in stage:
            if key not in stage_fields:
                raise KeyError(f"{path}: stage {stage['name']!r} has unknown key {key!r}")
        merged = {**shared, **stage, **cli_every_stage, **cli_per_stage.get(stage["name"], {})}
        stages.append(StageConfig(**merged))
    for name, value in dataclasses.asdict(config).items():
        check_type(name, value, train_fields[name])
    if config.save_every < 1 or config.log_every < 1:
        raise ValueError("save_every and log_every must be >= 1")
    for stage in stages:
        for name, value in dataclasses.asdict(stage).items():
            check_type(f"{stage.name}.{name}", value, stage_fields[name])
        check_stage(stage)
    check_choice("on_data_error", config.on_data_error, ("skip", "raise"))
    check_choice("compile", config.compile, ("auto", "on", "off"))
    model_fields = {f.name for f in dataclasses.fields(MLLMConfig)} - {"vision_config", "text_config"}
    for key in config.model:
        if key not in model_fields:
            raise KeyError(f"model.{key}: not an MLLMConfig field ({sorted(model_fields)})")
    check_choice("model.image_aspect_ratio", config.model.get("image_aspect_ratio", "pad"), ("pad", "square", "anyres"))
    for task in config.eval_tasks:
        if "task" not in task:
            raise KeyError(f"eval_tasks: {task} has no 'task'")
    return config, stages


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"config key {key!r} must be one of {choices}, not {value!r}")


def check_stage(stage: StageConfig) -> None:
    """What the types alone do not catch, before any work starts."""
    where = f"stage {stage.name!r}"
    check_choice(f"{stage.name}.objective", stage.objective, ("mllm", "clip", "lm", "qformer", "lyrics"))
    if stage.objective == "lyrics" and not stage.refiner:
        raise ValueError(f"{where}: the lyrics objective needs a `refiner` directory (refiner.py)")
    check_choice(f"{stage.name}.template", stage.template, tuple(conversation.TEMPLATES))
    check_choice(f"{stage.name}.image_aspect_ratio", stage.image_aspect_ratio, ("", "pad", "square", "anyres"))
    check_choice(f"{stage.name}.visual_input", stage.visual_input, ("", *VISUAL_INPUTS))
    check_choice(f"{stage.name}.parallel", stage.parallel, parallel.PARALLEL)
    if stage.pack and stage.objective not in ("mllm", "lm"):
        raise ValueError(f"{where}: pack joins the samples of a language-modeling batch (mllm, lm), not {stage.objective!r}")
    check_choice(f"{stage.name}.schedule", stage.schedule, SCHEDULES[:2])
    for level in stage.task_levels:
        check_choice(f"{stage.name}.task_levels", level, tuple(TASK_LEVELS))
    if stage.image_aspect_ratio == "anyres" and stage.objective != "mllm":
        raise ValueError(f"{where}: image_aspect_ratio 'anyres' tiles an MLLM's images; {stage.objective!r} has none")
    if stage.image_size and stage.objective != "mllm":
        raise ValueError(f"{where}: image_size resizes an MLLM's tower; the {stage.objective!r} objective has none")
    for key in ("region_loss", "gated_image_layers", "positive_threshold", "retrieval"):
        if getattr(stage, key) and stage.objective != "clip":
            raise ValueError(f"{where}: {key} belongs to the clip objective (CLIP, REACT), not to {stage.objective!r}")
    if not 0 <= stage.positive_threshold <= 1:
        raise ValueError(f"{where}: positive_threshold is a cosine gamma in (0, 1], or 0 for CLIP's pairs")
    unknown = set(stage.retrieval) - {"task", "pool", "per_concept", "by"}
    if unknown or (stage.retrieval and not {"task", "pool", "per_concept"} <= set(stage.retrieval)):
        raise KeyError(f"{where}: retrieval needs 'task', 'pool', 'per_concept' and may have 'by' "
                       f"(unknown: {sorted(unknown)})")
    if stage.retrieval:
        check_choice(f"{stage.name}.retrieval.by", stage.retrieval.get("by", "text"), ("text", "image"))
    if stage.micro_batch_size < 1 or stage.global_batch_size % stage.micro_batch_size:
        raise ValueError(f"{where}: global_batch_size {stage.global_batch_size} is not a multiple of "
                         f"micro_batch_size {stage.micro_batch_size}")
    for group in stage.param_groups:
        unknown = set(group) - {"pattern", "learning_rate", "schedule"}
        if unknown or "pattern" not in group:
            raise KeyError(f"{where}: param_groups entry {group} needs 'pattern' and may have 'learning_rate', "
                           f"'schedule' (unknown: {sorted(unknown)})")
        check_choice(f"{stage.name}.param_groups.schedule", group.get("schedule", stage.schedule), SCHEDULES)
    unknown = set(stage.lora) - {"targets", "rank", "alpha", "dropout"}
    if unknown or (stage.lora and "targets" not in stage.lora):
        raise KeyError(f"{where}: lora needs 'targets' and may have 'rank', 'alpha', 'dropout' (unknown: {sorted(unknown)})")
    for pattern in [*stage.trainable, *(g["pattern"] for g in stage.param_groups), *stage.lora.get("targets", [])]:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{where}: bad regex {pattern!r}: {error}") from None


# ----------------------------------------------------------------------------------------------
# 2. Models and data per objective

def resolve_path(path: str, out_dir: Path, stage_names: list[str]) -> str:
    """A stage name stands for that stage's output directory."""
    return str(out_dir / path) if path in stage_names else path


def build_model(stage: StageConfig, config: TrainConfig, previous: Path | None, stage_names: list[str],
                tokenizer) -> torch.nn.Module:
    """The stage's starting model: from the previous stage, from components, from scratch or a path."""
    out_dir = Path(config.out_dir)
    model_class = {"mllm": MLLM, "clip": CLIPModel, "lm": LanguageModel, "qformer": QFormerStage1,
                   "lyrics": LyricsStage1}[stage.objective]
    if stage.init == "scratch":
        architecture = {"vocab_size": tokenizer.get_vocab_size(), **stage.architecture}
        if stage.objective == "clip":
            text = {"vocab_size": tokenizer.get_vocab_size(), **architecture.get("text_config", {}),
                    "bos_token_id": tokenizer.token_to_id(conversation.BOS_TOKEN),
                    "eos_token_id": tokenizer.token_to_id(conversation.EOS_TOKEN),
                    "pad_token_id": tokenizer.token_to_id("<pad>")}
            if text["eos_token_id"] == 2:
                raise ValueError(f"stage {stage.name!r}: the tokenizer's </s> is id 2, which a CLIP text config reads "
                                 f"as 'pool at the highest token id' (transformers' legacy rule); give </s> another id")
            return CLIPModel(CLIPConfig.from_dict({**architecture, "text_config": text}))
        if stage.objective == "lm" and architecture.pop("model_type", "llama") == "t5":
            # Flan-T5's defaults for what `architecture` leaves out; T5 starts decoding from <pad>.
            pad = tokenizer.token_to_id("<pad>")
            return T5LanguageModel(T5Config(**{**architecture, "pad_token_id": pad, "decoder_start_token_id": pad,
                                               "eos_token_id": tokenizer.token_to_id(conversation.EOS_TOKEN)}))
        if stage.objective == "lm":
            return LanguageModel(TextConfig.from_dict({
                **architecture, "bos_token_id": tokenizer.token_to_id(conversation.BOS_TOKEN),
                "eos_token_id": tokenizer.token_to_id(conversation.EOS_TOKEN), "pad_token_id": tokenizer.token_to_id("<pad>")}))
        raise ValueError(f"stage {stage.name!r}: init='scratch' is for the clip and lm objectives")
    if stage.init == "components" and stage.objective == "qformer":
        return new_qformer_stage1(stage, config, resolve_path(stage.vision_path, out_dir, stage_names))
    if stage.init == "components" and stage.objective == "lyrics":
        return new_lyrics_stage1(stage, config, resolve_path(stage.vision_path, out_dir, stage_names))
    if stage.init == "components":
        if stage.objective != "mllm":
            raise ValueError(f"stage {stage.name!r}: init='components' builds an MLLM or a stage-1 Q-Former")
        overrides = dict(config.model)
        for key, token in (("image_token_index", conversation.IMAGE_PLACEHOLDER), ("pad_token_id", "<pad>")):
            if key not in overrides and tokenizer.token_to_id(token) is not None:
                overrides[key] = tokenizer.token_to_id(token)
        paths = [resolve_path(path, out_dir, stage_names) for path in (stage.vision_path, stage.language_path)]
        for path in paths:
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"stage {stage.name!r}: no checkpoint at {path!r} (vision_path / language_path)")
        if overrides.get("projector_type") in ("qformer", "lion"):
            # The Q-Former's dims come from its stage-1 checkpoint; only whether it reads the
            # instruction (InstructBLIP, LION) is this stage's choice.
            qformer = overrides.pop("qformer_config", {}) or {}
            instruction_aware = qformer.get("use_qformer_text_input", overrides["projector_type"] == "lion")
            return MLLM.from_qformer_and_language(*paths, instruction_aware, **overrides)
        return MLLM.from_vision_and_language(*paths, **overrides)
    source = previous if stage.init == "previous" else Path(resolve_path(stage.init, out_dir, stage_names))
    if source is None:
        raise ValueError(f"stage {stage.name!r} starts from 'previous' but no stage ran before it")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage.name!r}: no checkpoint at {source} (run the stage that writes it first)")
    if stage.objective == "lm":
        return language_model_from_pretrained(str(source))
    return model_class.from_pretrained(str(source))


def new_qformer_stage1(stage: StageConfig, config: TrainConfig, vision_path: str) -> QFormerStage1:
    """BLIP-2 stage 1's start: the tower of `vision_path` (CLIP or EVA), a fresh Q-Former of
    `stage.architecture` (qformer_config dims, num_query_tokens, image_text_hidden_size) with BERT's
    initialization, its vocabulary and [DEC] token from the Q-Former tokenizer."""
    if not (Path(vision_path) / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage.name!r}: no checkpoint at {vision_path!r} (vision_path)")
    qformer_tokenizer = data.load_qformer_tokenizer(config.qformer_tokenizer)
    tower = VisionTransformer.from_pretrained(vision_path)
    architecture = dict(stage.architecture)
    qformer_values = {**architecture.pop("qformer_config", {}), "vocab_size": qformer_tokenizer.get_vocab_size(),
                      "encoder_hidden_size": tower.config.hidden_size, "use_qformer_text_input": True}
    stage1_config = QFormerStage1Config(vision_config=tower.config, qformer_config=QFormerConfig(**qformer_values),
                                        decoder_bos_token_id=qformer_tokenizer.token_to_id(data.QFORMER_DECODER_TOKEN),
                                        **architecture)
    model = QFormerStage1(stage1_config)
    model.initialize_weights()
    model.vision_tower = tower
    return model


def lyrics_qformer_tokenizer(config: TrainConfig) -> Tokenizer:
    """The Q-Former's tokenizer with Lyrics' tokens after its own ([BOS], [MLM], the markup)."""
    return conversation.with_lyrics_tokens(data.load_qformer_tokenizer(config.qformer_tokenizer))


def new_lyrics_stage1(stage: StageConfig, config: TrainConfig, blip2_path: str) -> LyricsStage1:
    """Lyrics' start (sec. 3.1): the BLIP-2 stage-1 model of `blip2_path` grown into the MQ-Former
    (pretraining.LyricsStage1.from_blip2): `architecture` sets num_grounding_queries and the
    Q-Former's longest text (max_position_embeddings: the spatial representation is long), the
    refiner's objects set the grounding cross-attention's width, the tokenizer the added ids."""
    if not (Path(blip2_path) / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage.name!r}: no BLIP-2 stage-1 checkpoint at {blip2_path!r} (vision_path)")
    blip2 = QFormerStage1.from_pretrained(blip2_path)
    tokenizer = lyrics_qformer_tokenizer(config)
    architecture = dict(stage.architecture)
    qformer = dataclasses.replace(blip2.config.qformer_config, vocab_size=tokenizer.get_vocab_size(),
                                  detection_encoder_hidden_size=refiner.Refiner(stage.refiner).object_width,
                                  **architecture.pop("qformer_config", {}))
    ids = {key: conversation.require_token_id(tokenizer, token) for key, token in (
        ("spatial_bos_token_id", conversation.LYRICS_SPATIAL_BOS), ("mlm_token_id", conversation.LYRICS_MLM),
        ("mask_token_id", "[MASK]"))}
    lyrics_config = LyricsStage1Config(vision_config=blip2.config.vision_config, qformer_config=qformer,
                                       num_query_tokens=blip2.config.num_query_tokens,
                                       image_text_hidden_size=blip2.config.image_text_hidden_size,
                                       decoder_bos_token_id=blip2.config.decoder_bos_token_id, **ids, **architecture)
    return LyricsStage1.from_blip2(blip2, lyrics_config)


def build_dataset(stage: StageConfig, config: TrainConfig, model: torch.nn.Module,
                  tokenizer: Tokenizer) -> torch.utils.data.Dataset:
    if stage.objective == "lm":  # a T5 learns as a prefix LM (T5 sec. 3.3.2): prompt in, continuation out
        return data.TextDataset(stage.data, tokenizer, stage.max_seq_len, on_error=config.on_data_error,
                                prefix_lm=model.config.is_encoder_decoder, seed=config.seed)
    # An mllm stage's own choice is already in model.config (train_stage).
    model_aspect_ratio = (config.model.get("image_aspect_ratio", "pad") if stage.objective in ("clip", "qformer", "lyrics")
                          else model.config.image_aspect_ratio)
    pad_to_square = (stage.image_aspect_ratio or model_aspect_ratio) == "pad"
    if stage.objective == "lyrics":
        return refiner.LyricsCaptionDataset(stage.data, stage.image_folder, lyrics_qformer_tokenizer(config),
                                            model.config.vision_config.image_size, refiner.Refiner(stage.refiner),
                                            pad_to_square=pad_to_square, on_error=config.on_data_error,
                                            max_text_len=model.config.qformer_config.max_position_embeddings)
    if stage.objective == "qformer":
        return data.QFormerCaptionDataset(stage.data, stage.image_folder, data.load_qformer_tokenizer(config.qformer_tokenizer),
                                          model.config.vision_config.image_size, pad_to_square=pad_to_square,
                                          on_error=config.on_data_error)
    if stage.objective == "clip":
        # CLIP (and BLIP-2's stage 1) see the images as the later stages will (padded or center-cropped).
        captions = functools.partial(data.CaptionDataset, image_folder=stage.image_folder, tokenizer=tokenizer,
                                     image_size=model.config.vision_config.image_size, pad_to_square=pad_to_square,
                                     max_text_len=model.config.text_config.max_position_embeddings,
                                     on_error=config.on_data_error, with_regions=stage.region_loss)
        if not stage.retrieval:
            return captions(stage.data)
        retrieval = stage.retrieval  # REACT's retrieval-augmented task instruction (dissertation section 2.3)
        return captions(retrieve_for_task(
            model, tokenizer, captions(retrieval["pool"]), retrieval["task"], retrieval["per_concept"],
            retrieval.get("by", "text"), Path(config.out_dir) / "retrieved" / f"{stage.name}.json"))
    instruction_aware = model.multi_modal_projector.takes_instruction  # InstructBLIP: the Q-Former reads it
    return data.InstructionDataset(stage.data, stage.image_folder, tokenizer, stage.template,
                                   model.config.image_token_index, model.num_image_tokens,
                                   model.config.vision_config.image_size, pad_to_square,
                                   stage.max_seq_len, on_error=config.on_data_error,
                                   qformer_tokenizer=data.load_qformer_tokenizer(config.qformer_tokenizer)
                                   if instruction_aware else None,
                                   encoder_decoder=model.config.text_config.is_encoder_decoder,
                                   task_levels=stage.task_levels or None,
                                   tags=conversation.read_tags(stage.tags, stage.tag_noise) if stage.tags else None,
                                   hint=conversation.tag_hint(tokenizer, model.config.hint_token_index),
                                   high_resolution=model.high_resolution,
                                   objects=refiner.Refiner(stage.refiner) if stage.refiner else None,
                                   spatial_prompt=model.config.spatial_prompt,
                                   oracle_objects=conversation.read_oracle_objects(stage.oracle_text)
                                   if stage.oracle_text else None)


def model_inputs(batch: dict, objective: str, device: torch.device) -> dict:
    """The arguments of the stage's model.forward; every model returns (output, loss)."""
    names = {"mllm": ("input_ids", "pixel_values", "attention_mask", "labels", "qformer_input_ids",
                      "qformer_attention_mask", "task_level", "image_sizes", "object_features", "object_mask"),
             "clip": ("pixel_values", "input_ids", "attention_mask", "regions"),
             "qformer": ("pixel_values", "input_ids", "attention_mask"),
             "lyrics": ("pixel_values", "input_ids", "attention_mask", "text_segments", "object_spans",
                        "object_features", "object_mask"),
             "lm": ("input_ids", "attention_mask", "labels")}[objective]

    def to_device(value):
        if isinstance(value, dict):
            return {key: to_device(item) for key, item in value.items()}
        return value.to(device, non_blocking=True) if value is not None else None

    return {name: to_device(batch.get(name)) for name in names}


def split_batch(batch: dict, num_chunks: int, image_token_index: int | None,
                encoder_decoder: bool = False) -> list[dict]:
    """Cut one process's step batch into its gradient-accumulation micro-batches (rows in order,
    trailing padding trimmed). Which images belong to which rows: for MLLM batches, the rows that
    hold image tokens; for CLIP batches, every row. One chunk is the batch itself (a CLIP batch,
    whose regions point at its rows, is never cut). An encoder-decoder's labels are the decoder's,
    with a length of their own."""
    if num_chunks == 1:
        return [batch]
    rows = batch["input_ids"].shape[0]
    if image_token_index is None:
        has_image = torch.full((rows,), batch["pixel_values"] is not None)
    else:
        has_image = (batch["input_ids"] == image_token_index).any(1)
    image_slot = has_image.long().cumsum(0) - 1
    chunks = []
    for part in torch.arange(rows).tensor_split(num_chunks):
        if len(part) == 0:
            continue
        length = int(batch["attention_mask"][part].sum(1).max())
        chunk = {key: batch[key][part, :length] if batch.get(key) is not None else None
                 for key in ("input_ids", "labels", "attention_mask")}
        if encoder_decoder:
            supervised = (batch["labels"][part] != IGNORE_INDEX).any(0).nonzero()
            chunk["labels"] = batch["labels"][part, :int(supervised.max()) + 1 if len(supervised) else 0]
        if batch.get("task_level") is not None:  # LION's router: one level per row
            chunk["task_level"] = batch["task_level"][part]
        images = image_slot[part][has_image[part]]
        for key in data.IMAGE_ROW_KEYS:
            chunk[key] = batch[key][images] if len(images) and batch.get(key) is not None else None
        chunks.append(chunk)
    return chunks


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether a language model, or an MLLM's, is an encoder-decoder (T5)."""
    config = model.config
    return (config.text_config if isinstance(config, MLLMConfig) else config).is_encoder_decoder


# ----------------------------------------------------------------------------------------------
# 3. Optimizer and schedule

def build_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Norms, biases and other vectors get no weight decay
    (nanoGPT's rule: decay only matrices); `param_groups` patterns get their own learning rate
    and schedule (first match wins). On CUDA the update is one fused kernel (the step is bound by
    memory traffic: 7B parameters' weights, gradients and moments are ~110 GB to stream);
    elsewhere the foreach implementation."""
    groups: dict[tuple, list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rule = next((g for g in stage.param_groups if re.search(g["pattern"], name)), {})
        lr = rule.get("learning_rate", stage.learning_rate)
        schedule = rule.get("schedule", stage.schedule)
        decay = stage.weight_decay if parameter.ndim >= 2 else 0.0
        groups.setdefault((lr, schedule, decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "base_lr": lr, "schedule": schedule, "weight_decay": decay}
         for (lr, schedule, decay), params in groups.items()],
        betas=tuple(stage.betas),
        fused=all(p.is_cuda for params in groups.values() for p in params) and bool(groups))


SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float,
                         schedule: str = "cosine") -> float:
    """Linear warmup, then cosine (LLaVA's `cosine` with warmup_ratio 0.03) or linear decay
    (Lynx) to `min_ratio`; "constant" is 1 throughout. A pure function of the step, so resuming
    needs only the step."""
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


# ----------------------------------------------------------------------------------------------
# 4. Logs

def log_step(log_path: Path, progress: tqdm, stage_name: str, log_every: int, total_steps: int,
             record: dict) -> None:
    """One jsonl line per step (tests and plots read it), the tqdm bar, and a plain line every
    `log_every` steps."""
    with log_path.open("a") as log:
        log.write(json.dumps(record) + "\n")
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                         tok_s=f"{record['tokens_per_second']:.0f}")
    progress.update(1)
    if record["step"] % log_every == 0 or record["step"] == total_steps:
        progress.write(f"[{stage_name}] step {record['step']}/{total_steps} loss {record['loss']:.4f} "
                       f"lr {record['lr']:.2e} grad norm {record['grad_norm']:.3f} "
                       f"{record['tokens_per_second']:.0f} tokens/s")


# ----------------------------------------------------------------------------------------------
# 5. One stage

def prepare_model(model: torch.nn.Module, stage: StageConfig, config: TrainConfig, tokenizer) -> list[str]:
    """What the stage changes in its starting model before training (each change is recorded in
    the config the stage saves); returns the names of the trainable parameters."""
    if stage.objective == "mllm" and stage.image_aspect_ratio:
        # As LLaVA's train.py does: the stage's choice goes into the saved config, so that eval
        # and the next stage prepare images the way this stage trained on them; AnyRes's grids
        # and merge are the config file's.
        model.set_image_aspect_ratio(stage.image_aspect_ratio, config.model.get("image_grid_pinpoints"),
                                     config.model.get("mm_patch_merge_type"))
    if stage.objective == "mllm" and stage.image_size not in (0, model.config.vision_config.image_size):
        if model.high_resolution is not None:
            raise ValueError(f"stage {stage.name!r}: image_size interpolates the tower's positions; AnyRes "
                             "tiles at the tower's own size instead (LLaVA-1.5-HD, section 4.3)")
        model.vision_tower.interpolate_position_embedding(stage.image_size)  # the saved config says it too
    if stage.objective == "mllm" and (model.config.num_grounding_queries or stage.spatial_prompt) and not stage.refiner:
        raise ValueError(f"stage {stage.name!r}: the MQ-Former's grounding queries and the spatial prompt read a "
                         f"visual refiner; give `refiner`")
    if stage.objective == "mllm" and stage.spatial_prompt:  # the LLM learns Lyrics' markup tokens; the config says so
        model.config.spatial_prompt = True
        conversation.with_lyrics_tokens(tokenizer)
        if tokenizer.get_vocab_size() > model.config.text_config.vocab_size:
            model.language_model.resize_token_embeddings(tokenizer.get_vocab_size())
    if stage.objective == "mllm" and stage.visual_input:  # LION's stages: the saved config says it too
        model.config.visual_input = model.multi_modal_projector.visual_input = stage.visual_input
    if stage.tags and stage.soft_prompt and model.config.hint_token_index is None:  # LION's stage 3
        model.add_soft_prompt(conversation.require_token_id(tokenizer, stage.soft_prompt))
    if stage.gated_image_layers:  # REACT; the saved config records them (vision_config.num_gated_layers)
        model.vision_model.add_gated_blocks(stage.gated_image_layers)
    if stage.lora:
        lora = dict(stage.lora)
        apply_lora(model, lora.pop("targets"), **lora)
    trainable = set_trainable(model, stage.trainable)
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = stage.gradient_checkpointing
    return trainable


def has_unused_parameters(stage: StageConfig, model: torch.nn.Module, dataset) -> bool:
    """Whether some step may leave trainable parameters without a gradient, which DDP must then
    search for every step: a step of text-only samples (the tower and connector unused), or LION's
    visual_input reading one branch of its connector."""
    if stage.objective != "mllm":
        return False
    return not all(dataset.has_image) or model.config.visual_input != "ALL"


def train_stage(stage: StageConfig, config: TrainConfig, runtime: parallel.Runtime, previous: Path | None,
                stage_names: list[str], resume: bool) -> Path:
    out_dir = Path(config.out_dir)
    final_dir, checkpoint_dir = out_dir / stage.name, out_dir / "checkpoints" / stage.name
    log_path = out_dir / "logs" / f"{stage.name}.jsonl"
    tokenizer = data.load_tokenizer(config.tokenizer)
    torch.manual_seed(config.seed)  # the same initial weights in every process

    model = build_model(stage, config, previous, stage_names, tokenizer)
    trainable = prepare_model(model, stage, config, tokenizer)
    if config.compile == "on" or (config.compile == "auto" and runtime.device.type == "cuda"):
        parallel.compile_blocks(model)  # then shard the compiled blocks: torchtitan's order
    if stage.parallel == "fsdp" and runtime.world_size > 1:  # the parameters and the optimizer see shards
        parallel.wrap(model, "fsdp", runtime, find_unused_parameters=False)
    model.to(runtime.device)
    torch.manual_seed(config.seed + runtime.rank)  # from here on (dropout), each process its own stream

    dataset = build_dataset(stage, config, model, tokenizer)
    accumulation = stage.global_batch_size // (stage.micro_batch_size * runtime.world_size)
    if accumulation * stage.micro_batch_size * runtime.world_size != stage.global_batch_size:
        raise ValueError(f"stage {stage.name!r}: global_batch_size {stage.global_batch_size} is not a multiple of "
                         f"micro_batch_size {stage.micro_batch_size} x {runtime.world_size} processes")
    if stage.objective == "clip" and accumulation * runtime.world_size > 1:
        raise ValueError(f"stage {stage.name!r}: the contrastive loss takes its negatives from the whole batch, "
                         f"so it needs global_batch_size == micro_batch_size and one process")
    if stage.objective in ("qformer", "lyrics") and accumulation > 1:
        raise ValueError(f"stage {stage.name!r}: ITC and ITM take their negatives from the batch (gathered across "
                         f"processes), so it needs global_batch_size == micro_batch_size x processes")
    # One loader batch = one process's share of one optimizer step, so the samples of every step
    # are the same for any number of processes (data.ModalityLengthGroupedSampler).
    pad_token_id = (conversation.require_token_id(data.load_qformer_tokenizer(config.qformer_tokenizer),
                                                  data.QFORMER_PAD_TOKEN) if stage.objective in ("qformer", "lyrics")
                    else conversation.require_token_id(tokenizer, "<pad>"))
    loader = data.make_dataloader(dataset, stage.micro_batch_size * accumulation, pad_token_id,
                                  num_workers=config.num_workers,
                                  seed=config.seed, world_size=runtime.world_size, rank=runtime.rank,
                                  pin_memory=runtime.device.type == "cuda")
    # Worker seeds from the loader's own generator, not the global RNG, so resuming does not shift it.
    loader.generator = torch.Generator().manual_seed(config.seed + runtime.rank)
    steps_per_epoch = len(loader.batch_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"stage {stage.name!r}: {stage.data} gives no batch ({len(dataset)} usable samples)")
    total_steps = stage.max_steps or max(1, round(stage.epochs * steps_per_epoch))
    warmup_steps = stage.warmup_steps or math.ceil(stage.warmup_ratio * total_steps)  # transformers' rounding
    optimizer = build_optimizer(model, stage)

    step = epoch = batches_done = 0
    resume_from = parallel.complete_directory(checkpoint_dir) if resume else None
    if resume_from is not None:
        progress = parallel.load_checkpoint(resume_from, model, optimizer, trainable, runtime)
        step, epoch, batches_done = progress["step"], progress["epoch"], progress["batches_done"]
    elif runtime.is_main:  # a fresh start: an older run's checkpoint must not pass for this one's
        for leftover in (checkpoint_dir, *(checkpoint_dir.with_name(checkpoint_dir.name + suffix)
                                           for suffix in (".old", ".tmp"))):
            shutil.rmtree(leftover, ignore_errors=True)
    if runtime.is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step] \
            if resume_from is not None and log_path.exists() else []
        log_path.write_text("".join(line + "\n" for line in kept))
        num_trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
        print(f"[{stage.name}] {type(model).__name__}, {num_trainable / 1e6:.2f}M trainable parameters, "
              f"{len(dataset)} samples, {total_steps} steps of {stage.global_batch_size} "
              f"({accumulation} x {stage.micro_batch_size} x {runtime.world_size} processes)"
              + (f", resumed at step {step}" if resume_from is not None else ""))

    unused = has_unused_parameters(stage, model, dataset)
    train_model = parallel.wrap(model, "ddp", runtime, unused) if stage.parallel == "ddp" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if runtime.device.type == "cuda" else nullcontext()
    image_token_index = model.config.image_token_index if stage.objective == "mllm" else None
    loss_options = {"positive_threshold": stage.positive_threshold} if stage.positive_threshold else {}
    encoder_decoder = stage.objective in ("lm", "mllm") and is_encoder_decoder(model)
    if stage.pack and encoder_decoder:
        raise ValueError(f"stage {stage.name!r}: pack is for decoder-only LLMs (a T5's encoder reads its inputs whole)")
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]

    def training_mode() -> None:
        train_model.train()
        for module in model.modules():  # frozen parts (the vision tower) behave as at inference
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    curve_path = out_dir / "logs" / f"{stage.name}_held_out.jsonl"
    curve = bool(config.curve_every and config.eval_tasks and stage.name == stage_names[-1]
                 and stage.objective == "mllm" and not parallel.is_sharded(model))  # FSDP: every process holds a shard

    def curve_point() -> None:
        if runtime.is_main:
            with curve_path.open("a") as log:
                log.write(json.dumps(held_out_point(model, config, stage, tokenizer, step)) + "\n")
            training_mode()
        parallel.barrier(runtime)

    if curve and runtime.is_main:  # as the log: a resumed run keeps the points up to its step
        kept = [line for line in curve_path.read_text().splitlines() if json.loads(line)["step"] <= step] \
            if resume_from is not None and curve_path.exists() else []
        curve_path.write_text("".join(line + "\n" for line in kept))
    if curve and step == 0:
        curve_point()
    training_mode()
    progress = tqdm(total=total_steps, initial=step, desc=stage.name, disable=not runtime.is_main, dynamic_ncols=True)
    steps_this_run, started, stop, untrainable_batches = 0, time.time(), step >= total_steps, 0
    while not stop:
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.skip_batches(batches_done)
        for batch in loader:
            dataset.problems.extend(batch["problems"])
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * learning_rate_factor(step, total_steps, warmup_steps,
                                                                      stage.min_lr_ratio, group["schedule"])
            chunks = (split_batch(batch, accumulation, image_token_index, encoder_decoder)
                      if batch["input_ids"].shape[0] else [])
            if stage.pack:
                chunks = [data.pack_rows(chunk, stage.max_seq_len, image_token_index) for chunk in chunks]
            step_started, loss_sum, tokens, loss_parts = time.time(), 0.0, 0, {}
            if not chunks:  # every sample of this step was skipped: a zero gradient keeps the processes in step
                sum(p.sum() for p in trainable_parameters).mul(0.0).backward()
            for index, chunk in enumerate(chunks):
                # Gradients are all-reduced once per step, on the last micro-batch.
                with parallel.gradient_sync(train_model, enabled=index == len(chunks) - 1):
                    with autocast:
                        output, loss = train_model(**model_inputs(chunk, stage.objective, runtime.device),
                                                   **loss_options)
                    if loss.requires_grad:
                        (loss / len(chunks)).backward()  # a short last batch has fewer micro-batches
                    else:  # text-only samples before a frozen LLM (BLIP-2): nothing here can learn from them
                        untrainable_batches += 1
                        if runtime.world_size > 1:  # the other processes' gradient reductions expect one: zeros
                            sum(p.sum() for p in trainable_parameters).mul(0.0).backward()
                loss_sum += loss.item()
                if isinstance(output, dict):  # the named losses of a multi-objective stage (BLIP-2 stage 1)
                    for name, value in output.items():
                        loss_parts[name] = loss_parts.get(name, 0.0) + value.item() / len(chunks)
                tokens += int((chunk["attention_mask"] != 0).sum())
            loss_value = parallel.mean_over_processes(loss_sum / max(1, len(chunks)), runtime)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters, stage.grad_clip or math.inf)
            if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"[{stage.name}] loss {loss_value}, gradient norm {float(grad_norm)} at step {step + 1}; "
                    f"stopping before the update. The last good checkpoint is "
                    f"{checkpoint_dir if checkpoint_dir.exists() else 'not written yet'}.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, batches_done, steps_this_run = step + 1, batches_done + 1, steps_this_run + 1
            if runtime.is_main:
                log_step(log_path, progress, stage.name, config.log_every, total_steps, {
                    "step": step, "loss": loss_value, "lr": stage.learning_rate * learning_rate_factor(
                        step - 1, total_steps, warmup_steps, stage.min_lr_ratio, stage.schedule),
                    "grad_norm": float(grad_norm),
                    **({"modality": "image" if batch["pixel_values"] is not None else "text"}
                       if stage.objective == "mllm" else {}),
                    **{name: parallel.mean_over_processes(value, runtime) for name, value in loss_parts.items()},
                    "tokens_per_second": tokens * runtime.world_size / max(1e-9, time.time() - step_started)})
            stop = step >= total_steps or steps_this_run == config.stop_after_steps
            if curve and (step % config.curve_every == 0 or step == total_steps):
                curve_point()
            if step % config.save_every == 0 or stop:
                parallel.save_checkpoint(checkpoint_dir, model, optimizer,
                                         {"step": step, "epoch": epoch, "batches_done": batches_done}, runtime,
                                         config.tokenizer, config.qformer_tokenizer, sharded=stage.parallel == "fsdp")
            if stop:
                break
        if not stop:  # the epoch ran out
            epoch, batches_done = epoch + 1, 0
            if runtime.is_main and dataset.problems.total:
                progress.write(f"[{stage.name}] epoch {epoch}: {dataset.problems.summary()}")
    progress.close()

    if runtime.is_main:
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        probe.plot_training_loss(records, out_dir / "logs" / f"{stage.name}_loss.png", stage.name)
        if curve:
            probe.plot_held_out([json.loads(line) for line in curve_path.read_text().splitlines()],
                                out_dir / "logs" / f"{stage.name}_held_out", stage.name, config.curve_samples)
        print(f"[{stage.name}] {steps_this_run} steps in {time.time() - started:.0f}s; "
              f"{dataset.problems.summary()}")
        if untrainable_batches:
            # AdamW leaves a parameter without a gradient untouched, so such a step changes nothing.
            print(f"[{stage.name}] {untrainable_batches} micro-batches reached no trainable parameter "
                  f"(text-only samples while the LLM is frozen) and taught nothing")
    if step < total_steps:
        raise SystemExit(f"[{stage.name}] stopped after {steps_this_run} steps as asked (stop_after_steps); "
                         f"continue with --resume")
    if runtime.is_main:
        with parallel.atomic_directory(final_dir) as directory:
            for item in parallel.complete_directory(checkpoint_dir).iterdir():
                if item.name not in ("train_state.pt", parallel.SHARDED_STATE):
                    shutil.copy(item, directory / item.name)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    parallel.barrier(runtime)
    return final_dir


# ----------------------------------------------------------------------------------------------
# 6. The recipe

def eval_task(task: dict, last_stage: StageConfig) -> tuple[str, dict, dict]:
    """(name, report, run_eval's arguments) of an `eval_tasks` entry: the questions carry the last
    stage's tags (LION), refiner (Lyrics) and oracle text unless the entry sets its own."""
    task = {"tags": last_stage.tags or None, "tag_noise": last_stage.tag_noise,
            "refiner": last_stage.refiner or None, "oracle_text": last_stage.oracle_text or None, **task}
    return task.pop("name", task["task"]), task.pop("report", {}), task


def held_out_point(model: MLLM, config: TrainConfig, stage: StageConfig, tokenizer, step: int) -> dict:
    """Each eval task's `report` metrics on its first `curve_samples` samples, now: a point of the
    held-out curve that shows when stage 2 starts to use the image (the same samples every time).
    A task without `report` names no metric to draw, and is left out."""
    import eval as evaluation
    model.eval()
    qformer_tokenizer = (data.load_qformer_tokenizer(config.qformer_tokenizer)
                         if model.multi_modal_projector.takes_instruction else None)
    point: dict = {"step": step}
    for task in config.eval_tasks:
        _, report, task = eval_task(task, stage)
        if not report:
            continue
        task["limit"] = min(task.get("limit") or config.curve_samples, config.curve_samples)
        metrics = evaluation.run_eval(model, tokenizer, progress=False, print_results=False,
                                      qformer_tokenizer=qformer_tokenizer, **task)
        point.update({key: metrics[metric] for key, metric in report.items()})
    return point


def evaluate(config: TrainConfig, model_dir: Path, last_stage: StageConfig) -> dict:
    """eval.run_eval over `eval_tasks` on the last stage's model. Each task may `report` metrics
    under a name of its own (results.json's headline keys); with `eval_blind`, everything again
    with every image replaced by zeros, under "blind", so the gain from vision is visible. The
    questions carry the last stage's tags (LION) unless a task sets its own."""
    import eval as evaluation
    tokenizer = data.load_tokenizer(config.tokenizer)
    if last_stage.objective == "clip":  # a CLIP (REACT) is scored by zero-shot classification, its tasks' splits
        clip = CLIPModel.from_pretrained(str(model_dir))
        pad_to_square = (last_stage.image_aspect_ratio or config.model.get("image_aspect_ratio", "pad")) == "pad"
        results: dict = {"tasks": {}}
        for task in config.eval_tasks:
            task = dict(task)
            report, name = task.pop("report", {}), task.pop("name", task["task"])
            if task.pop("task") != CLASSIFICATION_TASK:
                raise ValueError(f"eval task {name!r}: a CLIP model is evaluated on "
                                 f"{CLASSIFICATION_TASK!r} tasks only")
            metrics = run_zero_shot_classification(
                clip, tokenizer, out_dir=str(Path(config.out_dir) / "eval" / name), pad_to_square=pad_to_square, **task)
            results.update({key: metrics[metric] for key, metric in report.items()})
            results["tasks"][name] = metrics
        return results
    model = MLLM.from_pretrained(str(model_dir))
    qformer_tokenizer = (data.load_qformer_tokenizer(config.qformer_tokenizer)
                         if model.multi_modal_projector.takes_instruction else None)
    results: dict = {}
    for blind in ([False, True] if config.eval_blind else [False]):
        reported, per_task = {}, {}
        for task in config.eval_tasks:
            name, report, task = eval_task(task, last_stage)
            out = Path(config.out_dir) / "eval" / (("blind_" if blind else "") + name)
            per_task[name] = evaluation.run_eval(model, tokenizer, out_dir=str(out), blind=blind,
                                                 qformer_tokenizer=qformer_tokenizer, **task)
            reported.update({key: per_task[name][metric] for key, metric in report.items()})
        if blind:
            results["blind"] = {**reported, "tasks": per_task}
        else:
            results.update(reported, tasks=per_task)
    return results


def estimate_memory(config: TrainConfig, stages: list[StageConfig], processes: int) -> None:
    """Print each stage's bytes per GPU under DDP and FSDP (parallel.estimate_memory). The models
    are built on the meta device (the checkpoints are read, their tensors dropped), and a stage
    that starts from the previous one takes the model built here, so nothing needs to be trained."""
    tokenizer = data.load_tokenizer(config.tokenizer)
    model, stage_names = None, [stage.name for stage in stages]
    print(f"per GPU, {processes} processes: weights + gradients + optimizer + activations = total")
    for stage in stages:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
            if not (stage.init == "previous" and model is not None):
                model = build_model(stage, config, None, stage_names, tokenizer)
            prepare_model(model, stage, config, tokenizer)
        vision = getattr(model.config, "vision_config", None)
        tokens_per_image = vision.num_patches + 1 if vision is not None else 0
        per_gpu = stage.micro_batch_size if stage.objective != "clip" else stage.global_batch_size
        estimates = parallel.estimate_memory(model, per_gpu, stage.max_seq_len, processes,
                                             stage.gradient_checkpointing, tokens_per_image)
        for mode, estimate in estimates.items():
            parts = " + ".join(parallel.format_bytes(estimate[key])
                               for key in ("weights", "gradients", "optimizer", "activations"))
            chosen = " (this stage's choice)" if mode == stage.parallel else ""
            print(f"[{stage.name}] {mode:4s} {parts} = {parallel.format_bytes(estimate['total'])}{chosen}")


def main(argv: list[str]) -> None:
    options = [a for a in argv if a.startswith("--") and "=" not in a]
    unknown = set(options) - {"--resume", "--stage", "--estimate_memory", "--processes"}
    if not argv or unknown:
        raise SystemExit(__doc__ if not argv else f"unknown option(s) {sorted(unknown)}")
    for option in ("--stage", "--processes"):
        if option in argv and argv.index(option) == len(argv) - 1:
            raise SystemExit(f"{option} needs a value")
    stage_only = argv[argv.index("--stage") + 1] if "--stage" in argv else None
    positional = [a for i, a in enumerate(argv)
                  if not a.startswith("--") and not (i and argv[i - 1] in ("--stage", "--processes"))]
    config, stages = load_config(positional[0], [a for a in argv if a.startswith("--") and "=" in a])
    stage_names = [s.name for s in stages]
    if stage_only is not None and stage_only not in stage_names:
        raise SystemExit(f"--stage {stage_only}: no such stage (stages: {stage_names})")
    if "--estimate_memory" in argv:
        estimate_memory(config, stages, int(argv[argv.index("--processes") + 1]) if "--processes" in argv else 8)
        return
    runtime = parallel.setup_runtime(config.device)
    started = time.time()
    if config.world:
        import shapes
        if runtime.is_main:
            shapes.build_world(**config.world)
        parallel.barrier(runtime)
    if config.oracle_refiner and runtime.is_main and not (Path(config.oracle_refiner["out"]) / refiner.REFINER_JSON).is_file():
        print(f"writing the oracle visual refiner to {config.oracle_refiner['out']}")
        refiner.write_oracle_refiner(config.oracle_refiner["world"], config.oracle_refiner["tower"],
                                     config.oracle_refiner["out"])
    parallel.barrier(runtime)

    previous = None
    for index, stage in enumerate(stages):
        if stage_only is not None and stage.name != stage_only:
            continue
        previous = Path(config.out_dir) / stages[index - 1].name if index else None
        finished = parallel.complete_directory(Path(config.out_dir) / stage.name)
        if finished and "--resume" in argv:
            if runtime.is_main:
                print(f"[{stage.name}] already done, skipped (--resume)")
            continue
        if finished and not config.overwrite:  # a rerun must not silently replace a trained model
            raise SystemExit(f"[{stage.name}] {finished} already holds this stage's finished model. Continue a "
                             f"stopped run with --resume (finished stages are skipped), train it again with "
                             f"--overwrite=True, or choose another --out_dir.")
        train_stage(stage, config, runtime, previous, stage_names, resume="--resume" in argv)

    if config.eval_tasks and stage_only in (None, stages[-1].name) and runtime.is_main:
        results = evaluate(config, Path(config.out_dir) / stages[-1].name, stages[-1])
        if config.oracle_results:
            oracle_path = Path(config.oracle_results)
            if not oracle_path.is_file():
                print(f"no {oracle_path}: the ladder's oracle_text rung is empty (run its config, then evaluate again)")
            results["ladder"] = vision_ladder(results, json.loads(oracle_path.read_text()) if oracle_path.is_file() else None)
        results["wall_seconds"] = time.time() - started
        (Path(config.out_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
    if runtime.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
