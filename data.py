"""Data pipeline of nanoMLLM: the LLaVA instruction JSON, padding collate and modality/length-
grouped batching. Conversations become token ids in conversation.py, images pixels in vision.py.

What it implements, and where it comes from (the dissertation and the LLaVA code):
- The LLaVA instruction JSON (section 3.3; LLaVA-1.5's 665K mixture, section 4.3) with text-only
  samples, multi-turn conversations and "<image>" expanded to `num_image_tokens` ids.
- Each sample's image preprocessed as the model asks (vision.preprocess_image: CLIP's or
  LLaVA-1.5's pad; vision.high_resolution_tiles: LLaVA-NeXT's AnyRes, section 4.5, with
  "<image>" expanded to what the image's size yields).
- `group_by_modality_length` of LLaVA-1.5 (`llava/train/llava_trainer.py`): every batch holds
  only image samples or only text samples, of similar lengths.
- The datasets of the other stages: image-caption pairs for CLIP contrastive pretraining and
  plain documents for language-model pretraining.

Bad data never stops a long run by surprise: a malformed record, a missing or corrupt image is
reported with its file and record (and line for jsonl), skipped and counted in a `DataProblems`
(or raised with `on_error="raise"`).
"""

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from adapters import TASK_LEVELS
from connectors import HighResolution
from conversation import (BOS_TOKEN, EOS_TOKEN, IMAGE_PLACEHOLDER, PLAIN_HINT, DataError, format_conversation,
                          get_template, render_conversation, require_token_id, split_for_encoder_decoder,
                          spatial_question_prefix, tokenize_around_images, with_question_prefix, without_image,
                          with_tag_prompt)
from layers import IGNORE_INDEX
from pretraining import CAPTION
from vision import box_in_view, high_resolution_tiles, preprocess_image



# --------------------------------------------------------------------------------------------
# The problem log
# --------------------------------------------------------------------------------------------

