"""Evaluation: the benchmark tasks on their public file formats, prompts, and the eval loop.

Read top to bottom: task loaders, prompts per model family, the model side (batched generation,
likelihood ranking), scoring with metrics.py's official rules, the loop (`run_eval`), the
command line.

Tasks and their files (refer toolkit pickles + COCO instances for RefCOCO/+/g, VQAv2 questions +
annotations, Karpathy caption JSON, POPE jsonl, multiple-choice jsonl); the shapes world writes
the same formats. Multiple choice is scored two ways: by generating the option's letter
(LLaVA-1.5, ScienceQA) and by ranking the candidates by the model's likelihood (LION on VSR /
IconQA / VisDial, after LAVIS's `predict_class`), optionally over every rotation of the options
(MMBench's circular evaluation); a question without an image is asked without one (ScienceQA).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer
from tqdm import tqdm

from adapters import TASK_LEVELS
from conversation import (EOS_TOKEN, IMAGE_PLACEHOLDER, TEMPLATES, last_supervised_run, read_tags,
                          read_oracle_objects, render_conversation, spatial_question_prefix, split_for_encoder_decoder,
                          tag_hint, tag_sentence, with_lyrics_tokens)
from data import (REC_PROMPT, encode_qformer_texts, load_image, load_tokenizer, pad_sequences, read_json,
                  read_json_lines, stack_images)
from layers import IGNORE_INDEX, row_log_likelihoods
from metrics import (box_iou, caption_tokens, cider_d, circular_accuracy, evalai_answer, format_table, parse_box,
                     parse_choice, pope_answer, pope_metrics, vqa_accuracy)
from model import MLLM
from refiner import Refiner
from retrieval import CLASSIFICATION_TASK, run_zero_shot_classification
from vision import (CLIP_BACKGROUND, CLIPModel, box_from_padded_square, high_resolution_tiles, padded_square_box,
                    preprocess_image)


# ---------------------------------------------------------------------------------------------
# Task loaders: one list of Samples per task and split, read from the public file formats

@dataclasses.dataclass
class Sample:
    """One evaluation question. `target` is what the task scores against: the box in pixels
    (x0, y0, x1, y1) for REC, the human answers for VQA, the reference captions, the POPE label,
    or the index of the right choice. `image` is None for a text-only question."""
    sample_id: str
    image: Path | None
    text: str
    target: Any
    choices: list[str] = dataclasses.field(default_factory=list)
    image_size: tuple[int, int] | None = None    # (width, height): REC boxes are normalized with it
    group: str = ""                              # the POPE split or the VQA question type
    rotation_of: str = ""                        # circular evaluation: the id of the question rotated
    answer_type: str = ""                        # VQAv2's answer_type: "yes/no", "number", "other"
    context: str = ""                            # the oracle rung: the scene as text, before the question


def _first_existing(directory: Path, names: list[str], what: str) -> Path:
    """The first of `names` that exists in `directory`; the error lists every name tried."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{what} not found in {directory}: tried {', '.join(names)}")