class DataProblems:
    """Counts the samples a dataset skipped and keeps a few messages per kind.

    `on_error="skip"` counts and goes on; `on_error="raise"` turns the first problem into a
    DataError. Samples that are too long are counted as "too_long" but never raised: dropping
    them is the policy, not an error. Problems found inside DataLoader workers travel back in
    the batch (`batch["problems"]`, see `collate`); the trainer hands them to `extend`, so one
    summary covers both. Counts are cumulative: a corrupt image is counted once per epoch.
    """

    examples_per_kind = 3

    def __init__(self, on_error: str = "skip"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def report(self, kind: str, message: str) -> None:
        if self.on_error == "raise" and kind != "too_long":
            raise DataError(message, kind)
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < self.examples_per_kind:
            kept.append(message)

    def extend(self, problems: Sequence[tuple[str, str]]) -> None:
        """Adds the (kind, message) pairs that `collate` gathered from the workers."""
        for kind, message in problems:
            self.report(kind, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no data problems"
        lines = [f"{self.total} samples skipped: "
                 + ", ".join(f"{count} {kind}" for kind, count in sorted(self.counts.items()))]
        for kind in sorted(self.examples):
            lines += [f"  {kind}: {message}" for message in self.examples[kind]]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def load_tokenizer(path: str) -> Tokenizer:
    """Loads a `tokenizers` tokenizer from tokenizer.json or from a directory holding one."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    return Tokenizer.from_file(file)


# The Q-Former's own tokenizer (BLIP-2, sec. 3.1): bert-base-uncased's WordPiece, "[CLS] text [SEP]",
# plus "[DEC]", the token LAVIS adds to start image-grounded text generation.
QFORMER_PAD_TOKEN, QFORMER_CLASS_TOKEN, QFORMER_SEPARATOR_TOKEN = "[PAD]", "[CLS]", "[SEP]"
QFORMER_DECODER_TOKEN = "[DEC]"


def load_qformer_tokenizer(path: str) -> Tokenizer:
    """The Q-Former's tokenizer.json (a file, or a directory holding qformer_tokenizer.json or
    tokenizer.json), checked for the tokens the Q-Former's text paths need."""
    file = path
    if os.path.isdir(path):
        file = next((os.path.join(path, name) for name in ("qformer_tokenizer.json", "tokenizer.json")
                     if os.path.isfile(os.path.join(path, name))), os.path.join(path, "qformer_tokenizer.json"))
    tokenizer = load_tokenizer(file)
    for token in (QFORMER_PAD_TOKEN, QFORMER_CLASS_TOKEN, QFORMER_SEPARATOR_TOKEN, QFORMER_DECODER_TOKEN):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{file}: the Q-Former tokenizer has no {token!r} (bert-base-uncased's, with [DEC] added)")
    return tokenizer


def encode_qformer_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                         truncation_side: Literal["left", "right"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, T) of "[CLS] text [SEP]" rows, right-padded with [PAD].
    A text longer than `max_length` loses words on `truncation_side`, keeping [CLS] and [SEP]:
    BLIP-2's captions are cut at the end (max 32), InstructBLIP's instructions at the start (max
    128; LAVIS sets the Q-Former tokenizer's truncation_side to "left")."""
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    if max_length < 2:
        raise ValueError(f"max_length {max_length} leaves no room between [CLS] and [SEP]")
    cls_id = require_token_id(tokenizer, QFORMER_CLASS_TOKEN)
    sep_id = require_token_id(tokenizer, QFORMER_SEPARATOR_TOKEN)
    room = max_length - 2
    rows = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        words = encoding.ids
        if len(words) > room:
            words = words[len(words) - room:] if truncation_side == "left" else words[:room]
        rows.append([cls_id, *words, sep_id])
    return pad_sequences(rows, require_token_id(tokenizer, QFORMER_PAD_TOKEN))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def load_image(path: str) -> Image.Image:
    """Opens and fully decodes an image as RGB; a DataError names the file when it is missing
    or cannot be decoded (the decode happens here, not lazily in a later resize)."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}", "missing_image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # alpha is dropped, not composited, as in LLaVA
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {path}: {error}", "corrupt_image") from error


# LLaVA-1.5's REC instruction (its RefCOCO data): the referring expression follows it directly.
# One string for the training turns the shapes world writes and the question eval asks.
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


BOX_STYLES = ("lion", "llava15")


def format_box(box: Sequence[float], style: str = "lion") -> str:
    """A normalized xyxy box as text, relative to the padded square, in one of two styles:
    "lion", three decimals without spaces, "[0.525,0.000,0.675,0.394]" (LION's and Shikra's REC
    data); "llava15", two decimals as Python prints them, "[0.53, 0.0, 0.68, 0.39]" (LLaVA-1.5's
    RefCOCO / VG data in its 665K mixture). Values are clamped to [0, 1] so rounding noise never
    prints "-0.000" or "1.001". metrics.parse_box reads both."""
    if len(box) != 4:
        raise ValueError(f"a box needs 4 values (x0, y0, x1, y1), got {box!r}")
    values = [min(max(float(value), 0.0), 1.0) for value in box]
    if style == "lion":
        return "[" + ",".join(f"{value:.3f}" for value in values) + "]"
    if style == "llava15":
        return "[" + ", ".join(repr(round(value, 2)) for value in values) + "]"
    raise ValueError(f"unknown box style {style!r}; known: {BOX_STYLES}")


# --------------------------------------------------------------------------------------------
# Reading JSON / jsonl files
# --------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike[str], what: str = "data file") -> Any:
    """The content of a JSON file. A file that does not parse is a DataError naming the file and
    the line, always fatal since nothing in it can be read; `what` names a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error


def read_json_lines(path: str | os.PathLike[str], on_invalid: Callable[[int, json.JSONDecodeError], None],
                    what: str = "data file") -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a jsonl file, counted from 1 as editors
    count, so a message can point at the line. A line that is not JSON goes to `on_invalid` with
    its number: the caller decides whether it stops the file (raise) or is skipped (return)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                on_invalid(line_number, error)
                continue
            yield line_number, record


def read_records(path: str, problems: DataProblems) -> list[tuple[str, Any]]:
    """(where, record) pairs from a JSON list or a jsonl file; `where` names the record for
    messages: "file.json record 12" or "file.jsonl line 13". A jsonl line that is not valid
    JSON is reported to `problems`, so one bad line costs one sample; a .json file that does not
    parse is always fatal."""
    if path.endswith(".jsonl"):
        def report(line_number: int, error: json.JSONDecodeError) -> None:
            problems.report("malformed_record", f"{path} line {line_number}: invalid JSON: {error}")
        return [(f"{path} line {line_number}", record)
                for line_number, record in read_json_lines(path, report)]
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path} record {index}", record) for index, record in enumerate(data)]


def _describe(where: str, record: Any) -> str:
    """`where` plus the record id when there is one, for messages."""
    if isinstance(record, dict) and "id" in record:
        return f"{where} (id {record['id']!r})"
    return where


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class _ImageRecordDataset(torch.utils.data.Dataset):
    """What the image datasets share: records validated when the dataset is built, images
    decoded in `__getitem__` (in the DataLoader workers), where a missing or corrupt image
    yields `{"problem": (kind, message)}` instead of a sample; `collate` drops it and reports it
    in `batch["problems"]` (hand those to `dataset.problems.extend`). With on_error="raise"
    the DataError propagates and stops the run."""

    image_folder: str
    image_size: int
    pad_to_square: bool
    problems: DataProblems
    sources: list[str]  # "file.json record 12 (id 'x')" per sample, for messages

    def _validate(self, record: Any) -> Any:
        raise NotImplementedError

    def _validated_records(self, json_path: str) -> Iterator[tuple[str, Any, Any]]:
        """(where, record, what `_validate` made of it) for each usable record of the file;
        the others are reported to `problems` with their file, index and id."""
        for where, record in read_records(json_path, self.problems):
            where = _describe(where, record)
            try:
                validated = self._validate(record)
            except DataError as error:
                self.problems.report(error.kind, f"{where}: {error}")
                continue
            yield where, record, validated

    def _pixels(self, image_path: str) -> torch.Tensor:
        image = load_image(os.path.join(self.image_folder, image_path))
        return preprocess_image(image, self.image_size, self.pad_to_square)

    def _sample(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._sample(index)
        except DataError as error:
            if self.problems.on_error == "raise":
                raise DataError(f"{self.sources[index]}: {error}", error.kind) from error
            return {"problem": (error.kind, f"{self.sources[index]}: {error}")}


class InstructionDataset(_ImageRecordDataset):
    """The LLaVA instruction JSON (a list, or .jsonl one record a line): `id`, optional `image`
    (relative to `image_folder`), `conversations` (section 3.3; LLaVA `LazySupervisedDataset`).

    Every record is validated, rendered and tokenized once here (`Tokenizer.encode_batch`), so
    `lengths` are exact token counts (LLaVA estimates them from word counts) and records that
    cannot be used are dropped before training starts: malformed records, missing image files,
    and samples longer than `max_seq_len` that cannot be truncated. A longer sample is cut at
    `max_seq_len` only when its image tokens all stay before the cut and at least one
    supervised token survives; otherwise it is dropped ("too_long"): truncation never cuts
    through an image, whose features must fill exactly `num_image_tokens` positions.
    `problems` counts what was skipped, `num_truncated` what was cut.
    Items: input_ids, labels (LongTensor), pixel_values (3, S, S) or None, length, has_image, task_level.

    With `high_resolution` (LLaVA-NeXT's AnyRes, LLaVA-1.5-HD), pixel_values are the image's
    tiles (tiles, 3, S, S) and the item has its `image_size` (height, width); "<image>" expands to
    the tokens that size yields, read from the image header when the dataset is built, so
    `lengths` (and the modality-length sampler's batches) count every sample's own image tokens.

    With `qformer_tokenizer` (InstructBLIP, sec. 2.2: the Q-Former reads the instruction), an item
    with an image also has `qformer_input_ids`: its first question without the image placeholder,
    "[CLS] question [SEP]" in the Q-Former's tokenizer, cut from the left to `qformer_max_length`.

    With `encoder_decoder` (a T5 LLM), each answer of a record is an item of its own, split as a
    prefix LM (`split_for_encoder_decoder`): input_ids, without BOS, are what comes before the
    answer (earlier turns included), for the encoder; labels are the answer, for the decoder.

    LION (sec. 3.1.2, 3.2): a record's optional "task_level" ("region" for REC / REG, else
    "image") becomes the item's `task_level` (adapters.TASK_LEVELS), which picks the router's
    gates; `task_levels` keeps only records of the levels listed (stage 1: image, stage 2:
    region). `tags` (image file name -> tags, conversation.read_tags) puts LION's tag sentence
    before each image's first question, with `hint` as its hint (the soft prompt's token); the
    Q-Former still reads the bare question, as in LION. `objects` (a refiner.Refiner) adds each
    image's objects for Lyrics' MQ-Former: object_features / object_mask (refiner.py), and with
    `spatial_prompt` their spatial representation before the first question (the tokenizer
    needs Lyrics' tokens: conversation.with_lyrics_tokens). `oracle_objects` (image file name ->
    the scene as text, conversation.read_oracle_objects) replaces each image by its text: the
    oracle rung, what the LLM learns with perfect vision.
    """

    def __init__(self, json_path: str, image_folder: str, tokenizer: Tokenizer,
                 template: str, image_token_index: int, num_image_tokens: int, image_size: int,
                 pad_to_square: bool, max_seq_len: int, on_error: str = "skip",
                 qformer_tokenizer: Tokenizer | None = None, qformer_max_length: int = 128,
                 encoder_decoder: bool = False, task_levels: Sequence[str] | None = None,
                 tags: dict[str, list[str]] | None = None, hint: str = PLAIN_HINT,
                 high_resolution: HighResolution | None = None, objects: Any = None, spatial_prompt: bool = False,
                 oracle_objects: dict[str, str] | None = None):
        unknown = set(task_levels or ()) - set(TASK_LEVELS)
        if unknown:
            raise ValueError(f"task_levels {sorted(unknown)}: the task levels are {sorted(TASK_LEVELS)}")
        self.tags, self.hint, self.objects, self.spatial_prompt = tags, hint, objects, spatial_prompt
        self.oracle_objects = oracle_objects
        self.image_folder = image_folder
        self.encoder_decoder = encoder_decoder
        self.eos_id = require_token_id(tokenizer, EOS_TOKEN) if encoder_decoder else None
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_token_index = image_token_index
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.pad_to_square = pad_to_square
        self.high_resolution = high_resolution
        self.max_seq_len = max_seq_len
        self.problems = DataProblems(on_error)
        placeholder_id = require_token_id(tokenizer, IMAGE_PLACEHOLDER)

        candidates = list(self._validated_records(json_path))
        encodings = tokenize_around_images([text for _, _, (text, _, _, _) in candidates], tokenizer)
        self.records: list[dict] = []
        self.image_tokens: list[int] = []  # per record: what its image fills (AnyRes: from its size)
        self.sources = []
        self.lengths: list[int] = []
        self.has_image: list[bool] = []
        self.num_truncated = 0
        questions = []  # each image's first question as written, without LION's tags (the Q-Former's input)
        for (where, record, (_, spans, rendered, image_tokens)), (ids, offsets) in zip(candidates, encodings):
            if task_levels is not None and record.get("task_level", "image") not in task_levels:
                continue
            full_length, kept_length = self._lengths(ids, offsets, spans, placeholder_id, image_tokens)
            if kept_length is None:
                self.problems.report("too_long", f"{where}: {full_length} tokens, longer than "
                                     f"max_seq_len {max_seq_len}, and cutting it would cut its "
                                     "image or all of its answers")
                continue
            self.num_truncated += kept_length < full_length
            questions.append(first_question(record["conversations"]) if "image" in record else None)
            self.records.append(rendered)
            self.image_tokens.append(image_tokens)
            self.sources.append(where)
            self.lengths.append(kept_length)
            self.has_image.append("image" in rendered)
        self.qformer_input_ids: list[list[int] | None] = [None] * len(self.records)
        if qformer_tokenizer is not None:
            with_image = [index for index, record in enumerate(self.records) if "image" in record]
            ids, mask = encode_qformer_texts(qformer_tokenizer, [questions[index] for index in with_image],
                                             qformer_max_length, truncation_side="left")
            for index, row, length in zip(with_image, ids, mask.sum(1).tolist()):
                self.qformer_input_ids[index] = row[:length].tolist()
        # Items: (record, the conversation index of the answer it targets; None = all answers).
        self.items = [(record, None) for record in range(len(self.records))]
        if encoder_decoder:
            self.items = [(record, turn) for record, entry in enumerate(self.records)
                          for turn, message in enumerate(entry["conversations"]) if message.get("from") == "gpt"]
            # The record's token count bounds each of its items' (the sampler only groups by it).
            self.lengths = [self.lengths[record] for record, _ in self.items]
            self.has_image = [self.has_image[record] for record, _ in self.items]
            self.sources = [f"{self.sources[record]} answer {turn}" for record, turn in self.items]

    def _validate(self, record: Any) -> tuple[str, list[tuple[int, int]], dict, int]:
        """The rendered text and spans of a usable record, the record as trained (with LION's
        tags) and how many image tokens its image fills, or a DataError saying what is wrong."""
        if not isinstance(record, dict):
            raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("conversations"), list):
            raise DataError("missing or non-list key 'conversations'")
        level = record.get("task_level", "image")
        if not isinstance(level, str) or level not in TASK_LEVELS:
            raise DataError(f"task_level {level!r} is not one of {sorted(TASK_LEVELS)}")
        if self.tags is not None and isinstance(record.get("image"), str):
            if record["image"] not in self.tags:
                raise DataError(f"the tags file has no entry for image {record['image']!r}", "missing_tags")
            record = {**record, "conversations": with_tag_prompt(record["conversations"], self.tags[record["image"]],
                                                                 self.hint)}
        if self.oracle_objects is not None and isinstance(record.get("image"), str):
            if record["image"] not in self.oracle_objects:
                raise DataError(f"the objects file has no entry for image {record['image']!r}", "missing_objects")
            image = record["image"]
            record = {key: value for key, value in record.items() if key != "image"}
            record["conversations"] = without_image(record["conversations"], self.oracle_objects[image])
        if self.spatial_prompt and isinstance(record.get("image"), str):
            record = {**record, "conversations": with_question_prefix(
                record["conversations"], spatial_question_prefix(self.objects.spatial_text(record["image"])))}
        text, spans = format_conversation(record["conversations"], self.template)
        num_placeholders = text.count(IMAGE_PLACEHOLDER)
        if "image" in record:
            if not isinstance(record["image"], str):
                raise DataError(f"'image' must be a relative path, got {record['image']!r:.80}")
            if num_placeholders != 1:
                raise DataError(f"a sample with an image needs exactly one {IMAGE_PLACEHOLDER}, "
                                f"found {num_placeholders}")
            path = os.path.join(self.image_folder, record["image"])
            if not os.path.isfile(path):
                raise DataError(f"image file not found: {path}", "missing_image")
        elif num_placeholders:
            raise DataError(f"a text-only sample (no 'image') holds {IMAGE_PLACEHOLDER}")
        image_tokens = self.num_image_tokens if "image" in record else 0
        if image_tokens and self.high_resolution is not None:  # the header's size, without decoding
            try:
                with Image.open(path) as image:
                    image_tokens = self.high_resolution.num_image_tokens((image.height, image.width))
            except (OSError, SyntaxError, ValueError) as error:
                raise DataError(f"cannot read image {path}: {error}", "corrupt_image") from error
        return text, spans, record, image_tokens

    def _lengths(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                 placeholder_id: int, image_tokens: int) -> tuple[int, int | None]:
        """(full token count, count after truncation or None when the sample must be dropped).
        Positions count the BOS in front and the image expansion."""
        image_at = ids.index(placeholder_id) if placeholder_id in ids else None
        image_expansion = image_tokens - 1 if image_at is not None else 0

        def position(token_index: int) -> int:
            after_image = image_at is not None and token_index > image_at
            return 1 + token_index + (image_expansion if after_image else 0)

        full_length = 1 + len(ids) + image_expansion
        if full_length <= self.max_seq_len:
            return full_length, full_length
        if image_at is not None and position(image_at) + image_tokens > self.max_seq_len:
            return full_length, None
        first_answer_char = spans[0][0]
        first_supervised = next((index for index, (_, end) in enumerate(offsets)
                                 if end > first_answer_char), len(ids))
        if position(first_supervised) >= self.max_seq_len:
            return full_length, None
        return full_length, self.max_seq_len

    def __len__(self) -> int:
        return len(self.items)

    def _sample(self, index: int) -> dict[str, Any]:
        record_index, answer_turn = self.items[index]
        record = self.records[record_index]
        pixel_values, image_size = None, None
        if "image" in record and self.high_resolution is not None:
            image, geometry = load_image(os.path.join(self.image_folder, record["image"])), self.high_resolution
            pixel_values = high_resolution_tiles(image, geometry.tile_size, geometry.grid_pinpoints)
            image_size = (image.height, image.width)
            if self.high_resolution.num_image_tokens(image_size) != self.image_tokens[record_index]:
                raise DataError(f"image {record['image']} is {image.width} x {image.height} px now, not the size "
                                "its header gave when the dataset was built", "corrupt_image")
        elif "image" in record:
            pixel_values = self._pixels(record["image"])
        conversations = record["conversations"] if answer_turn is None else record["conversations"][:answer_turn + 1]
        input_ids, labels = render_conversation(conversations, self.template, self.tokenizer, self.image_token_index,
                                                self.image_tokens[record_index], add_bos=not self.encoder_decoder)
        input_ids, labels = input_ids[:self.max_seq_len], labels[:self.max_seq_len]
        if self.encoder_decoder:
            input_ids, labels = split_for_encoder_decoder(input_ids, labels, self.eos_id)
        sample = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                  "pixel_values": pixel_values, "length": len(input_ids), "has_image": pixel_values is not None,
                  "task_level": TASK_LEVELS[record.get("task_level", "image")]}
        if image_size is not None:
            sample["image_size"] = torch.tensor(image_size)
        if self.qformer_input_ids[record_index] is not None:
            sample["qformer_input_ids"] = torch.tensor(self.qformer_input_ids[record_index])
        if self.objects is not None and pixel_values is not None:
            sample["object_features"], sample["object_mask"] = self.objects.mqformer_input(record["image"])
        return sample


def first_question(conversations: list[dict]) -> str:
    """The text of the first human turn, without the image placeholder (InstructBLIP's Q-Former input)."""
    text = next(turn["value"] for turn in conversations if turn.get("from") == "human")
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


class CaptionDataset(_ImageRecordDataset):
    """Image-caption pairs for CLIP contrastive pretraining (the shapes world's stage 0a), read
    from the same LLaVA JSON captions file as stage 1: the image and the first gpt answer.

    The caption is tokenized for the CLIP text tower: BOS + tokens + EOS, cut to `max_text_len`
    with the EOS kept, since CLIP pools the text at its EOS token. Items have no labels.

    With `with_regions`, every record must also ground phrases in pixel boxes, GRIT-style
    (Kosmos-2): `"regions": [{"phrase": "small red circle", "box": [x0, y0, x1, y1]}, ...]`.
    Items then carry `region_boxes` (fractions of the square the tower sees, `box_in_view`) and
    `region_phrases` (token ids, tokenized as the captions) for the region-phrase loss.
    """

    def __init__(self, json_path: str, image_folder: str, tokenizer: Tokenizer, image_size: int,
                 pad_to_square: bool = False, max_text_len: int = 77, on_error: str = "skip",
                 with_regions: bool = False):
        self.image_folder = image_folder
        self.image_size = image_size
        self.pad_to_square = pad_to_square
        self.with_regions = with_regions
        self.problems = DataProblems(on_error)
        self.sources = []
        self.records: list[dict] = []  # as read, for a subset written back (REACT's retrieval)
        self.image_paths: list[str] = []
        captions = []
        self.region_boxes: list[list[list[float]]] = []
        phrases: list[list[str]] = []
        for where, record, (image_path, caption, regions) in self._validated_records(json_path):
            self.sources.append(where)
            self.records.append(record)
            self.image_paths.append(image_path)
            captions.append(caption)
            self.region_boxes.append([region["box"] for region in regions])
            phrases.append([region["phrase"] for region in regions])
        self.token_ids = self.encode_texts(tokenizer, captions, max_text_len)
        flat_phrases = self.encode_texts(tokenizer, [p for image_phrases in phrases for p in image_phrases],
                                         max_text_len)
        offsets = np.cumsum([0] + [len(image_phrases) for image_phrases in phrases])
        self.region_phrases = [[tuple(ids) for ids in flat_phrases[begin:end]]
                               for begin, end in zip(offsets[:-1], offsets[1:])]
        self.lengths = [len(ids) for ids in self.token_ids]
        self.has_image = [True] * len(self.token_ids)

    @staticmethod
    def encode_texts(tokenizer: Tokenizer, texts: list[str], max_text_len: int) -> list[list[int]]:
        """CLIP's text: BOS + tokens + EOS, cut to `max_text_len` with the EOS kept."""
        bos_id, eos_id = require_token_id(tokenizer, BOS_TOKEN), require_token_id(tokenizer, EOS_TOKEN)
        return [[bos_id] + encoding.ids[:max_text_len - 2] + [eos_id]
                for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _validate(self, record: Any) -> tuple[str, str, list[dict]]:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise DataError("a caption record needs an 'image' path")
        answers = [turn.get("value") for turn in record.get("conversations") or []
                   if isinstance(turn, dict) and turn.get("from") == "gpt"]
        if not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise DataError("no gpt caption in 'conversations'")
        path = os.path.join(self.image_folder, record["image"])
        if not os.path.isfile(path):
            raise DataError(f"image file not found: {path}", "missing_image")
        if not self.with_regions:
            return record["image"], answers[0].strip(), []
        regions = record.get("regions")
        if not isinstance(regions, list) or not regions:
            raise DataError("the region-phrase loss needs a non-empty 'regions' list", "malformed_record")
        for index, region in enumerate(regions):
            box = region.get("box") if isinstance(region, dict) else None
            if not (isinstance(region, dict) and isinstance(region.get("phrase"), str) and region["phrase"].strip()
                    and isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and box[0] < box[2] and box[1] < box[3]):
                raise DataError(f"regions[{index}] needs a 'phrase' and a pixel 'box' [x0, y0, x1, y1] with "
                                f"x0 < x1 and y0 < y1, got {region!r}", "malformed_record")
        return record["image"], answers[0].strip(), regions

    def __len__(self) -> int:
        return len(self.token_ids)

    def _sample(self, index: int) -> dict[str, Any]:
        image = load_image(os.path.join(self.image_folder, self.image_paths[index]))
        sample = {"input_ids": torch.tensor(self.token_ids[index]),
                  "pixel_values": preprocess_image(image, self.image_size, self.pad_to_square),
                  "length": self.lengths[index], "has_image": True}
        if self.with_regions:
            sample["region_boxes"] = torch.tensor([box_in_view(box, image.size, self.pad_to_square)
                                                   for box in self.region_boxes[index]])
            sample["region_phrases"] = self.region_phrases[index]
        return sample


class QFormerCaptionDataset(CaptionDataset):
    """Image-caption pairs for BLIP-2's stage 1 (sec. 3.2), from the same LLaVA JSON captions file:
    each caption as the Q-Former reads it, "[CLS] caption [SEP]" in its own tokenizer, cut to 32
    tokens (LAVIS's max_txt_len). Batches pad with the tokenizer's [PAD] (make_dataloader's pad id)."""

    def __init__(self, json_path: str, image_folder: str, qformer_tokenizer: Tokenizer, image_size: int,
                 pad_to_square: bool = False, max_text_len: int = 32, on_error: str = "skip"):
        super().__init__(json_path, image_folder, qformer_tokenizer, image_size, pad_to_square, max_text_len, on_error)

    @staticmethod
    def encode_texts(tokenizer: Tokenizer, texts: list[str], max_text_len: int) -> list[list[int]]:
        ids, mask = encode_qformer_texts(tokenizer, texts, max_text_len)
        return [row[:length].tolist() for row, length in zip(ids, mask.sum(1).tolist())]


class TextDataset(torch.utils.data.Dataset):
    """Documents for language-model pretraining (the shapes world's stage 0b): jsonl with one
    {"text": ...} a line. Each document becomes BOS + tokens + EOS and is split into chunks of
    at most `max_seq_len` tokens; every chunk is one sample, labels = input_ids.

    No packing of several documents into one sequence: packing needs per-document attention
    masks (or lets documents attend to each other), while length-grouped batching already keeps
    padding low. The simple way is exact. Tokens live in one int32 array (small memory).

    With `prefix_lm` (an encoder-decoder, T5): documents have no BOS, and each chunk is cut at a
    point drawn uniformly (fixed per chunk, from `seed`) into a prefix, the encoder's input_ids,
    and the rest, the decoder's labels: the prefix-LM objective of Raffel et al. 2020, sec.
    3.3.2, which is also how a T5 here is asked questions later (prompt in, answer out).
    """

    def __init__(self, jsonl_path: str, tokenizer: Tokenizer, max_seq_len: int,
                 on_error: str = "skip", prefix_lm: bool = False, seed: int = 0):
        self.problems = DataProblems(on_error)
        self.prefix_lm = prefix_lm
        bos_id = [] if prefix_lm else [require_token_id(tokenizer, BOS_TOKEN)]
        eos_id = require_token_id(tokenizer, EOS_TOKEN)
        texts = []
        for where, record in read_records(jsonl_path, self.problems):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) \
                    or not record["text"].strip():
                self.problems.report("malformed_record", f"{where}: needs a non-empty 'text'")
                continue
            texts.append(record["text"])
        documents = [bos_id + encoding.ids + [eos_id]
                     for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
        self.tokens = np.array([token for document in documents for token in document],
                               dtype=np.int32)
        self.chunks: list[tuple[int, int]] = []
        start = 0
        for document in documents:
            end = start + len(document)
            # A 1-token tail has nothing to predict (labels are shifted by one): left out.
            self.chunks += [(begin, min(begin + max_seq_len, end))
                            for begin in range(start, end, max_seq_len) if end - begin > 1]
            start = end
        self.lengths = [end - begin for begin, end in self.chunks]
        self.has_image = [False] * len(self.chunks)
        generator = np.random.default_rng(seed)
        self.split_points = [int(generator.integers(1, length)) for length in self.lengths] if prefix_lm else []

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        begin, end = self.chunks[index]
        input_ids = torch.from_numpy(self.tokens[begin:end].astype(np.int64))
        labels = input_ids.clone()
        if self.prefix_lm:
            input_ids, labels = input_ids[:self.split_points[index]], labels[self.split_points[index]:]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": None,
                "length": end - begin, "has_image": False}


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------

def pad_sequences(rows: Sequence[Sequence[int] | torch.Tensor], pad_value: int,
                  side: Literal["left", "right"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, attention_mask), both LongTensor (len(rows), longest row): each row padded with
    `pad_value` and the mask 1 on the row's own entries. Right padding for training and
    likelihood scoring: every row starts at position 0 and padding never shifts positions. Left
    padding for batched generation: every prompt ends at the last column, so the first new token
    of every row is predicted from the same position."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    longest = max((len(row) for row in rows), default=0)
    values = torch.full((len(rows), longest), pad_value, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        start = longest - len(row) if side == "left" else 0
        values[index, start:start + len(row)] = torch.as_tensor(row)
        attention_mask[index, start:start + len(row)] = 1
    return values, attention_mask


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(num_images, 3, S, S); AnyRes tiles (num_images, most tiles, 3, S, S), zero tiles after each
    image's own, as LlavaNextImageProcessor pads a batch."""
    if images[0].ndim == 4:
        most = max(len(tiles) for tiles in images)
        images = [F.pad(tiles, (0, 0, 0, 0, 0, 0, 0, most - len(tiles))) for tiles in images]
    return torch.stack(list(images))


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Pads a list of samples into a training batch (RIGHT padding: the causal LM sees its
    tokens first and padding never shifts positions).

    Returns input_ids (B, T) padded with `pad_token_id`; labels (B, T) padded with IGNORE_INDEX,
    or None for samples without labels (captions); attention_mask (B, T), 1 on tokens;
    pixel_values (num_images, 3, S, S) stacked only for the samples that have an image, in batch
    order (transformers convention), or None; problems: the (kind, message) of samples skipped
    in the workers. When every sample was skipped, B is 0. Samples with an instruction for the
    Q-Former (InstructBLIP) add qformer_input_ids / qformer_attention_mask, one row per image;
    AnyRes samples make pixel_values (num_images, most tiles, 3, S, S), zero tiles after each
    image's own, and add image_sizes (num_images, 2) as (height, width).
    """
    problems = [sample["problem"] for sample in batch if "problem" in sample]
    samples = [sample for sample in batch if "problem" not in sample]
    input_ids, attention_mask = pad_sequences([sample["input_ids"] for sample in samples], pad_token_id)
    has_labels = any("labels" in sample for sample in samples)
    labels = pad_sequences([sample["labels"] for sample in samples], IGNORE_INDEX)[0] if has_labels else None
    images = [sample["pixel_values"] for sample in samples if sample["pixel_values"] is not None]
    batch = {"input_ids": input_ids, "labels": labels,
             "attention_mask": attention_mask,
             "pixel_values": stack_images(images) if images else None, "problems": problems}
    if samples and any("image_size" in sample for sample in samples):
        batch["image_sizes"] = torch.stack([sample["image_size"] for sample in samples if "image_size" in sample])
    if samples and "region_boxes" in samples[0]:
        batch["regions"] = collate_regions(samples, pad_token_id)
    if samples and "task_level" in samples[0]:  # LION's router: one level per row
        batch["task_level"] = torch.tensor([sample["task_level"] for sample in samples])
    if samples and "text_segments" in samples[0]:  # Lyrics' MQ-Former pretraining (refiner.LyricsCaptionDataset)
        batch["text_segments"] = pad_sequences([sample["text_segments"] for sample in samples], CAPTION)[0]
        batch["object_spans"] = pad_sequences([sample["object_spans"] for sample in samples], -1)[0]
    with_objects = [sample for sample in samples if "object_features" in sample]
    if with_objects:  # the refiner's objects (Lyrics), one row per image, as pixel_values
        batch["object_features"] = torch.stack([sample["object_features"] for sample in with_objects])
        batch["object_mask"] = torch.stack([sample["object_mask"] for sample in with_objects])
    instructions = [sample["qformer_input_ids"] for sample in samples if "qformer_input_ids" in sample]
    if instructions:
        # Padding is masked, so its id only has to exist: 0 is [PAD] in BERT's vocabulary.
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = pad_sequences(instructions, 0)
    return batch


IMAGE_ROW_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "image_sizes", "object_features",
                  "object_mask")  # one row per image, in the order of the batch's image tokens


def pack_rows(batch: dict[str, Any], max_length: int, image_token_index: int | None) -> dict[str, Any]:
    """Packing: the samples of a collated (right-padded) batch laid end to end, in order, into as
    few rows of at most `max_length` tokens as first-fit finds. The attention mask numbers each
    row's samples 1, 2, ... (0 = padding), so a token attends within its own sample only
    (layers.causal_attention_mask) and positions restart at each sample
    (layers.positions_in_samples): every sample computes what it computes alone, where packing
    with a plain mask lets samples read each other. A sample's first label is ignored, as nothing
    predicts it unpacked. Images, and their per-image rows, follow their samples."""
    lengths = (batch["attention_mask"] != 0).sum(1).tolist()
    # LION's router reads one task level per row: a row takes samples of one level only.
    levels = batch["task_level"].tolist() if batch.get("task_level") is not None else [None] * len(lengths)
    if max(lengths, default=0) > max_length:
        raise ValueError(f"pack: a sample of {max(lengths)} tokens is longer than the rows ({max_length})")
    bins: list[list[int]] = []
    room: list[int] = []
    for row, length in enumerate(lengths):
        target = next((index for index, free in enumerate(room)
                       if free >= length and levels[bins[index][0]] == levels[row]), len(bins))
        if target == len(bins):
            bins.append([])
            room.append(max_length)
        bins[target].append(row)
        room[target] -= length
    width = max((max_length - free for free in room), default=0)
    # Padding ids are masked and unsupervised: any id in the vocabulary will do.
    packed = {"input_ids": torch.zeros(len(bins), width, dtype=torch.long),
              "attention_mask": torch.zeros(len(bins), width, dtype=torch.long),
              "labels": torch.full((len(bins), width), IGNORE_INDEX) if batch.get("labels") is not None else None}
    for index, rows in enumerate(bins):
        start = 0
        for number, row in enumerate(rows, 1):
            span = slice(start, start + lengths[row])
            packed["input_ids"][index, span] = batch["input_ids"][row, :lengths[row]]
            packed["attention_mask"][index, span] = number
            if packed["labels"] is not None:
                packed["labels"][index, span] = batch["labels"][row, :lengths[row]]
                packed["labels"][index, start] = IGNORE_INDEX
            start += lengths[row]
    has_image = ((batch["input_ids"] == image_token_index).any(1) if image_token_index is not None
                 else torch.zeros(len(lengths), dtype=torch.bool))  # a text stage (the lm objective)
    image_of_row = has_image.long().cumsum(0) - 1
    images = torch.tensor([int(image_of_row[row]) for rows in bins for row in rows if has_image[row]], dtype=torch.long)
    for key in IMAGE_ROW_KEYS:
        if batch.get(key) is not None:
            packed[key] = batch[key][images]
    if batch.get("task_level") is not None:
        packed["task_level"] = batch["task_level"][[rows[0] for rows in bins]]
    return packed


def collate_regions(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The grounded regions of a caption batch (every row has one image): boxes (R, 4),
    image_index (R,) the row of each region, and the batch's DISTINCT phrases, phrase_ids /
    phrase_mask (P, L), with phrase_index (R,) the phrase of each region. Identical phrases are
    one text, so regions that share a phrase are each other's positives, not negatives (UniCL's
    rule, REACT eq. 2.4 with gamma = 1)."""
    phrase_of: dict[tuple[int, ...], int] = {}
    phrase_index = [phrase_of.setdefault(phrase, len(phrase_of))
                    for sample in samples for phrase in sample["region_phrases"]]
    phrase_ids, phrase_mask = pad_sequences(list(phrase_of), pad_token_id)
    return {"boxes": torch.cat([sample["region_boxes"] for sample in samples]),
            "image_index": torch.cat([torch.full((len(sample["region_phrases"]),), row)
                                      for row, sample in enumerate(samples)]),
            "phrase_ids": phrase_ids, "phrase_mask": phrase_mask, "phrase_index": torch.tensor(phrase_index)}


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one modality and similar lengths (LLaVA-1.5 `group_by_modality_length`,
    `get_modality_length_grouped_indices` in llava/train/llava_trainer.py), as a batch sampler.

    Per epoch, from `torch.Generator` seeded with `seed + epoch` (as DistributedSampler):
    image and text samples are shuffled separately and cut into global batches of
    `batch_size * world_size`; within each megabatch of `batches_per_megabatch` global batches
    samples are sorted by length (LLaVA sorts a megabatch = the global batch across ranks and
    gradient accumulation), so a batch pads little; the full global batches of both modalities
    are shuffled together. Each modality's remainder forms one smaller global batch at the end
    (LLaVA mixes the two remainders into one batch; here batches stay single-modality), padded
    with repeated samples of its modality to a multiple of `world_size` so every rank gets the
    same number of equally sized batches (as DistributedSampler pads), unless `drop_last`.

    Rank `rank` gets the contiguous slice [rank * b, (rank + 1) * b) of every global batch, so
    the union over ranks is the same global batch for any world size with the same
    `batch_size * world_size`. The order depends only on (seed, epoch, lengths, has_image):
    `set_epoch(epoch)` before each epoch, and `skip_batches(n)` to resume mid-epoch (the next
    iteration starts at this rank's batch n; later epochs start at 0). Count consumed batches
    in the trainer: DataLoader workers prefetch ahead of what the step has used.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0,
                 batches_per_megabatch: int = 1, drop_last: bool = False):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths but {len(has_image)} has_image flags")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = list(lengths)
        self.has_image = list(has_image)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.batches_per_megabatch = batches_per_megabatch
        self.drop_last = drop_last
        self.epoch = 0
        self._batches_to_skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, num_batches: int) -> None:
        """Resume: the next iteration starts at this rank's batch `num_batches`."""
        self._batches_to_skip = num_batches

    def global_batches(self) -> list[list[int]]:
        """All global batches of the current epoch (every rank's samples), in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        global_size = self.batch_size * self.world_size
        full_batches, remainders = [], []
        for modality in (True, False):
            indices = [index for index, flag in enumerate(self.has_image) if flag == modality]
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
            num_full = len(indices) // global_size * global_size
            megabatch_size = global_size * self.batches_per_megabatch
            for start in range(0, num_full, megabatch_size):
                megabatch = sorted(indices[start:min(start + megabatch_size, num_full)],
                                   key=lambda index: self.lengths[index], reverse=True)
                full_batches += [megabatch[i:i + global_size]
                                 for i in range(0, len(megabatch), global_size)]
            remainder = indices[num_full:]
            if remainder and not self.drop_last:
                padded_size = math.ceil(len(remainder) / self.world_size) * self.world_size
                remainder = [indices[i % len(indices)]
                             for i in range(num_full, num_full + padded_size)]
                remainders.append(sorted(remainder, key=lambda index: self.lengths[index],
                                         reverse=True))
        order = torch.randperm(len(full_batches), generator=generator)
        return [full_batches[i] for i in order] + remainders

    def __iter__(self) -> Iterator[list[int]]:
        batches_to_skip, self._batches_to_skip = self._batches_to_skip, 0
        for global_batch in self.global_batches()[batches_to_skip:]:
            per_rank = len(global_batch) // self.world_size
            yield global_batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        global_size = self.batch_size * self.world_size
        num_images = sum(self.has_image)
        counts = (num_images, len(self.has_image) - num_images)
        if self.drop_last:
            return sum(count // global_size for count in counts)
        return sum(math.ceil(count / global_size) for count in counts)


class _Collate:
    """`collate` with its pad id bound; a class rather than a lambda so worker processes
    started with spawn can pickle it."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(batch, self.pad_token_id)


def make_dataloader(dataset: InstructionDataset | CaptionDataset | TextDataset, batch_size: int,
                    pad_token_id: int, num_workers: int = 0, seed: int = 0, world_size: int = 1,
                    rank: int = 0, batches_per_megabatch: int = 1, drop_last: bool = False,
                    pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` with a ModalityLengthGroupedSampler (`loader.batch_sampler`:
    call its set_epoch / skip_batches) and `collate`. `batch_size` is per rank;
    `batches_per_megabatch` = the gradient-accumulation count reproduces LLaVA's megabatch
    (world_size x per-device batch x accumulation samples sorted by length together). Workers stay
    alive across epochs (persistent_workers), which saves re-forking a process that holds the
    whole record list every epoch; sampling runs in the main process, so set_epoch still works.
    """
    sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.has_image, batch_size,
                                           world_size=world_size, rank=rank, seed=seed,
                                           batches_per_megabatch=batches_per_megabatch,
                                           drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                       collate_fn=_Collate(pad_token_id),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0)