def read_jsonl(path: Path, required_keys: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a malformed line or a missing key is an
    error naming the file and the line: a benchmark with a broken question must not be scored
    on the questions that happened to parse."""
    def malformed(line_number: int, error: json.JSONDecodeError) -> None:
        raise ValueError(f"{path}, line {line_number}: malformed JSON ({error.msg})") from None

    for line_number, record in read_json_lines(path, malformed, "annotation file"):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line_number}: expected a JSON object")
        missing = [key for key in required_keys if key not in record]
        if missing:
            raise ValueError(f"{path}, line {line_number}: missing key(s) {', '.join(missing)}")
        yield line_number, record


def load_refer(annotation_dir: Path, dataset: str, split: str, image_dir: Path) -> list[Sample]:
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit's layout: `refs(unc).p` (`refs(umd).p`
    for refcocog), a pickled list of {ref_id, ann_id, image_id, split, sentences: [{sent_id,
    sent}]}, with COCO `instances.json` for the boxes ([x, y, w, h]) and image files. One sample
    per sentence, as the toolkit evaluates. Without the pickle, the jsonl form
    `{dataset}_{split}.jsonl` ({"image", "expression", "bbox": [x0, y0, x1, y1] pixels, "width",
    "height"}) is read."""
    pickle_path = annotation_dir / ("refs(umd).p" if dataset == "refcocog" else "refs(unc).p")
    jsonl_path = annotation_dir / f"{dataset}_{split}.jsonl"
    if not pickle_path.is_file():
        if not jsonl_path.is_file():
            raise FileNotFoundError(f"{dataset} annotations not found: neither {pickle_path} nor {jsonl_path}")
        return [Sample(sample_id=str(record.get("id", line_number)), image=image_dir / record["image"],
                       text=record["expression"], target=[float(v) for v in record["bbox"]],
                       image_size=(int(record["width"]), int(record["height"])))
                for line_number, record in read_jsonl(jsonl_path, ("image", "expression", "bbox", "width", "height"))]
    with open(pickle_path, "rb") as file:
        refs = pickle.load(file)
    instances = read_json(annotation_dir / "instances.json", "COCO instances file")
    boxes = {annotation["id"]: annotation["bbox"] for annotation in instances["annotations"]}
    images = {image["id"]: image for image in instances["images"]}
    samples = []
    for ref in refs:
        if ref["split"] != split:
            continue
        if ref["ann_id"] not in boxes or ref["image_id"] not in images:
            raise KeyError(f"{pickle_path}: ref {ref['ref_id']} names annotation {ref['ann_id']} / "
                           f"image {ref['image_id']}, missing from {annotation_dir / 'instances.json'}")
        x, y, width, height = boxes[ref["ann_id"]]
        image = images[ref["image_id"]]
        for sentence in ref["sentences"]:
            samples.append(Sample(sample_id=str(sentence["sent_id"]), image=image_dir / image["file_name"],
                                  text=sentence["sent"], target=[x, y, x + width, y + height],
                                  image_size=(int(image["width"]), int(image["height"]))))
    if not samples:
        raise ValueError(f"{pickle_path}: no refs in split {split!r}")
    return samples


def load_vqa(annotation_dir: Path, split: str, image_dir: Path, image_template: str) -> list[Sample]:
    """VQAv2-style questions JSON {"questions": [{question_id, image_id, question}]} plus
    annotations JSON {"annotations": [{question_id, answers: [{answer}]}]} (VQAv2 file names, or
    questions.json / annotations.json). The image file is `image_template` formatted with
    image_id and split (COCO: "COCO_{split}2014_{image_id:012d}.jpg")."""
    questions_path = _first_existing(annotation_dir, ["questions.json", f"v2_OpenEnded_mscoco_{split}2014_questions.json",
                                                      f"OpenEnded_mscoco_{split}2014_questions.json"], "VQA questions file")
    annotations_path = _first_existing(annotation_dir, ["annotations.json", f"v2_mscoco_{split}2014_annotations.json",
                                                        f"mscoco_{split}2014_annotations.json"], "VQA annotations file")
    questions = read_json(questions_path, "VQA questions file")["questions"]
    annotations = {annotation["question_id"]: annotation
                   for annotation in read_json(annotations_path, "VQA annotations file")["annotations"]}
    samples = []
    for question in questions:
        if question["question_id"] not in annotations:
            raise KeyError(f"{annotations_path}: no answers for question_id {question['question_id']}")
        annotation = annotations[question["question_id"]]
        image_name = image_template.format(image_id=question["image_id"], split=split)
        samples.append(Sample(sample_id=str(question["question_id"]), image=image_dir / image_name,
                              text=question["question"], target=[answer["answer"] for answer in annotation["answers"]],
                              group=annotation.get("question_type", ""), answer_type=annotation.get("answer_type", "")))
    return samples


def load_captions(annotation_dir: Path, split: str, image_dir: Path) -> list[Sample]:
    """Karpathy-split caption JSON (captions.json or dataset_coco.json): {"images": [{filename,
    [filepath], cocoid | imgid, split, sentences: [{raw, tokens}]}]}; one sample per image of the
    split, its sentences the references."""
    path = _first_existing(annotation_dir, ["captions.json", "dataset_coco.json"], "caption file")
    samples = []
    for image in read_json(path, "caption file")["images"]:
        if image["split"] != split:
            continue
        image_path = image_dir / image.get("filepath", "") / image["filename"]
        samples.append(Sample(sample_id=str(image.get("cocoid", image.get("imgid"))), image=image_path,
                              text="", target=[sentence["raw"] for sentence in image["sentences"]]))
    if not samples:
        raise ValueError(f"{path}: no images in split {split!r}")
    return samples


POPE_SPLITS = ("random", "popular", "adversarial")


def load_pope(annotation_dir: Path, split: str, image_dir: Path) -> list[Sample]:
    """POPE jsonl {question_id, image, text, label: yes/no} per split (pope_{split}.jsonl, or the
    original coco_pope_{split}.json); split "all" reads random, popular and adversarial."""
    samples = []
    for pope_split in POPE_SPLITS if split == "all" else (split,):
        path = _first_existing(annotation_dir, [f"pope_{pope_split}.jsonl", f"coco_pope_{pope_split}.json"], "POPE file")
        for line_number, record in read_jsonl(path, ("question_id", "image", "text", "label")):
            if record["label"] not in ("yes", "no"):
                raise ValueError(f"{path}, line {line_number}: label must be yes or no, got {record['label']!r}")
            samples.append(Sample(sample_id=f"{pope_split}/{record['question_id']}", image=image_dir / record["image"],
                                  text=record["text"], target=record["label"], group=pope_split))
    return samples


def question_with_hint(question: str, hint: Any) -> str:
    """MMBench's hint goes before its question, as LLaVA's model_vqa_mmbench.py builds it:
    hint + "\n" + question, unless the hint is missing (its is_none: None, NaN, "nan", "none")."""
    if hint is None or (isinstance(hint, float) and math.isnan(hint)):
        return question
    return question if isinstance(hint, str) and hint.lower() in ("nan", "none") else f"{hint}\n{question}"


def load_multiple_choice(annotation_dir: Path, split: str, image_dir: Path) -> list[Sample]:
    """Multiple-choice jsonl ({split}.jsonl or questions.jsonl): {question_id, question, choices:
    [...], answer: index of the right choice, optional image, optional hint}. A record without
    "image" is a text-only question, asked without an image as LLaVA's model_vqa_science.py asks
    ScienceQA's; a hint (MMBench) goes before the question."""
    path = _first_existing(annotation_dir, [f"{split}.jsonl", "questions.jsonl"], "multiple-choice file")
    samples = []
    for line_number, record in read_jsonl(path, ("question_id", "question", "choices", "answer")):
        if not 0 <= int(record["answer"]) < len(record["choices"]):
            raise ValueError(f"{path}, line {line_number}: answer {record['answer']} is not an index of choices")
        samples.append(Sample(sample_id=str(record["question_id"]),
                              image=image_dir / record["image"] if record.get("image") is not None else None,
                              text=question_with_hint(record["question"], record.get("hint")),
                              target=int(record["answer"]), choices=list(record["choices"])))
    return samples


def rotate_choices(samples: list[Sample]) -> list[Sample]:
    """MMBench's circular evaluation as LLaVA's model_vqa_mmbench.py --all-rounds asks it: each
    question once per rotation of its options (round r lists choices[r:] + choices[:r], lettered
    A, B, ... afresh), the right answer following its option; `rotation_of` keeps the question's id."""
    rotated = []
    for sample in samples:
        count = len(sample.choices)
        for shift in range(count):
            rotated.append(dataclasses.replace(sample, sample_id=f"{sample.sample_id}/{shift}", rotation_of=sample.sample_id,
                                               choices=sample.choices[shift:] + sample.choices[:shift],
                                               target=(sample.target - shift) % count))
    return rotated


# task name -> (kind of scoring, folder under DATA/eval/, default split)
TASKS = {
    "refcoco": ("rec", "refcoco", "val"),
    "refcoco+": ("rec", "refcoco+", "val"),
    "refcocog": ("rec", "refcocog", "val"),
    "vqa": ("vqa", "vqa", "val"),
    "captions": ("caption", "captions", "test"),
    "pope": ("pope", "pope", "all"),
    "mc": ("choice", "mc", "test"), "mc-rank": ("rank", "mc", "test"),
}
COCO_IMAGE_TEMPLATE = "COCO_{split}2014_{image_id:012d}.jpg"


def load_task(task: str, data_dir: str | Path, split: str, annotation_dir: str | Path | None = None,
              image_dir: str | Path | None = None, image_template: str = COCO_IMAGE_TEMPLATE) -> list[Sample]:
    """The samples of a task. Defaults follow the shapes-world layout (shapes.py): annotations in
    DATA/eval/<folder>/, images in DATA/images/; both can point elsewhere for the public data."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kind, folder, _ = TASKS[task]
    annotations = Path(annotation_dir) if annotation_dir else Path(data_dir) / "eval" / folder
    images = Path(image_dir) if image_dir else Path(data_dir) / "images"
    if kind == "rec":
        return load_refer(annotations, task, split, images)
    if kind == "vqa":
        return load_vqa(annotations, split, images, image_template)
    if kind == "caption":
        return load_captions(annotations, split, images)
    if kind == "pope":
        return load_pope(annotations, split, images)
    return load_multiple_choice(annotations, split, images)


# ---------------------------------------------------------------------------------------------
# Prompts per model family

@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """How a model family is asked each kind of question. `template` is a data.py conversation
    template (the image goes first in the first user turn, as LLaVA-1.5's data has it); None means
    the family has no chat template: the prompt is BOS, the image tokens, then `turn` text
    (InstructBLIP / LION put the instruction after the query tokens)."""
    template: str | None
    turn: str              # one dialogue turn for template-less styles; "{}" = the message itself
    short_answer: str      # VQA, POPE, and the prompt whose continuation mc-rank scores
    multiple_choice: str
    referring: str
    caption: str
    describe: str          # Lynx's plug-and-play first question
    # BLIP-2 / InstructBLIP as transformers' processors build them: the query tokens come before
    # BOS ("BLIP expects image tokens to be at the beginning even before BOS").
    image_before_bos: bool = False


REFERRING_PROMPT = REC_PROMPT + "{expression}"  # the REC turns of LLaVA-1.5's (and the shapes world's) data
PROMPT_STYLES = {
    # LLaVA-1.5 response-format prompts (Steerable Visual Intelligence, section 4.3, Table 4.1; caption prompt as lmms-eval).
    "llava15": PromptStyle(
        template="vicuna_v1", turn="{}",
        short_answer="{question}\nAnswer the question using a single word or phrase.",
        multiple_choice="{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
        referring=REFERRING_PROMPT, caption="Provide a one-sentence caption for the provided image.",
        describe="Describe the image in detail."),
    # LLaVA (v1): the same chat, no response-format suffixes (the ablation of Table 4.2).
    "llava": PromptStyle(
        template="vicuna_v1", turn="{}", short_answer="{question}", multiple_choice="{question}\n{options}",
        referring=REFERRING_PROMPT, caption="Describe the image concisely.", describe="Describe the image in detail."),
    # InstructBLIP / LION evaluation instructions (LION appendix B.2; REC: first Shikra template of Table 9).
    "instructblip": PromptStyle(
        template=None, turn="{}", short_answer="Question: {question} Short answer:",
        multiple_choice="Question: {question} Options: {options} Short answer:",
        referring="Identify the position of {expression} in image and share its coordinates.",
        caption="A short image caption.", describe="Describe the image in detail.", image_before_bos=True),
    # LION's own (appendix B.2): InstructBLIP's but for the caption instruction.
    "lion": PromptStyle(
        template=None, turn="{}", short_answer="Question: {question} Short answer:",
        multiple_choice="Question: {question} Options: {options} Short answer:",
        referring="Identify the position of {expression} in image and share its coordinates.",
        caption="A short image description:", describe="Describe the image in detail.", image_before_bos=True),
    # BLIP-2 zero-shot (Li et al. 2023, sec. 4.2): VQA "Question: {} Answer:" (OPT; its Flan-T5
    # models use "Question: {} Short answer:"), captions continue the prompt "a photo of".
    "blip2": PromptStyle(
        template=None, turn="{}", short_answer="Question: {question} Answer:",
        multiple_choice="Question: {question} Options: {options} Answer:",
        referring="Identify the position of {expression} in image and share its coordinates.",
        caption="a photo of", describe="a photo of", image_before_bos=True),
    # Lynx: conversation.py's "lynx" template (image, BOS, "user: ...\nbot:", lowercased), its training
    # prompts (Lynx appendix, Table 13).
    "lynx": PromptStyle(
        template="lynx", turn="{}", short_answer="{question} Give a short answer.",
        multiple_choice="{question}\n{options}\nAnswer with the option's letter.", referring=REFERRING_PROMPT,
        caption="Describe the image briefly.", describe="Describe the image in detail."),
}


def user_message(kind: str, sample: Sample, style: PromptStyle) -> str:
    """The question text a sample asks, in the style's wording."""
    if kind == "rec":
        message = style.referring.format(expression=sample.text)
    elif kind == "caption":
        message = style.caption
    elif kind == "choice":
        options = "\n".join(f"{chr(ord('A') + index)}. {choice}" for index, choice in enumerate(sample.choices))
        message = style.multiple_choice.format(question=sample.text, options=options)
    else:  # VQA, POPE, and the question whose candidate answers mc-rank scores
        message = style.short_answer.format(question=sample.text)
    return message


# ---------------------------------------------------------------------------------------------
# The model side: prompts to token ids, batches, generation, likelihood ranking

class Evaluator:
    """A model, its tokenizer and a prompt style, turned into batched answers to Samples."""

    def __init__(self, model: MLLM, tokenizer: Tokenizer, style: PromptStyle, blind: bool = False,
                 stop_strings: list[str] | None = None, qformer_tokenizer: Tokenizer | None = None,
                 tags: dict[str, list[str]] | None = None, task_level: str = "image", objects: Any = None,
                 blank_objects: bool = False):
        self.model, self.tokenizer, self.style, self.blind = model, tokenizer, style, blind
        # Lyrics: each image's objects from the visual refiner (refiner.Refiner), or none at all
        # (`blank_objects`: the refiner's ablation, Lyrics Table 5 "w/o VR").
        self.objects, self.blank_objects = objects, blank_objects
        if (model.config.num_grounding_queries or model.config.spatial_prompt) and objects is None:
            raise ValueError("this model reads the visual refiner's objects: give its directory (refiner, --refiner)")
        if model.config.spatial_prompt:  # the markup tokens the LLM learned
            with_lyrics_tokens(tokenizer)
        # LION: an image's tags before its first question (keyed by image file name), with the
        # soft prompt's token as hint when the model has one; the router's task level.
        self.tags, self.task_level = tags, TASK_LEVELS[task_level]
        self.hint = tag_hint(tokenizer, model.config.hint_token_index)
        self.stop_strings = stop_strings or []
        if model.multi_modal_projector.takes_instruction and qformer_tokenizer is None:
            raise ValueError("this model's Q-Former reads the instruction (InstructBLIP): give its tokenizer "
                             "(qformer_tokenizer, --qformer-tokenizer)")
        self.qformer_tokenizer = qformer_tokenizer
        config = model.config
        # Boxes are fractions of the padded square with AnyRes too: LLaVA-NeXT learns LLaVA-1.5's
        # REC data, written that way (its pixels are tiles, which never read this flag).
        self.pad_to_square = config.image_aspect_ratio in ("pad", "anyres")
        self.image_size = config.vision_config.image_size
        self.image_token_index = config.image_token_index
        self.pad_token_id = config.pad_token_id
        # An encoder-decoder LLM (T5) reads the prompt in its encoder, without BOS, and writes
        # the answer from its decoder: prompts and answers are split as data.py trains them.
        self.encoder_decoder = config.text_config.is_encoder_decoder
        self.bos_token_id = None if self.encoder_decoder else config.text_config.bos_token_id
        eos = config.text_config.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def image_tokens(self, sample: Sample) -> int:
        """How many image tokens the sample's image fills: none without one, with AnyRes what its
        size yields (read from the file's header)."""
        if sample.image is None:
            return 0
        if self.model.high_resolution is None:
            return self.model.num_image_tokens
        with Image.open(sample.image) as image:
            return self.model.high_resolution.num_image_tokens((image.height, image.width))

    def encode_dialogue(self, turns: list[tuple[str, str | None]], answer: str | None,
                        image_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids (and labels marking `answer`'s tokens) of a dialogue: finished (question,
        reply) turns, then the last question, then `answer`, or the open assistant turn for
        generation when `answer` is None. image_tokens: the image's (`image_tokens`; None: the
        model's fixed count); without an image (0) the prompt has no image tokens
        (model_vqa_science.py's text-only questions)."""
        image_tokens = self.model.num_image_tokens if image_tokens is None else image_tokens
        with_image = image_tokens > 0
        if self.style.template is not None:
            conversation = []
            for index, (question, reply) in enumerate(turns):
                image = IMAGE_PLACEHOLDER + "\n" if index == 0 and with_image else ""
                conversation.append({"from": "human", "value": image + question})
                if reply is not None:
                    conversation.append({"from": "gpt", "value": reply})
            if answer is not None:
                conversation.append({"from": "gpt", "value": answer})
            input_ids, labels = render_conversation(conversation, self.style.template, self.tokenizer,
                                                    self.image_token_index, image_tokens,
                                                    for_generation=answer is None, add_bos=not self.encoder_decoder)
            return list(input_ids), _last_labeled_span(list(labels))
        text = "".join(self.style.turn.format(question) + (f" {reply}\n" if reply is not None else "")
                       for question, reply in turns)
        image = [self.image_token_index] * image_tokens
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        start = image + bos if self.style.image_before_bos else bos + image
        prompt = start + self._encode(text)
        if answer is None:
            return prompt, [IGNORE_INDEX] * len(prompt)
        answer_ids = self._encode(" " + answer) + self.eos_token_ids[:1]
        return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tagged(self, dialogue: list[tuple[str, str | None]], sample: Sample) -> list[tuple[str, str | None]]:
        """The dialogue with LION's tag sentence or Lyrics' objects (with `spatial_prompt`) before
        its first question (conversation.with_question_prefix's place; a Q-Former reads the bare one),
        or the oracle rung's scene text in place of the image."""
        if sample.context:
            (question, reply), *rest = dialogue
            return [(sample.context + question, reply), *rest]
        if sample.image is None or (self.tags is None and not self.model.config.spatial_prompt):
            return dialogue
        if self.tags is not None and sample.image.name not in self.tags:
            raise ValueError(f"the tags file has no entry for image {sample.image.name!r}")
        prefix = tag_sentence(self.tags[sample.image.name], self.hint) if self.tags is not None else \
            spatial_question_prefix([] if self.blank_objects else self.objects.spatial_text(sample.image.name))
        (question, reply), *rest = dialogue
        return [(prefix + question, reply), *rest]

    def instructions(self, samples: list[Sample], dialogues: list[list[tuple[str, str | None]]]) -> dict:
        """InstructBLIP's Q-Former input: each image's question (the dialogue's last), through the
        Q-Former's own tokenizer, left-truncated to 128 tokens as LAVIS does; {} for other models."""
        if not self.model.multi_modal_projector.takes_instruction:
            return {}
        questions = [dialogue[-1][0] for sample, dialogue in zip(samples, dialogues) if sample.image is not None]
        if not questions:
            return {}
        ids, mask = encode_qformer_texts(self.qformer_tokenizer, questions, max_length=128, truncation_side="left")
        return {"qformer_input_ids": ids.to(self.device), "qformer_attention_mask": mask.to(self.device)}

    def image_inputs(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """The model's image arguments: pixel_values, one preprocessed image per sample that has
        one, in batch order (model.MLLM.embed takes images for the rows holding image tokens only),
        with AnyRes their tiles and image_sizes; {} if none has. The blind baseline (what vision
        adds) gets zeros, CLIP's mean color after normalization; with AnyRes, whose zero tiles are
        padding, a uniform image of that color (to 1/255) in each image's place."""
        images = [load_image(sample.image) for sample in samples if sample.image is not None]
        if not images:
            return {}
        if self.blind and self.model.high_resolution is not None:
            images = [Image.new("RGB", image.size, CLIP_BACKGROUND) for image in images]
        inputs = {}
        if self.model.high_resolution is None:
            pixels = [preprocess_image(image, self.image_size, self.pad_to_square) for image in images]
        else:
            geometry = self.model.high_resolution
            pixels = [high_resolution_tiles(image, geometry.tile_size, geometry.grid_pinpoints) for image in images]
            inputs["image_sizes"] = torch.tensor([(image.height, image.width) for image in images], device=self.device)
        pixel_values = stack_images(pixels)
        if self.blind and self.model.high_resolution is None:
            pixel_values = torch.zeros_like(pixel_values)
        if self.objects is not None:
            features, present = zip(*(self.objects.mqformer_input(sample.image.name) for sample in samples
                                      if sample.image is not None))
            inputs["object_features"] = torch.stack(features).to(self.device, self.dtype)
            inputs["object_mask"] = torch.stack(present).to(self.device) & (not self.blank_objects)
        return {"pixel_values": pixel_values.to(self.device, self.dtype), **inputs}

    def generate(self, samples: list[Sample], dialogues: list[list[tuple[str, str | None]]],
                 **decoding) -> list[str]:
        """Answers to the last question of each dialogue, generated as one left-padded batch."""
        prompts = [self.encode_dialogue(self.tagged(dialogue, sample), None, self.image_tokens(sample))[0]
                   for sample, dialogue in zip(samples, dialogues)]
        input_ids, attention_mask = pad_sequences(prompts, self.pad_token_id, side="left")
        if self.stop_strings:
            decoding["stop_token_sequences"] = [self._encode(stop) for stop in self.stop_strings]
        generated = self.model.generate(input_ids.to(self.device), **self.image_inputs(samples),
                                        attention_mask=attention_mask.to(self.device), task_level=self.task_level,
                                        **self.instructions(samples, dialogues), **decoding)
        return [self.decode(row.tolist()) for row in generated]

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated ids up to the first end-of-sequence or padding token, and before the
        first stop string (generation keeps the stop sequence it ended on)."""
        for stop in [*self.eos_token_ids, self.pad_token_id]:
            if stop in token_ids:
                token_ids = token_ids[:token_ids.index(stop)]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            text = text.split(stop)[0]
        return text.strip()

    def rank_choices(self, samples: list[Sample], dialogues: list[list[tuple[str, str | None]]]) -> list[list[float]]:
        """Log-likelihood of each candidate answer (its tokens and end of turn) after each
        dialogue, summed over tokens: LION ranks VSR / IconQA / VisDial candidates this way
        (LAVIS `predict_class`: the candidate with the lowest summed loss wins). One forward pass
        over every (sample, candidate) row of the batch, right-padded; a row of a sample with an
        image gets that image, a text-only sample's rows none."""
        rows, owners, row_dialogues = [], [], []
        for index, (sample, dialogue) in enumerate(zip(samples, dialogues)):
            image_tokens = self.image_tokens(sample)
            for choice in sample.choices:
                row_dialogues.append(dialogue)
                rows.append(self.encode_dialogue(self.tagged(dialogue, sample), choice, image_tokens))
                owners.append(index)
        decoder = {}
        if self.encoder_decoder:  # the candidate is the decoder's target, the dialogue the encoder's input
            rows = [split_for_encoder_decoder(ids, row_labels, self.eos_token_ids[0]) for ids, row_labels in rows]
        input_ids, attention_mask = pad_sequences([ids for ids, _ in rows], self.pad_token_id)
        labels, _ = pad_sequences([row_labels for _, row_labels in rows], IGNORE_INDEX)
        labels = labels.to(self.device)
        if self.encoder_decoder:
            decoder["decoder_input_ids"] = self.model.language_model.shift_right(labels)
        logits = self.model(input_ids.to(self.device), **self._row_images(samples, owners),
                            attention_mask=attention_mask.to(self.device), task_level=self.task_level,
                            **self.instructions([samples[owner] for owner in owners], row_dialogues), **decoder)
        totals, _ = row_log_likelihoods(logits, labels, shifted=not self.encoder_decoder)
        per_sample: list[list[float]] = [[] for _ in samples]
        for owner, total in zip(owners, totals.tolist()):
            per_sample[owner].append(total)
        return per_sample

    def _row_images(self, samples: list[Sample], owners: list[int]) -> dict[str, torch.Tensor]:
        """The image inputs of each row's sample, for the rows whose sample has one (rows in order)."""
        inputs = self.image_inputs(samples)
        image_of = {index: position for position, index in
                    enumerate(index for index, sample in enumerate(samples) if sample.image is not None)}
        rows = torch.tensor([image_of[owner] for owner in owners if owner in image_of], device=self.device)
        return {name: value[rows] for name, value in inputs.items()}


def _last_labeled_span(labels: list[int]) -> list[int]:
    """Labels with only the final assistant reply kept: a dialogue with an earlier reply (the
    describe-first description) must not count that reply in a candidate's likelihood."""
    start, end = last_supervised_run(labels)
    return [label if start <= i < end else IGNORE_INDEX for i, label in enumerate(labels)]


# ---------------------------------------------------------------------------------------------
# Scoring

def normalize_box(box: list[float], image_size: tuple[int, int], pad_to_square: bool) -> list[float]:
    """A pixel box as the model reads and writes boxes: normalized to the padded square when
    images are padded (LLaVA-1.5 `pad`, the square the tower sees), else to the image's own width
    and height."""
    width, height = image_size
    if pad_to_square:
        return padded_square_box(box, width, height)
    return [box[0] / width, box[1] / height, box[2] / width, box[3] / height]


def denormalize_box(box: list[float], image_size: tuple[int, int], pad_to_square: bool) -> list[float]:
    """Inverse of `normalize_box`: back to pixels of the original image."""
    width, height = image_size
    if pad_to_square:
        return box_from_padded_square(box, width, height)
    return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]


def score_task(kind: str, samples: list[Sample], predictions: list[str], pad_to_square: bool,
               choice_scores: list[list[float]] | None = None,
               circular: bool = False) -> tuple[list[dict], dict[str, float]]:
    """Per-sample records (for predictions.jsonl) and the task's metrics. `circular`: the samples
    are the rotations of `rotate_choices`, scored per question as well."""
    records = [{"id": sample.sample_id, "image": None if sample.image is None else str(sample.image),
                "question": sample.text, "prediction": prediction} for sample, prediction in zip(samples, predictions)]
    metrics: dict[str, float] = {"samples": len(samples)}
    if kind == "rec":
        correct = unparsable = 0
        for record, sample, prediction in zip(records, samples, predictions):
            target = normalize_box(sample.target, sample.image_size, pad_to_square)
            box = parse_box(prediction)
            iou = box_iou(box, target) if box else 0.0
            unparsable += box is None
            correct += iou >= 0.5
            record.update(target=[round(value, 4) for value in target], box=box, iou=iou)
        metrics.update(accuracy=correct / len(samples), unparsable=unparsable)
    elif kind == "vqa":
        metrics.update(score_vqa(records, samples, predictions))
    elif kind == "caption":
        for record, sample in zip(records, samples):
            record["references"] = sample.target
        hypotheses = {sample.sample_id: caption_tokens(prediction) for sample, prediction in zip(samples, predictions)}
        references = {sample.sample_id: [caption_tokens(reference) for reference in sample.target] for sample in samples}
        metrics["cider"] = cider_d(hypotheses, references)
    elif kind == "pope":
        for record, sample, prediction in zip(records, samples, predictions):
            record.update(label=sample.target, answer=pope_answer(prediction))
        groups = sorted({sample.group for sample in samples}, key=POPE_SPLITS.index)
        per_group = {group: pope_metrics([p for s, p in zip(samples, predictions) if s.group == group],
                                         [s.target for s in samples if s.group == group]) for group in groups}
        for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            # Papers report POPE per split and averaged over the three splits.
            metrics[name] = sum(values[name] for values in per_group.values()) / len(per_group)
            if len(groups) > 1:
                metrics.update({f"{group}_{name}": values[name] for group, values in per_group.items()})
    else:
        metrics.update(score_choices(records, samples, predictions, choice_scores, circular))
    return records, metrics


def score_vqa(records: list[dict], samples: list[Sample], predictions: list[str]) -> dict[str, float]:
    """VQA in LLaVA's two steps: each prediction through EvalAI's answer processor (as
    convert_vqav2_for_submission.py uploads it), then vqaEval.py's accuracy, overall, per
    question type (perQuestionType) and per answer type (perAnswerType: yes/no, number, other),
    where the annotations carry them; adds the submitted answer and its score to each record."""
    submitted = [evalai_answer(prediction) for prediction in predictions]
    scores = [vqa_accuracy(answer, sample.target) for sample, answer in zip(samples, submitted)]
    for record, sample, answer, score in zip(records, samples, submitted, scores):
        record.update(submitted=answer, answers=sample.target, accuracy=score)
    per_question_type = _mean_per_key(scores, [sample.group for sample in samples])
    per_answer_type = _mean_per_key(scores, [sample.answer_type for sample in samples])
    return {"accuracy": sum(scores) / len(scores),
            **{f"accuracy[{question_type}]": value for question_type, value in per_question_type.items()},
            **{f"accuracy[answer_type={answer_type}]": value for answer_type, value in per_answer_type.items()}}


def _mean_per_key(values: list[float], keys: list[str]) -> dict[str, float]:
    """The mean of `values` per key, keys sorted, the empty key (no annotation) left out."""
    return {key: sum(v for v, k in zip(values, keys) if k == key) / keys.count(key) for key in sorted(set(keys) - {""})}


def score_choices(records: list[dict], samples: list[Sample], predictions: list[str],
                  choice_scores: list[list[float]] | None, circular: bool) -> dict[str, float]:
    """Multiple choice by eval_science_qa.py's rules (metrics.parse_choice): accuracy, and the
    replies it cannot parse ("FAILED", scored wrong) as failed_parses; where text-only questions
    are mixed in, the accuracy on those with an image (the script's IMG-Accuracy); with
    `circular`, the share of questions right in every rotation (circular_accuracy, MMBench) and
    their number."""
    chosen = [parse_choice(prediction, len(sample.choices)) for sample, prediction in zip(samples, predictions)]
    correct = [index == sample.target for index, sample in zip(chosen, samples)]
    for position, (record, sample) in enumerate(zip(records, samples)):
        record.update(choices=sample.choices, answer=sample.target, chosen=chosen[position])
        if choice_scores is not None:
            record["log_likelihoods"] = choice_scores[position]
    metrics = {"accuracy": sum(correct) / len(samples), "failed_parses": chosen.count(None)}
    with_image = [right for right, sample in zip(correct, samples) if sample.image is not None]
    if with_image and len(with_image) < len(samples):  # eval_science_qa.py's IMG-Accuracy (ScienceQA-IMG)
        metrics["img_accuracy"] = sum(with_image) / len(with_image)
    if circular:
        questions = [sample.rotation_of for sample in samples]
        metrics.update(circular_accuracy=circular_accuracy(questions, correct), questions=len(set(questions)))
    return metrics


def visualize_rec(records: list[dict], samples: list[Sample], pad_to_square: bool, directory: Path,
                  min_side: int = 384) -> None:
    """PNG per sample, drawn at a size a person reads: the image enlarged by a whole factor (pixels
    kept sharp) to at least `min_side`, ground truth in green, the prediction in red, and below it
    the expression, the answer as written and the IoU."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, (record, sample) in enumerate(zip(records, samples)):
        image = load_image(sample.image)
        scale = max(1, -(-min_side // min(image.size)))
        canvas = Image.new("RGB", (image.width * scale, image.height * scale + 54), "white")
        canvas.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
        draw = ImageDraw.Draw(canvas)
        boxes = [(sample.target, (0, 170, 0))]
        if record["box"] is not None:
            boxes.append((denormalize_box(record["box"], sample.image_size, pad_to_square), (220, 0, 0)))
        for box, color in boxes:  # PIL refuses x1 < x0: a model's inverted box is drawn as the box it spans
            draw.rectangle([min(box[0], box[2]) * scale, min(box[1], box[3]) * scale,
                            max(box[0], box[2]) * scale, max(box[1], box[3]) * scale], outline=color, width=3)
        lines = (f"\"{sample.text}\"", f"answer {record['prediction'][:48]}  IoU {record['iou']:.2f}",
                 "green: truth  red: answer")
        for row, line in enumerate(lines):
            draw.text((6, image.height * scale + 4 + 16 * row), line, fill="black")
        canvas.save(directory / f"{index:04d}_{re.sub(r'[^A-Za-z0-9_-]', '_', sample.sample_id)}.png")


# ---------------------------------------------------------------------------------------------
# The loop

# The official evaluations' caps on new tokens, per kind of task that generates (mc-rank does not):
# VQA and POPE 128, the --max_new_tokens default of LLaVA's model_vqa_loader.py (run by its
# vqav2.sh and pope.sh); multiple choice 1024, hard-coded in model_vqa_science.py (ScienceQA) and
# model_vqa_mmbench.py (MMBench), as in model_vqa.py (LLaVA-Bench); LLaVA has no REC or caption
# eval: lmms-eval's refcoco_bbox_rec sets no cap, so its LLaVA model's default 1024 applies, and
# its coco_karpathy task sets 64. The generation stops at end of sequence long before on a
# trained model; a run that needs smaller caps passes max_new_tokens (the shapes configs do).
DEFAULT_MAX_NEW_TOKENS = {"rec": 1024, "vqa": 128, "caption": 64, "pope": 128, "choice": 1024}


def prompt_style_name(model: MLLM, prompt_style: str | None) -> str:
    return prompt_style or getattr(model.config, "prompt_style", None) or "llava15"


def build_evaluator(model: MLLM, tokenizer: Tokenizer, prompt_style: str | None = None, template: str | None = None,
                    blind: bool = False, stop_strings: list[str] | None = None,
                    qformer_tokenizer: Tokenizer | None = None, tags: dict[str, list[str]] | None = None,
                    task_level: str = "image", objects: Any = None, blank_objects: bool = False) -> Evaluator:
    """An Evaluator in the model's prompt style: `prompt_style` (a key of PROMPT_STYLES) or
    `model.config.prompt_style`, else "llava15"; the chat template `template` or
    `model.config.template`, else the style's. A template whose answers end in a stop string
    other than EOS ("###" of vicuna_v0) adds it to `stop_strings`."""
    style_name = prompt_style_name(model, prompt_style)
    if style_name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style_name!r}; choose from {', '.join(PROMPT_STYLES)}")
    style = PROMPT_STYLES[style_name]
    template = template or getattr(model.config, "template", None)
    if template is not None and style.template is not None:
        # The chat the model was trained with wins over the style's default (LLaVA v1: vicuna_v0).
        style = dataclasses.replace(style, template=template)
    if style.template is not None and TEMPLATES[style.template].stop != EOS_TOKEN:
        # "###" of vicuna_v0 ends an answer the way EOS does for vicuna_v1.
        stop_strings = [*(stop_strings or []), TEMPLATES[style.template].stop]
    return Evaluator(model, tokenizer, style, blind, stop_strings, qformer_tokenizer, tags, task_level, objects,
                     blank_objects)


def answer_samples(evaluator: Evaluator, kind: str, samples: list[Sample], batch_size: int,
                   describe_first: bool, describe_max_new_tokens: int, progress_label: str | None,
                   **decoding) -> tuple[list[str], list[str], list[list[float]] | None]:
    """(answers, descriptions, candidate log-likelihoods or None) in the order of `samples`.

    Batches hold questions of similar length (sorted by question text, as lmms-eval orders its
    requests), so left padding wastes little compute; the results go back to the samples' order.
    mc-rank answers with the letter of its most likely candidate, so both multiple-choice modes
    share the scoring."""
    style = evaluator.style
    messages = [user_message(kind, sample, style) for sample in samples]
    order = sorted(range(len(samples)), key=lambda index: len(messages[index]))
    answers, descriptions = [""] * len(samples), [""] * len(samples)
    choice_scores: list[list[float]] | None = [[] for _ in samples] if kind == "rank" else None
    with tqdm(total=len(samples), desc=progress_label, disable=progress_label is None) as bar:
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = [samples[index] for index in indices]
            histories: list[list[tuple[str, str | None]]] = [[] for _ in batch]
            with_image = [position for position, sample in enumerate(batch) if sample.image is not None]
            if describe_first and with_image:
                # Only an image can be described; a text-only question goes straight to its answer.
                described = evaluator.generate([batch[position] for position in with_image],
                                               [[(style.describe, None)]] * len(with_image),
                                               **{**decoding, "max_new_tokens": describe_max_new_tokens})
                for position, description in zip(with_image, described):
                    histories[position] = [(style.describe, description)]
                    descriptions[indices[position]] = description
            dialogues = [history + [(messages[index], None)] for history, index in zip(histories, indices)]
            if choice_scores is not None:
                batch_answers = []
                for index, scores in zip(indices, evaluator.rank_choices(batch, dialogues)):
                    choice_scores[index] = scores
                    batch_answers.append(chr(ord("A") + max(range(len(scores)), key=scores.__getitem__)))
            else:
                batch_answers = evaluator.generate(batch, dialogues, **decoding)
            for index, answer in zip(indices, batch_answers):
                answers[index] = answer
            bar.update(len(batch))
    return answers, descriptions, choice_scores


def run_eval(model: MLLM, tokenizer: Tokenizer, task: str, data_dir: str | Path, split: str | None = None,
             batch_size: int = 16, limit: int | None = None, out_dir: str | Path | None = None, *,
             prompt_style: str | None = None, template: str | None = None, annotation_dir: str | Path | None = None,
             image_dir: str | Path | None = None, image_template: str = COCO_IMAGE_TEMPLATE,
             describe_first: bool = False, describe_max_new_tokens: int = 128, visualize: int = 0,
             blind: bool = False, stop_strings: list[str] | None = None, circular: bool = False,
             qformer_tokenizer: Tokenizer | None = None, progress: bool = True, print_results: bool = True,
             tags: str | None = None, tag_noise: float = 0.0, refiner: str | None = None,
             blank_refiner: bool = False, oracle_text: str | None = None, **decoding) -> dict[str, float]:
    """Evaluate `model` on one task and split; returns the metrics (and writes
    `{task}_{split}.predictions.jsonl` / `.metrics.json` to `out_dir` when given).

    prompt_style: a key of PROMPT_STYLES; default `model.config.prompt_style` if the config has
    one, else "llava15". template: the data.py conversation template; default
    `model.config.template` if present, else the style's. describe_first: Lynx's plug-and-play,
    the model's own detailed description goes into the dialogue before the question. blind:
    images replaced by zeros (the no-vision baseline). stop_strings: generation stops after one
    and the answer is cut before it. circular: multiple choice asked once per rotation of the
    options, scored per question too (MMBench's circular evaluation). qformer_tokenizer: the
    Q-Former's own tokenizer, for a model whose Q-Former reads the question (InstructBLIP). tags:
    LION's tags file (conversation.read_tags, with `tag_noise`), keyed by image file name; REC
    runs LION's router at the region level, every other task at the image level. refiner: Lyrics'
    visual refiner directory (refiner.py); blank_refiner: every image without objects. oracle_text:
    an objects file (conversation.read_oracle_objects); each image is replaced by its scene written
    as text before the question (the ladder's top rung: perfect vision). `decoding` goes
    to `model.generate` (max_new_tokens defaults per task kind: DEFAULT_MAX_NEW_TOKENS)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kind, _, default_split = TASKS[task]
    split = split or default_split
    if circular and kind != "choice":
        # mc-rank scores each option's text on its own, so rotating the letters changes nothing.
        raise ValueError(f"circular rotates the lettered options of a multiple-choice prompt (kind 'choice'), "
                         f"not {task!r}")
    samples = load_task(task, data_dir, split, annotation_dir, image_dir, image_template)[:limit]
    if circular:
        samples = rotate_choices(samples)
    if oracle_text:
        scenes = read_oracle_objects(oracle_text)
        unknown = next((s.image.name for s in samples if s.image is not None and s.image.name not in scenes), None)
        if unknown is not None:
            raise ValueError(f"{oracle_text} has no objects for image {unknown!r}")
        samples = [dataclasses.replace(s, image=None, context=scenes[s.image.name]) if s.image is not None else s
                   for s in samples]
    missing = next((sample.image for sample in samples if sample.image is not None and not sample.image.is_file()),
                   None)
    if missing is not None:
        hint = f" (VQA image names come from image_template, now {image_template!r})" if kind == "vqa" else ""
        raise FileNotFoundError(f"image not found: {missing}{hint}")
    if visualize and (kind != "rec" or oracle_text):
        raise ValueError("visualize draws boxes on images: only the REC tasks (refcoco, refcoco+, refcocog) have "
                         "them, and the oracle rung reads no image")
    if kind in DEFAULT_MAX_NEW_TOKENS:
        decoding = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS[kind], **decoding}
    evaluator = build_evaluator(model, tokenizer, prompt_style, template, blind, stop_strings, qformer_tokenizer,
                                read_tags(tags, tag_noise) if tags else None, "region" if kind == "rec" else "image",
                                Refiner(refiner) if refiner else None, blank_refiner)

    was_training = model.training
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        predictions, descriptions, choice_scores = answer_samples(
            evaluator, kind, samples, batch_size, describe_first, describe_max_new_tokens,
            progress_label=f"{task} {split}" if progress else None, **decoding)
    seconds = time.perf_counter() - started
    model.train(was_training)

    records, metrics = score_task(kind, samples, predictions, evaluator.pad_to_square, choice_scores, circular)
    if describe_first:
        for record, description in zip(records, descriptions):
            record["description"] = description
    metrics["samples_per_second"] = len(samples) / seconds if seconds > 0 else 0.0
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{task}_{split}.predictions.jsonl", "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record) + "\n")
        summary = {"task": task, "split": split, "prompt_style": prompt_style_name(model, prompt_style),
                   "describe_first": describe_first, "blind": blind, "oracle_text": oracle_text, "circular": circular,
                   "decoding": decoding, "metrics": metrics}
        (out / f"{task}_{split}.metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        if visualize:
            visualize_rec(records[:visualize], samples[:visualize], evaluator.pad_to_square, out / f"{task}_{split}_boxes")
    if print_results:
        print(format_table(task, split, metrics))
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line

# Named decoding presets: LAVIS's InstructBLIP generate() defaults (beam search of 5, at most 256
# tokens, repetition penalty 1.5; its top_p 0.9 acts only with sampling, off by default), which
# LION's generate() keeps (JiuTian-LION's lion_t5.py).
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    **{name: dict(num_beams=5, max_new_tokens=256, min_new_tokens=1, repetition_penalty=1.5, length_penalty=1.0,
                  top_p=0.9, temperature=1.0) for name in ("instructblip", "lion")},
    # Lynx's official LYNX.yaml: beam sampling; its `min_length: 2` counts new tokens only, since
    # the prompt reaches transformers' generate as embeddings.
    "lynx": dict(do_sample=True, num_beams=5, top_p=0.9, top_k=3, max_new_tokens=64, min_new_tokens=2,
                 length_penalty=-2.0, no_repeat_ngram_size=2, temperature=1.0, repetition_penalty=1.0),
}

DECODING_OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size",
                    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding options of model.generate as flags (eval.py and sample.py share them)."""
    decoding = parser.add_argument_group("decoding (passed to model.generate)")
    decoding.add_argument("--decoding-preset", choices=list(DECODING_PRESETS),
                          help="a family's published defaults; the flags below override them")
    decoding.add_argument("--max-new-tokens", type=int)
    decoding.add_argument("--min-new-tokens", type=int)
    decoding.add_argument("--num-beams", type=int)
    decoding.add_argument("--length-penalty", type=float)
    decoding.add_argument("--no-repeat-ngram-size", type=int)
    decoding.add_argument("--do-sample", action="store_true", default=None)
    decoding.add_argument("--temperature", type=float)
    decoding.add_argument("--top-k", type=int)
    decoding.add_argument("--top-p", type=float)
    decoding.add_argument("--repetition-penalty", type=float)
    decoding.add_argument("--stop", action="append", help="stop string (repeatable)")


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags that were given, over the preset's, as model.generate's keyword arguments."""
    preset = DECODING_PRESETS[args.decoding_preset] if getattr(args, "decoding_preset", None) else {}
    return {**preset, **{name: getattr(args, name) for name in DECODING_OPTIONS if getattr(args, name) is not None}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on a benchmark task.")
    parser.add_argument("--task", required=True, choices=[*TASKS, CLASSIFICATION_TASK],
                        help=f"{CLASSIFICATION_TASK}: zero-shot, with a CLIP checkpoint (splits: the task files)")
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (MLLM.from_pretrained; "
                                                      "CLIPModel.from_pretrained for classification)")
    parser.add_argument("--data", required=True, help="dataset root (the shapes world: DATA/eval/<task>, DATA/images)")
    parser.add_argument("--split", help="val / testA / testB / test (REC), test (captions), "
                                        "random / popular / adversarial / all (POPE)")
    parser.add_argument("--annotation-dir", help="directory of the task's annotation files (default DATA/eval/<task>)")
    parser.add_argument("--image-dir", help="directory of the images (default DATA/images)")
    parser.add_argument("--image-template", default=COCO_IMAGE_TEMPLATE,
                        help="VQA image file name from image_id and split (shapes world: '{image_id:012d}.png')")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, else DATA/tokenizer.json)")
    parser.add_argument("--qformer-tokenizer", help="InstructBLIP: the Q-Former's tokenizer.json (default: the "
                                                    "checkpoint's qformer_tokenizer.json, else DATA's)")
    parser.add_argument("--out", default="out/eval", help="directory for predictions and metrics")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    parser.add_argument("--prompt-style", choices=list(PROMPT_STYLES), help="default: the model config's, else llava15")
    parser.add_argument("--template", choices=list(TEMPLATES),
                        help="conversation template (default: the model config's, else the style's)")
    parser.add_argument("--describe-first", action="store_true", help="Lynx plug-and-play: describe the image, then answer")
    parser.add_argument("--visualize", type=int, default=0, metavar="N", help="REC: draw N samples' boxes to PNGs")
    parser.add_argument("--blind", action="store_true", help="replace every image by zeros (the no-vision baseline)")
    parser.add_argument("--circular", action="store_true",
                        help="mc / mc-rank: ask every rotation of the options; a question is right only if all are")
    parser.add_argument("--tags", help="LION: a tags file (image file name -> tags) for the tag sentence")
    parser.add_argument("--tag-noise", type=float, default=0.0, help="LION: drop / swap this fraction of the tags")
    parser.add_argument("--refiner", help="Lyrics: the visual refiner's directory (refiner.py)")
    parser.add_argument("--blank-refiner", action="store_true", help="Lyrics: every image without objects (w/o VR)")
    parser.add_argument("--oracle-text", help="an objects file (the shapes world's tags.json): each image replaced "
                                              "by its scene as text (the oracle rung)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_decoding_arguments(parser)
    args = parser.parse_args(argv)

    checkpoint_tokenizer = Path(args.ckpt) / "tokenizer.json"
    tokenizer = load_tokenizer(str(args.tokenizer or (checkpoint_tokenizer if checkpoint_tokenizer.is_file()
                                                      else Path(args.data) / "tokenizer.json")))
    if args.task == CLASSIFICATION_TASK:
        if not args.split:
            raise SystemExit(f"--task {CLASSIFICATION_TASK} needs --split (a task file DATA/eval/{CLASSIFICATION_TASK}/SPLIT.json)")
        return run_zero_shot_classification(CLIPModel.from_pretrained(args.ckpt).to(args.device), tokenizer,
                                            args.data, args.split, args.annotation_dir, args.image_dir,
                                            batch_size=args.batch_size, out_dir=args.out)
    model = MLLM.from_pretrained(args.ckpt).to(args.device)
    qformer_tokenizer = None
    if model.multi_modal_projector.takes_instruction:
        own = Path(args.ckpt) / "qformer_tokenizer.json"
        qformer_tokenizer = load_tokenizer(str(args.qformer_tokenizer or (
            own if own.is_file() else Path(args.data) / "qformer_tokenizer.json")))
    options = decoding_options(args)
    return run_eval(model, tokenizer, args.task, args.data, args.split, batch_size=args.batch_size, limit=args.limit,
                    out_dir=args.out, prompt_style=args.prompt_style, template=args.template,
                    annotation_dir=args.annotation_dir, image_dir=args.image_dir, image_template=args.image_template,
                    describe_first=args.describe_first, visualize=args.visualize, blind=args.blind,
                    stop_strings=args.stop, circular=args.circular, qformer_tokenizer=qformer_tokenizer,
                    tags=args.tags, tag_noise=args.tag_noise, refiner=args.refiner, blank_refiner=args.blank_refiner,
                    oracle_text=args.oracle_text,
                    **options)


if __name__ == "__main__":
    main()
