"""The shapes world: a synthetic, seed-deterministic stand-in for the public datasets, small
enough that the miniature LLaVA-1.5 recipe learns to see on a laptop CPU in minutes.

Images are pale backgrounds (plain, striped or speckled) with 1-6 shapes, each a shape x color x
size with a known pixel box, placed anywhere (layout "free") or each centred in a cell of a
4 x 4 grid (layout "grid", sample_grid_scene). From the same scenes every annotation file is
written in the SAME format as the public dataset it stands in for, so one set of loaders and eval
tasks serves both:

- train/pretrain.json: LLaVA instruction JSON (Steerable Visual Intelligence, the LLaVA dissertation, section 3.4, stage 1;
  LLaVA-1.5's LCS-558K): stage-1 short captions, prompts from LLaVA's brief-caption list. Each
  record also grounds its objects' phrases in pixel boxes ("regions", as GRIT's grounded captions)
  for the tiny CLIP's region-phrase loss.
- train/instruct.json: LLaVA instruction JSON, a miniature of LLaVA-1.5's 665K mixture (section 4.3,
  Table 4.1: response-format prompts): short-answer VQA with the response-format prompt,
  multi-turn conversations, detailed descriptions, captions, REC and REG (box text normalized to
  the padded square, as LLaVA-1.5's RefCOCO / VG data), multiple choice with the letter prompt,
  and text-only samples (ShareGPT's role). Exact strings: LLaVA-1.5's (dissertation section 4.3, Table 4.1).
- train/instruct_no_format_prompts.json: the same mixture without the response-format prompts,
  for the original-LLaVA ablation (configs/shapes_llava.py).
- train/text.jsonl: {"text": ...} documents for pretraining the tiny LLaMA as a language model.
- eval/refcoco: the refer toolkit's `refs(unc).p` (pickle protocol 2) + COCO `instances.json` (Yu
  et al. 2016, Lin et al. 2014; polygon segmentations tracing the pixels each shape is drawn
  with, including any a later shape covers, so getMask and annToMask work), splits val / testA / testB, plus a jsonl form with pixel boxes.
- eval/vqa: VQAv2 questions + annotations JSON with 10 human-like answers (Goyal et al. 2017).
- eval/captions: the Karpathy-split JSON with 5 reference sentences per image.
- eval/pope: POPE (Li et al. 2023) "Is there a {object} in the image?" with random, popular and
  adversarial negatives; eval/mc: multiple choice jsonl (ScienceQA-IMG / MMBench style).
- eval/classification/{small,large}.json: zero-shot shape classification of one-object images
  (classes, prompt templates, labeled images; REACT's task transfer, dissertation section 2.4).
- tags.json: per image file name, its tags and object boxes, the ground-truth stand-ins for LION's
  RAM tags and Lyrics' visual refiner (LION section 3.2; Lyrics section 3.1), and each box as the
  REC answers write it, for the oracle that reads the scene as text (conversation.read_oracle_objects).
- train/instruct.json's grounding samples carry "task_level": "region" (LION's router, sec. 3.1.2).
- tokenizer.json: a byte-level BPE trained with `tokenizers` on the world's text, digits split.
- qformer_tokenizer.json: the Q-Former's own, a BERT-style WordPiece with "[DEC]" (BLIP-2 / InstructBLIP).

Every image lives in images/{image_id:012d}.png (train ids 1..N, eval ids after them); every
"image" / "file_name" field in the annotations is that file name, relative to images/. Box text is
normalized xyxy relative to LLaVA-1.5's padded square, in the world's box_style: "lion" (the
default), 3 decimals, "[0.525,0.000,0.675,0.394]", or "llava15", "[0.53, 0.0, 0.68, 0.39]".
world.json, written last, records the generation arguments: a build with the same arguments (and
the same shapes.py and data.py box helpers, `generator_sha256`) returns at once, any other
regenerates. Same seed, same bytes (given the same numpy / pillow / tokenizers versions).

    python shapes.py --out data/shapes --seed 0          # the default world (cached)
    python shapes.py --out /tmp/shapes_small --small     # the CI smoke world
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import pickle
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data import BOX_STYLES, REC_PROMPT, format_box
from vision import padded_square, padded_square_box

DEFAULT_WORLD_DIR = Path("data/shapes")
# Sized so the whole miniature recipe fits a 2-core CPU in about 20 minutes.
DEFAULT_SIZES = {"num_train_images": 6000, "num_eval_images": 300}
SMALL_WORLD = {"num_train_images": 40, "num_eval_images": 12}  # the CI smoke world
DEFAULT_IMAGE_SIZE = 96
MARKER_FILE = "world.json"
# Everything build_world writes; a stale world is removed entry by entry, never the whole folder.
WORLD_ENTRIES = ("images", "train", "eval", "tags.json", "tokenizer.json", "qformer_tokenizer.json", MARKER_FILE)

# ---------------------------------------------------------------------------------------------
# The world's vocabulary
# ---------------------------------------------------------------------------------------------
# Sampling weights are mildly skewed so that POPE's "popular" negatives (the most frequent
# objects of the dataset) really are more frequent, as COCO's are.
SHAPE_WEIGHTS = {"circle": 0.26, "square": 0.23, "triangle": 0.2, "star": 0.17, "diamond": 0.14}
SHAPES = tuple(SHAPE_WEIGHTS)
SHAPE_CUMULATIVE_WEIGHTS = np.cumsum(list(SHAPE_WEIGHTS.values()))
# Saturated colors about 60 degrees of hue apart plus black: each has a channel <= 60, so none can
# be confused with a background, whose channels are all >= 190.
COLOR_RGB = {
    "red": (220, 30, 30), "yellow": (235, 200, 0), "green": (30, 160, 40), "cyan": (0, 185, 200),
    "blue": (30, 60, 220), "purple": (140, 40, 180), "black": (25, 25, 25),
}
COLOR_WEIGHTS = {"red": 0.2, "blue": 0.18, "green": 0.16, "yellow": 0.14, "black": 0.12,
                 "purple": 0.1, "cyan": 0.1}
COLORS = tuple(COLOR_RGB)
COLOR_CUMULATIVE_WEIGHTS = np.cumsum([COLOR_WEIGHTS[color] for color in COLORS])
# Side of an object's square box as a fraction of the image's longer side: the tiny ViT sees the
# padded square at 64 px, where small objects span about 11-13 px and large ones 20-24 px.
SIZE_FRACTIONS = {"small": (0.17, 0.21), "large": (0.32, 0.38)}
SIZES = tuple(SIZE_FRACTIONS)
BACKGROUNDS = ("plain", "striped", "speckled")
MAX_OBJECTS = 6
# Two boxes may share at most this fraction of the smaller box: stricter than an IoU bound,
# because a small shape inside a large box has a low IoU yet would be hidden.
MAX_OVERLAP = 0.1
# The grid layout: a 4 x 4 grid of cells, each object centred in its own cell, a large one nearly
# filling it and a small one half its side. At the default 96 px a cell is 24 px, which the 64 px
# tower sees as 16 px: one patch of a patch-16 tower, so that an object is exactly one image token.
GRID_CELLS = 4
GRID_SIDES = {"small": 0.5, "large": 0.9}
LAYOUTS = ("free", "grid")
PLACEMENT_ATTEMPTS = 100
NON_SQUARE_SHARE = 0.25
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ---------------------------------------------------------------------------------------------
# Fixed strings: prompts of the LLaVA / LLaVA-1.5 data and the conversation templates
# ---------------------------------------------------------------------------------------------
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "\nAnswer with the option's letter from the given choices directly."
REG_PROMPT = "Please provide a short description for this region: "
# LLaVA's brief-caption instructions (LCS-558K); the last one is lmms-eval's COCO caption prompt,
# so the stage-2 model has seen the request the caption benchmark makes.
CAPTION_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.", "Render a clear and concise summary of the photo.",
    "Provide a one-sentence caption for the provided image.",
)
# LLaVA's detailed-description instructions (detail_23k).
DETAIL_PROMPTS = (
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.", "Walk through the important details of the image.",
    "Describe the image in detail.",  # eval.py's prompt for Lynx's describe-first step
)
# The templates' fixed text (vicuna_v1 and LLaVA-1.5's response-format prompts), so the tokenizer learns them as few tokens.
TEMPLATE_STRINGS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: ###Human: ###Assistant: Human: Assistant: User: Bot:",
)
# ids 0-4. </s> is deliberately NOT id 2: a CLIP text config with eos_token_id 2 means "pool at the
# highest token id" in transformers (the legacy rule kept for openai/clip-vit-*), which would pool
# the tiny CLIP of stage 0a at a random word instead of at its EOS (vision.TextTransformer.eos_positions).
SPECIAL_TOKENS = ("<unk>", "<s>", "<pad>", "</s>", "<image>")
# The token LION's soft prompt replaces (Flan-T5's "<extra_id_0>"), added after the trained
# vocabulary so that it shifts no other id.
HINT_TOKEN = "<extra_id_0>"
TOKENIZER_VOCAB_SIZE = 2048
TOKENIZER_IMAGES = 1000


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # pixels x0, y0, x1, y1; the shape fills pixels x0..x1-1

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def category(self) -> str:
        """The POPE object: color and shape ("red circle"); size is relative, not an object."""
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    seed: int
    split: str   # "train" or "eval"
    index: int   # position within the split; with seed and split it seeds all of this image's randomness
    image_id: int
    width: int
    height: int
    background: str
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    stripe_width: int
    stripe_direction: str  # "horizontal", "vertical" or "diagonal"
    noise_seed: int
    objects: tuple[ShapeObject, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.png"

    def objects_left_to_right(self) -> list[ShapeObject]:
        """Captions and descriptions list objects in reading order, which makes them learnable."""
        return sorted(self.objects, key=lambda obj: (obj.center[0], obj.center[1]))


# Each image has one random stream per purpose, seeded by (seed, split, index, purpose): a file's
# content depends only on its own images, not on the order in which files are written, and the eval
# images do not change when num_train_images does (results stay comparable across train sizes).
SPLITS = ("train", "eval")
RANDOM_PURPOSES = ("image", "train", "refcoco", "vqa", "pope", "multiple_choice", "text_only", "classification")


def random_stream(seed: int, split: str, index: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index, RANDOM_PURPOSES.index(purpose)])


def annotation_rng(scene: Scene, purpose: str) -> np.random.Generator:
    return random_stream(scene.seed, scene.split, scene.index, purpose)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_overlaps(candidates: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(C, 4) x (B, 4) xyxy boxes -> (C, B) intersection area over the smaller box's area."""
    low = np.maximum(candidates[:, None, :2], boxes[None, :, :2])
    high = np.minimum(candidates[:, None, 2:], boxes[None, :, 2:])
    intersection = np.clip(high - low, 0, None).prod(axis=-1)
    return intersection / np.minimum(box_areas(candidates)[:, None], box_areas(boxes)[None, :])


def weighted_pick(rng: np.random.Generator, names: tuple[str, ...], cumulative_weights: np.ndarray) -> str:
    """One name drawn with probability proportional to its weight (rng.choice(p=...) is ~10x slower)."""
    return names[int(np.searchsorted(cumulative_weights, rng.random() * cumulative_weights[-1], side="right"))]


def draw_background(rng: np.random.Generator) -> tuple:
    """(background, its two pale colors, stripe width, stripe direction, noise seed)."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pale_colors = tuple(tuple(int(c) for c in rng.integers(205, 251, size=3)) for _ in range(2))
    stripe_width = int(rng.integers(3, 7))
    stripe_direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
    return background, pale_colors, stripe_width, stripe_direction, int(rng.integers(2**31))


def draw_attributes(rng: np.random.Generator, objects: list[ShapeObject]) -> tuple[str, str, str]:
    """(shape, color, size) of a new object. No two objects share all three, so "the small red
    circle" is always unique."""
    while True:
        attributes = (weighted_pick(rng, SHAPES, SHAPE_CUMULATIVE_WEIGHTS),
                      weighted_pick(rng, COLORS, COLOR_CUMULATIVE_WEIGHTS), SIZES[int(rng.integers(len(SIZES)))])
        if all((o.shape, o.color, o.size) != attributes for o in objects):
            return attributes


def sample_grid_scene(seed: int, split: str, index: int, image_id: int, image_size: int) -> Scene:
    """A scene of the grid layout: GRID_CELLS x GRID_CELLS cells of image_size / GRID_CELLS px
    (NON_SQUARE_SHARE of the images keep half the rows or columns, so that LLaVA-1.5's padding to a
    square adds whole cells), 1-6 objects each centred in a cell of its own."""
    rng = random_stream(seed, split, index, "image")
    cell = image_size // GRID_CELLS
    rows = columns = GRID_CELLS
    if rng.random() < NON_SQUARE_SHARE:
        rows, columns = (GRID_CELLS // 2, GRID_CELLS) if rng.random() < 0.5 else (GRID_CELLS, GRID_CELLS // 2)
    style = draw_background(rng)
    objects: list[ShapeObject] = []
    cells = rng.permutation(rows * columns)[:int(rng.integers(1, MAX_OBJECTS + 1))].tolist()
    for position in cells:
        attributes = draw_attributes(rng, objects)
        side = round(GRID_SIDES[attributes[2]] * cell)
        x0 = (position % columns) * cell + (cell - side) // 2
        y0 = (position // columns) * cell + (cell - side) // 2
        objects.append(ShapeObject(*attributes, box=(x0, y0, x0 + side, y0 + side)))
    return Scene(seed, split, index, image_id, columns * cell, rows * cell, *style, tuple(objects))


def sample_scene(seed: int, split: str, index: int, image_id: int, image_size: int,
                 object_scale: float = 1.0, layout: str = "free") -> Scene:
    """Draw a scene: canvas size, background, then objects placed by rejection sampling (layout
    "free"), or on a grid (sample_grid_scene).

    image_size is the longer side; the shorter side of a square image is uniform in
    [2/3 * image_size, image_size], and NON_SQUARE_SHARE of the images are image_size x 2/3 of it
    (either orientation) so that LLaVA-1.5's pad-to-square path is exercised. object_scale shrinks
    every object's side (SIZE_FRACTIONS of the long side) by that factor: at 192 px and 0.5 the
    objects have the pixel sizes of the 96 px world on a canvas twice as wide, the high-resolution
    miniature's world.
    """
    if layout == "grid":
        return sample_grid_scene(seed, split, index, image_id, image_size)
    rng = random_stream(seed, split, index, "image")
    short_side = round(image_size * 2 / 3)
    if rng.random() < NON_SQUARE_SHARE:
        width, height = (image_size, short_side) if rng.random() < 0.5 else (short_side, image_size)
    else:
        width = height = int(rng.integers(short_side, image_size + 1))
    long_side = max(width, height)
    style = draw_background(rng)
    objects: list[ShapeObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        attributes = draw_attributes(rng, objects)
        low, high = SIZE_FRACTIONS[attributes[2]]
        side = int(round(rng.uniform(low, high) * object_scale * long_side))
        corners = np.stack([rng.integers(0, width - side + 1, PLACEMENT_ATTEMPTS),
                            rng.integers(0, height - side + 1, PLACEMENT_ATTEMPTS)], axis=1)
        candidates = np.concatenate([corners, corners + side], axis=1)
        free = np.ones(PLACEMENT_ATTEMPTS, dtype=bool)
        if objects:
            free = (box_overlaps(candidates, np.array([o.box for o in objects])) <= MAX_OVERLAP).all(axis=1)
        # The first free candidate; an object that finds no free place is dropped, so crowded
        # scenes of large objects end up with fewer objects.
        if free.any():
            objects.append(ShapeObject(*attributes, box=tuple(int(v) for v in candidates[np.argmax(free)])))
    return Scene(seed, split, index, image_id, width, height, *style, tuple(objects))


def shape_outline(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Polygon vertices of a triangle, diamond or star stretched to fill the box exactly, so the
    annotated box is the tight box of the drawn pixels."""
    if shape == "triangle":
        unit = [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    elif shape == "diamond":
        unit = [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    elif shape == "star":
        # Five points, inner radius 0.45 of the outer: fat enough to stay a star at 11 px.
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        xs, ys = radii * np.cos(angles), radii * np.sin(angles)
        xs, ys = (xs - xs.min()) / np.ptp(xs), (ys - ys.min()) / np.ptp(ys)
        unit = list(zip(xs.tolist(), ys.tolist()))
    else:
        raise ValueError(f"shape {shape!r} is not a polygon shape")
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - 1 - x0), y0 + v * (y1 - 1 - y0)) for u, v in unit]


def render_scene(scene: Scene) -> Image.Image:
    height, width = scene.height, scene.width
    first, second = (np.array(c, dtype=np.int16) for c in scene.background_colors)
    if scene.background == "plain":
        pixels = np.broadcast_to(first, (height, width, 3)).copy()
    elif scene.background == "striped":
        ys, xs = np.mgrid[0:height, 0:width]
        coordinate = {"horizontal": ys, "vertical": xs, "diagonal": xs + ys}[scene.stripe_direction]
        pixels = np.where(((coordinate // scene.stripe_width) % 2 == 0)[..., None], first, second)
    else:
        noise = np.random.default_rng(scene.noise_seed).integers(-12, 13, size=(height, width, 3))
        pixels = first + noise
    image = Image.fromarray(np.clip(pixels, 190, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_shape(draw, obj, COLOR_RGB[obj.color])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: int | tuple[int, int, int]) -> None:
    """The one place a shape's pixels are decided: render_scene paints them and shape_mask reads
    them back for the segmentation, so the two can never disagree."""
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon(shape_outline(obj.shape, obj.box), fill=fill)


def shape_mask(obj: ShapeObject) -> np.ndarray:
    """(height, width) bool mask over obj.box of the pixels draw_shape paints: the whole shape,
    also where a later shape covers part of it, as its box is (every drawn pixel lies in the box)."""
    x0, y0, x1, y1 = obj.box
    canvas = Image.new("L", (x1, y1))
    draw_shape(ImageDraw.Draw(canvas), obj, 255)
    return np.asarray(canvas)[y0:y1, x0:x1] > 0


def mask_polygons(mask: np.ndarray, left: int, top: int) -> list[list[float]]:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] in image pixel coordinates (pixel (x, y) is the
    square [x, x+1] x [y, y+1], as pycocotools rasterizes) whose union is exactly the mask's pixels;
    (left, top) is the image position of mask[0, 0].

    The boundary is traced along pixel edges rather than written from shape_outline: at 11-20 px
    PIL's rasterization departs from the outline it is given (a small star's pixels exceed its
    outline's area by up to a fifth, and pycocotools' mask of that outline overlaps them at IoU 0.7),
    whereas the traced polygons give back the drawn pixels exactly through the refer toolkit's
    getMask and pycocotools' annToMask. One polygon per 4-connected component (COCO's form for a
    split object); the world's shapes have no holes, which a COCO polygon could not express."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    # Each pixel edge between the mask and the outside, directed so the mask is on its right
    # (y points down): top edges run east, right edges south, bottom edges west, left edges north.
    edge_kinds = (((0, 0), (1, 0), padded[:-2, 1:-1]), ((1, 0), (1, 1), padded[1:-1, 2:]),
                  ((1, 1), (0, 1), padded[2:, 1:-1]), ((0, 1), (0, 0), padded[1:-1, :-2]))
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (start_x, start_y), (end_x, end_y), neighbor in edge_kinds:
        for y, x in zip(*np.nonzero(inside & ~neighbor)):
            outgoing.setdefault((int(x) + start_x, int(y) + start_y), []).append((int(x) + end_x, int(y) + end_y))

    def take(vertex: tuple[int, int], following: tuple[int, int]) -> None:
        outgoing[vertex].remove(following)
        if not outgoing[vertex]:
            del outgoing[vertex]

    polygons = []
    while outgoing:
        start = min(outgoing, key=lambda v: (v[1], v[0]))  # topmost-leftmost: on one boundary only
        first = outgoing[start][0]
        take(start, first)
        vertex, heading = first, (first[0] - start[0], first[1] - start[1])
        corners = []
        while True:
            # Right turn first: where two components touch at a corner it keeps them apart.
            dx, dy = heading
            available = outgoing.get(vertex, []) + ([first] if vertex == start else [])
            following = next(v for v in ((vertex[0] - dy, vertex[1] + dx), (vertex[0] + dx, vertex[1] + dy),
                                         (vertex[0] + dy, vertex[1] - dx)) if v in available)
            turn = (following[0] - vertex[0], following[1] - vertex[1])
            if turn != heading:
                corners.append(vertex)
            if vertex == start:
                break
            take(vertex, following)
            vertex, heading = following, turn
        polygons.append([float(value) for x, y in corners for value in (x + left, y + top)])
    return polygons


# ---------------------------------------------------------------------------------------------
# Geometry shared by the annotations
# ---------------------------------------------------------------------------------------------
def is_left_of(a: ShapeObject, b: ShapeObject) -> bool:
    """Entirely left: only clear relations are ever stated or asked about."""
    return a.box[2] <= b.box[0]


def is_above(a: ShapeObject, b: ShapeObject) -> bool:
    return a.box[3] <= b.box[1]


RELATIONS = {
    "to the left of": is_left_of,
    "to the right of": lambda a, b: is_left_of(b, a),
    "above": is_above,
    "below": lambda a, b: is_above(b, a),
}


def region_phrase(obj: ShapeObject, scene: Scene) -> str:
    """Where the object's center falls in a 3 x 3 grid: "at the top left", "in the center"..."""
    column = ("left", "center", "right")[min(2, int(3 * obj.center[0] / scene.width))]
    row = ("top", "middle", "bottom")[min(2, int(3 * obj.center[1] / scene.height))]
    if row == "middle":
        return "in the center" if column == "center" else f"on the {column}"
    return f"at the {row}" if column == "center" else f"at the {row} {column}"


# ---------------------------------------------------------------------------------------------
# Language: referring expressions, captions, descriptions, questions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expression:
    text: str                  # "the small red circle", "the circle to the left of the blue square"
    mentions: frozenset[str]   # the target's attributes the text gives away (never asked about)
    relational: bool


# Attribute-only descriptions, most natural first (anchors of relational expressions use the first
# unique one that names the shape).
ATTRIBUTE_SETS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
                  ("color",), ("size", "color"))
RELATIONAL_TARGET_SETS = ((), ("shape",), ("color", "shape"), ("size", "shape"))


def describe(obj: ShapeObject, attributes: tuple[str, ...]) -> str:
    words = [getattr(obj, a) for a in ("size", "color") if a in attributes]
    return " ".join(words + [obj.shape if "shape" in attributes else "shape"])


def attribute_values(obj: ShapeObject, attributes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(getattr(obj, a) for a in attributes)


def unique_under(objects: list[ShapeObject], attributes: tuple[str, ...]) -> list[bool]:
    """For each object: is it the only one in `objects` with its values of `attributes`?"""
    counts = Counter(attribute_values(o, attributes) for o in objects)
    return [counts[attribute_values(o, attributes)] == 1 for o in objects]


@functools.lru_cache(maxsize=1024)  # every annotation of a scene asks again
def referring_expressions(scene: Scene) -> tuple[tuple[Expression, ...], ...]:
    """Every unambiguous referring expression of each object (aligned with scene.objects):
    attribute-only ones ("the small red circle", "the red shape") and relational ones ("the circle
    to the left of the blue square"), the latter valid when the relation to the anchor leaves
    exactly one object matching the target's description."""
    objects = list(scene.objects)
    attribute_only: list[list[Expression]] = [[] for _ in objects]
    for attributes in ATTRIBUTE_SETS:
        for index, unique in enumerate(unique_under(objects, attributes)):
            if unique:
                text = f"the {describe(objects[index], attributes)}"
                attribute_only[index].append(Expression(text, frozenset(attributes), relational=False))
    # The full triple is always unique (sample_scene), so every object has an anchor name.
    anchor_names = [next(e.text for e in expressions if "shape" in e.mentions) for expressions in attribute_only]
    relational: list[list[Expression]] = [[] for _ in objects]
    for anchor, anchor_name in zip(objects, anchor_names):
        for phrase, relation in RELATIONS.items():
            related = [o for o in objects if relation(o, anchor)]  # never the anchor itself
            if not related:
                continue
            for attributes in RELATIONAL_TARGET_SETS:
                for obj, unique in zip(related, unique_under(related, attributes)):
                    if unique:
                        text = f"the {describe(obj, attributes)} {phrase} {anchor_name}"
                        relational[objects.index(obj)].append(
                            Expression(text, frozenset(attributes), relational=True))
    return tuple(tuple(a + r) for a, r in zip(attribute_only, relational))


def attribute_expressions(scene: Scene, index: int) -> list[Expression]:
    return [e for e in referring_expressions(scene)[index] if not e.relational]


RELATIONAL_SHARE = 0.35


def pick_expression(rng: np.random.Generator, expressions: list[Expression] | tuple[Expression, ...]) -> Expression:
    """A relational expression RELATIONAL_SHARE of the time when there is one: an object has many
    more relational expressions than attribute-only ones, and a uniform pick would drown the
    simple forms ("the small red circle") the model learns first."""
    relational = [e for e in expressions if e.relational]
    simple = [e for e in expressions if not e.relational]
    return pick(rng, relational if relational and (not simple or rng.random() < RELATIONAL_SHARE) else simple)


def pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption_variants(scene: Scene) -> list[str]:
    """Five phrasings of the short caption (the Karpathy references); stage 1 trains on one."""
    objects = join_phrases([with_article(o.name) for o in scene.objects_left_to_right()])
    count = len(scene.objects)
    shapes_word = "shape" if count == 1 else "shapes"
    return [
        f"{objects}.",
        f"{objects} on a {scene.background} background.",
        f"{NUMBER_WORDS[count]} {shapes_word}: {objects}.",
        f"a {scene.background} background with {objects}.",
        f"an image of {objects}.",
    ]


def detailed_description(scene: Scene) -> str:
    count = len(scene.objects)
    opening = (f"There {'is one shape' if count == 1 else f'are {NUMBER_WORDS[count]} shapes'} "
               f"on a {scene.background} background.")
    sentences = [f"{capitalize(with_article(o.name))} is {region_phrase(o, scene)}."
                 for o in scene.objects_left_to_right()]
    return " ".join([opening] + sentences)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    question_type: str   # VQAv2's question_type: the question's opening words
    answer_type: str     # VQAv2's answer_type: "yes/no", "number" or "other"


def ask_attribute(rng: np.random.Generator, scene: Scene, attribute: str) -> Question | None:
    """"What color is the circle to the left of the blue square?": attribute of a referred object,
    referred to without giving the attribute away."""
    candidates = [(o, [e for e in expressions if attribute not in e.mentions])
                  for o, expressions in zip(scene.objects, referring_expressions(scene))]
    candidates = [(o, expressions) for o, expressions in candidates if expressions]
    if not candidates:
        return None
    obj, expressions = pick(rng, candidates)
    expression = pick_expression(rng, expressions)
    openings = {"color": "what color is", "shape": "what shape is", "size": "what size is"}
    return Question(f"{capitalize(openings[attribute])} {expression.text}?", getattr(obj, attribute),
                    f"{openings[attribute]} the", "other")


def ask_count(rng: np.random.Generator, scene: Scene) -> Question:
    kind = pick(rng, ("all", "shape", "color"))
    if kind == "all":
        return Question("How many shapes are there?", str(len(scene.objects)), "how many", "number")
    # Mostly ask about something present; sometimes the answer is 0, as it can be in VQAv2.
    present = rng.random() < 0.85
    if kind == "shape":
        shape = pick(rng, [o.shape for o in scene.objects]) if present else pick(rng, SHAPES)
        count = sum(o.shape == shape for o in scene.objects)
        return Question(f"How many {shape}s are there?", str(count), "how many", "number")
    color = pick(rng, [o.color for o in scene.objects]) if present else pick(rng, COLORS)
    count = sum(o.color == color for o in scene.objects)
    return Question(f"How many {color} shapes are there?", str(count), "how many", "number")


def absent_categories(scene: Scene) -> list[str]:
    present = {o.category for o in scene.objects}
    return [f"{c} {s}" for s in SHAPES for c in COLORS if f"{c} {s}" not in present]


def shares_attribute(category: str, scene: Scene) -> bool:
    color, shape = category.split()
    return any(o.color == color or o.shape == shape for o in scene.objects)


def existence_probe(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """An object category to ask about and whether it is present: present half the time; the
    absent ones are half random, half adversarial (sharing a color or a shape with a present one)."""
    if rng.random() < 0.5:
        return pick(rng, [o.category for o in scene.objects]), True
    absent = absent_categories(scene)
    adversarial = [c for c in absent if shares_attribute(c, scene)]
    return pick(rng, adversarial if adversarial and rng.random() < 0.5 else absent), False


def ask_existence(rng: np.random.Generator, scene: Scene) -> Question:
    """POPE's question, "Is there a {object} in the image?"."""
    category, present = existence_probe(rng, scene)
    return Question(f"Is there {with_article(category)} in the image?", "yes" if present else "no",
                    "is there a", "yes/no")


def ask_position(rng: np.random.Generator, scene: Scene) -> Question | None:
    """"Is the red circle to the left of the star?" (yes/no) or "Is the red circle to the left or
    to the right of the star?" (left/right), only for pairs whose relation is clear."""
    pairs = []
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i != j:
                if is_left_of(a, b) or is_left_of(b, a):
                    pairs.append((i, j, "horizontal"))
                if is_above(a, b) or is_above(b, a):
                    pairs.append((i, j, "vertical"))
    if not pairs:
        return None
    i, j, axis = pick(rng, pairs)
    a, b = scene.objects[i], scene.objects[j]
    first = pick(rng, attribute_expressions(scene, i)).text
    second = pick(rng, attribute_expressions(scene, j)).text
    if axis == "horizontal":
        holds, phrase, choice = is_left_of(a, b), "to the left of", ("left", "right")
        alternative = f"Is {first} to the left or to the right of {second}?"
    else:
        holds, phrase, choice = is_above(a, b), "above", ("above", "below")
        alternative = f"Is {first} above or below {second}?"
    if rng.random() < 0.5:
        return Question(f"Is {first} {phrase} {second}?", "yes" if holds else "no", "is the", "yes/no")
    return Question(alternative, choice[0] if holds else choice[1], "is the", "other")


QUESTION_TYPES = ("color", "shape", "size", "count", "existence", "position")


def ask(rng: np.random.Generator, scene: Scene, question_type: str) -> Question | None:
    if question_type in ("color", "shape", "size"):
        return ask_attribute(rng, scene, question_type)
    if question_type == "count":
        return ask_count(rng, scene)
    if question_type == "existence":
        return ask_existence(rng, scene)
    return ask_position(rng, scene)


def ask_several(rng: np.random.Generator, scene: Scene, number: int) -> list[Question]:
    """Up to `number` distinct questions of distinct types, in random type order."""
    questions: list[Question] = []
    for question_type in rng.permutation(QUESTION_TYPES).tolist():
        question = ask(rng, scene, question_type)
        if question is not None and question.text not in {q.text for q in questions}:
            questions.append(question)
        if len(questions) == number:
            break
    return questions


def multiple_choice(rng: np.random.Generator, scene: Scene) -> tuple[str, list[str], int]:
    """(question, four choices, index of the answer): the color or shape of a referred object, or
    the number of shapes, with three distractors from the same vocabulary."""
    kind = pick(rng, ("color", "shape", "count"))
    attribute_question = None if kind == "count" else ask_attribute(rng, scene, kind)
    if attribute_question is None:  # also when no expression can avoid naming the attribute
        question, answer = "How many shapes are there?", str(len(scene.objects))
        vocabulary = [str(n) for n in range(1, MAX_OBJECTS + 1)]
    else:
        question, answer = attribute_question.text, attribute_question.answer
        vocabulary = list(COLORS if kind == "color" else SHAPES)
    distractors = rng.permutation([v for v in vocabulary if v != answer])[:3].tolist()
    choices = [([answer] + distractors)[i] for i in rng.permutation(4).tolist()]
    return question, choices, choices.index(answer)


def multiple_choice_prompt(question: str, choices: list[str]) -> str:
    """LLaVA-1.5's multiple-choice prompt (its ScienceQA / MMBench format)."""
    letters = "ABCDEFGH"
    options = "\n".join(f"{letters[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n{options}{MULTIPLE_CHOICE_PROMPT}"


# ---------------------------------------------------------------------------------------------
# Training annotations (LLaVA instruction JSON)
# ---------------------------------------------------------------------------------------------
def turns(pairs: list[tuple[str, str]]) -> list[dict]:
    """LLaVA conversations; the image goes first in the first human turn, as in LLaVA-1.5 data."""
    conversation = []
    for index, (question, answer) in enumerate(pairs):
        conversation.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def short_answer_pairs(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str]]:
    """LLaVA-1.5's VQAv2 / GQA entries: several questions per image, each with the prompt."""
    return [(q.text + SHORT_ANSWER_PROMPT, q.answer) for q in ask_several(rng, scene, int(rng.integers(2, 5)))]


def grounding_pairs(rng: np.random.Generator, scene: Scene, box_style: str) -> list[tuple[str, str]]:
    """LLaVA-1.5's RefCOCO / Visual Genome entries: REC (expression -> box) and REG (box -> short
    description) turns over several objects of one image, boxes written in box_style (data.format_box)."""
    pairs = []
    objects = rng.permutation(len(scene.objects)).tolist()[:int(rng.integers(2, 5))]
    for index in objects:
        obj = scene.objects[index]
        box = format_box(padded_square_box(obj.box, scene.width, scene.height), style=box_style)
        if rng.random() < 0.65:
            expression = pick_expression(rng, referring_expressions(scene)[index])
            pairs.append((REC_PROMPT + expression.text, box))
        else:
            pairs.append((REG_PROMPT + box, obj.name))
    return pairs


def conversation_pairs(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str]]:
    """LLaVA-Instruct-style conversation: full-sentence answers over several turns."""
    count = len(scene.objects)
    shape_counts = Counter(o.shape for o in scene.objects_left_to_right())  # keeps reading order
    inventory = join_phrases([with_article(shape) if number == 1 else f"{NUMBER_WORDS[number]} {shape}s"
                              for shape, number in shape_counts.items()])
    options = [
        ("What shapes are in the image?", f"The image contains {inventory}."),
        ("How many shapes are there?",
         "There is one shape." if count == 1 else f"There are {NUMBER_WORDS[count]} shapes."),
        ("What is the background like?", f"The background is {scene.background}."),
    ]
    for obj, expressions in zip(scene.objects, referring_expressions(scene)):
        expression = pick_expression(rng, expressions)
        subject = capitalize(expression.text)
        options.append((f"Where is {expression.text}?", f"{subject} is {region_phrase(obj, scene)} of the image."))
        if "color" not in expression.mentions:
            options.append((f"What color is {expression.text}?", f"{subject} is {obj.color}."))
        if "size" not in expression.mentions:
            options.append((f"Is {expression.text} small or large?", f"{subject} is {obj.size}."))
    category, present = existence_probe(rng, scene)
    options.append((f"Is there {with_article(category)} in the image?",
                    f"Yes, there is {with_article(category)} in the image." if present
                    else f"No, there is no {category} in the image."))
    chosen = rng.permutation(len(options)).tolist()[:int(rng.integers(2, 5))]
    return [options[i] for i in chosen]


def text_only_sample(rng: np.random.Generator, index: int) -> dict:
    """Plain-language facts about the world's vocabulary, no image (the role of ShareGPT in
    LLaVA-1.5's mixture: keep the LLM answering text-only requests)."""
    corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners",
               "star": "ten corners", "diamond": "four corners"}
    kind = pick(rng, ("corners", "count", "list"))
    if kind == "corners":
        shape = pick(rng, SHAPES)
        pair = (f"How many corners does {with_article(shape)} have?",
                f"{capitalize(with_article(shape))} has {corners[shape]}.")
    elif kind == "count":
        number = int(rng.integers(0, 9))
        pair = (f"What number comes after {number}?", f"{number + 1} comes after {number}.")
    else:
        pair = ("Name the colors of the shapes in this world.", f"The colors are {join_phrases(list(COLORS))}.")
    return {"id": f"text_{index:06d}", "conversations": [{"from": "human", "value": pair[0]},
                                                          {"from": "gpt", "value": pair[1]}]}


def instruct_samples(rng: np.random.Generator, scene: Scene, box_style: str, existence_turns: int = 0) -> list[dict]:
    """Three samples per image: short-answer VQA, grounding (boxes in box_style), and one of
    conversation / detailed description / caption / multiple choice; with `existence_turns`, a
    fourth of that many short-answer existence questions (present half the time), so that the
    questions that need a search of the image outnumber the images."""
    prefix = f"{scene.image_id:012d}"
    kind = pick(rng, ("conversation", "detail", "caption", "multiple_choice"))
    if kind == "conversation":
        third = conversation_pairs(rng, scene)
    elif kind == "detail":
        third = [(pick(rng, DETAIL_PROMPTS), detailed_description(scene))]
    elif kind == "caption":
        third = [(pick(rng, CAPTION_PROMPTS), capitalize(pick(rng, caption_variants(scene))))]
    else:
        question, choices, answer = multiple_choice(rng, scene)
        third = [(multiple_choice_prompt(question, choices), "ABCDEFGH"[answer])]
    samples = [("vqa", short_answer_pairs(rng, scene)), ("grounding", grounding_pairs(rng, scene, box_style)),
               (kind, third)]
    questions = [ask_existence(rng, scene) for _ in range(existence_turns)]  # drawn last: the rest stays as it was
    if questions:
        samples.append(("existence", [(q.text + SHORT_ANSWER_PROMPT, q.answer) for q in questions]))
    # LION's task levels (sec. 3.1.2): REC / REG are region-level, the rest image-level (the default).
    return [{"id": f"{prefix}_{name}", "image": scene.file_name, "conversations": turns(pairs),
             **({"task_level": "region"} if name == "grounding" else {})} for name, pairs in samples]


def text_document(rng: np.random.Generator, scene: Scene) -> str:
    """One language-model document per training image: caption, description and Q/A sentences."""
    answers = [f"{question} {answer}" for question, answer in conversation_pairs(rng, scene)]
    return " ".join([capitalize(pick(rng, caption_variants(scene))), detailed_description(scene)] + answers)


# ---------------------------------------------------------------------------------------------
# Evaluation annotations (the public benchmarks' formats)
# ---------------------------------------------------------------------------------------------
ANSWER_VARIANTS = {
    "small": ("little", "tiny"), "large": ("big",),
    "left": ("on the left", "left side"), "right": ("on the right", "right side"),
    "above": ("on top", "higher"), "below": ("under", "lower"),
}


def human_answers(rng: np.random.Generator, question: Question) -> list[str]:
    """Ten answers as ten annotators give them: mostly the canonical form, some variants ("two" for
    "2", "a circle", "big"), rarely a mistake, so VQA accuracy's min(1, matches / 3) is exercised."""
    answers = []
    for _ in range(10):
        draw = rng.random()
        answer = question.answer
        if draw < 0.05:
            if question.answer_type == "number":
                answer = str(max(0, int(answer) + pick(rng, (-1, 1))))
            elif question.answer_type == "yes/no":
                answer = "no" if answer == "yes" else "yes"
        elif draw < 0.25:
            if question.answer_type == "number":
                answer = NUMBER_WORDS[int(answer)]
            elif answer in SHAPES:
                answer = with_article(answer)
            elif answer in ANSWER_VARIANTS:
                answer = pick(rng, ANSWER_VARIANTS[answer])
        answers.append(answer)
    return answers


def vqa_files(scenes: list[Scene], per_image: int) -> tuple[dict, dict]:
    """VQAv2 questions and annotations (question_id = image_id * 1000 + k, as VQAv2 numbers them)."""
    questions, annotations = [], []
    for scene in scenes:
        rng = annotation_rng(scene, "vqa")
        for k, question in enumerate(ask_several(rng, scene, per_image)):
            question_id = scene.image_id * 1000 + k
            answers = human_answers(rng, question)
            questions.append({"image_id": scene.image_id, "question": question.text, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": scene.image_id,
                "question_type": question.question_type, "answer_type": question.answer_type,
                "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)],
            })
    header = {"info": {"description": "shapes world, VQAv2 format"}, "license": {"name": "synthetic"},
              "data_subtype": "shapes"}
    return ({**header, "task_type": "Open-Ended", "data_type": "shapes", "questions": questions},
            {**header, "data_type": "shapes", "annotations": annotations})


# COCO's header keys (pycocotools' COCO.info() reads "info"). Fixed values, not today's date: the
# same seed must write the same bytes.
COCO_INFO = {"description": "nanoMLLM shapes world: synthetic scenes of colored shapes (shapes.py)",
             "url": "", "version": "1.0", "year": 2024, "contributor": "nanoMLLM shapes.py",
             "date_created": "2024/01/01"}
COCO_LICENSES = [{"id": 1, "name": "Synthetic data generated by shapes.py, no third-party content", "url": ""}]


def refcoco_split(position: int) -> str:
    """Eval images are dealt round-robin to RefCOCO's three splits (each image in exactly one, as
    in the refer toolkit); the Karpathy captions reuse "val" and call the rest "test"."""
    return ("val", "testA", "testB")[position % 3]


def refcoco_files(scenes: list[Scene]) -> tuple[list[dict], dict, dict[str, list[dict]]]:
    """(refs pickle list, COCO instances dict, jsonl rows per split). Every object of every eval
    image is a ref with up to two sentences: an attribute-only and a relational expression."""
    refs, images, annotations, jsonl = [], [], [], {"val": [], "testA": [], "testB": []}
    sentence_count = 0
    category_ids = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    for position, scene in enumerate(scenes):
        rng = annotation_rng(scene, "refcoco")
        split = refcoco_split(position)
        images.append({"id": scene.image_id, "file_name": scene.file_name, "width": scene.width,
                       "height": scene.height, "license": COCO_LICENSES[0]["id"]})
        for index, obj in enumerate(scene.objects):
            annotation_id = len(annotations) + 1
            x0, y0, x1, y1 = obj.box
            mask = shape_mask(obj)
            # COCO's area is the segmentation's: the traced polygons' area, their pixel count.
            annotations.append({"id": annotation_id, "image_id": scene.image_id,
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "category_id": category_ids[obj.shape], "area": float(mask.sum()),
                                "iscrowd": 0, "segmentation": mask_polygons(mask, x0, y0)})
            chosen = [pick(rng, attribute_expressions(scene, index))]
            relational = [e for e in referring_expressions(scene)[index] if e.relational]
            if relational:
                chosen.append(pick(rng, relational))
            sentences = []
            for expression in chosen:
                sentences.append({"tokens": expression.text.split(), "raw": expression.text,
                                  "sent_id": sentence_count, "sent": expression.text})
                sentence_count += 1
                jsonl[split].append({"image": scene.file_name, "expression": expression.text,
                                     "bbox": list(obj.box), "width": scene.width, "height": scene.height})
            refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name": scene.file_name,
                         "ann_id": annotation_id, "ref_id": len(refs), "image_id": scene.image_id,
                         "split": split, "sentences": sentences, "category_id": category_ids[obj.shape]})
    categories = [{"id": i, "name": shape, "supercategory": "shape"} for shape, i in category_ids.items()]
    instances = {"info": COCO_INFO, "licenses": COCO_LICENSES, "images": images, "annotations": annotations,
                 "categories": categories}
    return refs, instances, jsonl


def karpathy_captions(scenes: list[Scene]) -> dict:
    images = []
    for position, scene in enumerate(scenes):
        sentences = [{"tokens": text.lower().rstrip(".").replace(":", "").replace(",", "").split(), "raw": text,
                      "imgid": position, "sentid": position * 5 + k}
                     for k, text in enumerate(capitalize(t) for t in caption_variants(scene))]
        images.append({"filepath": "", "filename": scene.file_name, "imgid": position,
                       "split": "val" if refcoco_split(position) == "val" else "test",
                       "sentids": [s["sentid"] for s in sentences], "cocoid": scene.image_id,
                       "sentences": sentences})
    return {"images": images, "dataset": "shapes"}


def pope_files(scenes: list[Scene], train_scenes: list[Scene]) -> dict[str, list[dict]]:
    """POPE (Li et al. 2023, section 4.1): images with >= 3 ground-truth objects, 3 present objects
    ("yes") and 3 absent ones ("no") each. Negatives: random = uniform among absent objects;
    popular = the most frequent objects of the (training) dataset; adversarial = the objects that
    co-occur most with the image's objects, restricted here to those sharing a color or shape
    with one of them, since co-occurrence alone is uniform in a synthetic world."""
    frequency = Counter(category for s in train_scenes for category in {o.category for o in s.objects})
    co_occurrence: Counter = Counter()
    for s in train_scenes:
        categories = sorted({o.category for o in s.objects})
        co_occurrence.update((a, b) for a in categories for b in categories if a != b)
    splits: dict[str, list[dict]] = {"random": [], "popular": [], "adversarial": []}
    for scene in scenes:
        present = sorted({o.category for o in scene.objects})
        if len(present) < 3:
            continue
        rng = annotation_rng(scene, "pope")
        positives = rng.permutation(present)[:3].tolist()
        absent = absent_categories(scene)
        popular = sorted(absent, key=lambda c: (-frequency[c], c))
        adversarial = sorted((c for c in absent if shares_attribute(c, scene)),
                             key=lambda c: (-sum(co_occurrence[(p, c)] for p in present), c))
        negatives = {"random": rng.permutation(absent)[:3].tolist(), "popular": popular[:3],
                     "adversarial": (adversarial + [c for c in popular if c not in adversarial])[:3]}
        for split, rows in splits.items():
            for category, label in [(c, "yes") for c in positives] + [(c, "no") for c in negatives[split]]:
                rows.append({"question_id": len(rows) + 1, "image": scene.file_name,
                             "text": f"Is there {with_article(category)} in the image?", "label": label})
    return splits


def multiple_choice_rows(scenes: list[Scene]) -> list[dict]:
    rows = []
    for scene in scenes:
        question, choices, answer = multiple_choice(annotation_rng(scene, "multiple_choice"), scene)
        rows.append({"question_id": len(rows) + 1, "image": scene.file_name, "question": question,
                     "choices": choices, "answer": answer})
    return rows


# Zero-shot shape classification (REACT's task transfer, dissertation section 2.4) of a single
# object: the target domain, small objects, which the generic CLIP reads worst, and the general one.
CLASSIFICATION_TEMPLATES = {size: [f"a {size} {{}}.", f"an image of a {size} {{}}.", f"one shape: a {size} {{}}."]
                            for size in SIZES}
CLASSIFICATION_FIRST_INDEX = 1_000_000  # their backgrounds' streams stay clear of the eval scenes'


def classification_scene(seed: int, index: int, image_id: int, image_size: int, size: str,
                         object_scale: float) -> Scene:
    """An eval-split background with one object of `size`, its shape SHAPES[index % 5] so that
    the classes are balanced, its color and place random."""
    base = sample_scene(seed, "eval", CLASSIFICATION_FIRST_INDEX + index, image_id, image_size, object_scale)
    rng = random_stream(seed, "eval", index, "classification")
    low, high = SIZE_FRACTIONS[size]
    side = int(round(rng.uniform(low, high) * object_scale * max(base.width, base.height)))
    x0, y0 = int(rng.integers(0, base.width - side + 1)), int(rng.integers(0, base.height - side + 1))
    obj = ShapeObject(SHAPES[index % len(SHAPES)], weighted_pick(rng, COLORS, COLOR_CUMULATIVE_WEIGHTS), size,
                      (x0, y0, x0 + side, y0 + side))
    return dataclasses.replace(base, objects=(obj,))


def draw_classification_image(job: tuple[int, int, int, int, str, float, Path]) -> Scene:
    seed, index, image_id, image_size, size, object_scale, images_dir = job
    scene = classification_scene(seed, index, image_id, image_size, size, object_scale)
    render_scene(scene).save(images_dir / scene.file_name)
    return scene


def tags_entry(scene: Scene, box_style: str) -> dict:
    """RAM-like tags (the distinct objects, sorted as a tagger's label list), refiner-like boxes
    (pixels), and each box as the REC answers write it (the oracle-text rung of the main job)."""
    return {"tags": sorted({o.category for o in scene.objects}),
            "objects": [{"name": o.name, "box": list(o.box),
                         "box_text": format_box(padded_square_box(o.box, scene.width, scene.height), style=box_style)}
                        for o in scene.objects]}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def chat_layout(conversations: list[dict]) -> str:
    """A conversation laid out as the vicuna_v1 template renders it ("USER: q ASSISTANT: a"), for
    the tokenizer to learn from. BPE merges only what it sees: trained on the bare turns, it split
    "ASSISTANT" into 9 characters in every turn and " yes" (an answer after "ASSISTANT:") into
    " " + "yes", because the role names appeared once and the answers without their space."""
    return " ".join(f"{'USER' if turn['from'] == 'human' else 'ASSISTANT'}: {turn['value']}"
                    for turn in conversations)


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer and decoder, so decode(encode(text)) == text) with
    every digit its own token (LLaMA's digit splitting: box coordinates and counts stay
    digit-wise). The special tokens match as whole strings, so "<image>" is one id."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([HINT_TOKEN])
    return tokenizer


def train_qformer_tokenizer(texts: list[str]) -> Tokenizer:
    """The Q-Former's own tokenizer in bert-base-uncased's form (BLIP-2 sec. 3.1 starts the
    Q-Former from BERT-base): lowercasing BERT normalizer and pre-tokenizer, WordPiece, "[CLS] text
    [SEP]"; [PAD] is 0 as in BERT, and "[DEC]" comes last, as LAVIS adds it to BERT's vocabulary.

    The vocabulary is every word of the world whole (as bert-base holds common English words),
    plus each character alone and as a "##" continuation for anything else, in sorted order:
    `tokenizers`' WordPiece trainer breaks ties between equally frequent merges differently from
    run to run, and the world must come out byte-identical."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    characters = sorted({character for word in words for character in word})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = [*special, *characters, *(f"##{c}" for c in characters), *sorted(words - set(characters))]
    tokenizer = Tokenizer(models.WordPiece({token: index for index, token in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.add_special_tokens(special + ["[DEC]"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                 ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Building and caching the world
# ---------------------------------------------------------------------------------------------
def without_format_prompts(samples: list[dict]) -> list[dict]:
    """The same mixture as the original LLaVA would have seen it: questions without LLaVA-1.5's
    response-format suffixes (the ablation of the dissertation's Table 4.2, configs/shapes_llava.py)."""
    def strip(value: str) -> str:
        return value.replace(SHORT_ANSWER_PROMPT, "").replace(MULTIPLE_CHOICE_PROMPT, "")
    return [{**sample, "conversations": [{**turn, "value": strip(turn["value"])} for turn in sample["conversations"]]}
            for sample in samples]


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# What the world's text takes from data.py; their source is hashed with this file's.
DATA_HELPERS = (padded_square, padded_square_box, format_box)


def generator_sha256() -> str:
    """A hash of the code that decides the world's bytes: this file, the data.py helpers it writes
    boxes with and the REC prompt. An edit of any of them regenerates a cached world; an edit
    elsewhere in data.py does not."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for helper in DATA_HELPERS:
        digest.update(inspect.getsource(helper).encode("utf-8"))
    digest.update(REC_PROMPT.encode("utf-8"))
    return digest.hexdigest()


def generator_arguments(seed: int, num_train_images: int, num_eval_images: int, image_size: int,
                        box_style: str, object_scale: float, existence_turns: int = 0, layout: str = "free") -> dict:
    """What the marker file records: every argument that changes the bytes, so a world built with
    another one (box_style included) regenerates; the source hash does the same for an edit of the
    generator."""
    return {"seed": seed, "num_train_images": num_train_images, "num_eval_images": num_eval_images,
            "image_size": image_size, "box_style": box_style, "object_scale": object_scale,
            **({"existence_turns": existence_turns} if existence_turns else {}),
            **({"layout": layout} if layout != "free" else {}), "generator_sha256": generator_sha256()}


def marker_arguments(marker: Path) -> dict | None:
    """The arguments a finished build recorded; None when there is no readable marker (never
    built, or a build that was interrupted before its last step, writing the marker)."""
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("arguments")
    except (OSError, json.JSONDecodeError):
        return None


def train_annotations(scene: Scene, box_style: str, existence_turns: int = 0) -> tuple[dict, list[dict], str]:
    """The stage-1 caption sample, the stage-2 samples (boxes in box_style) and the LM document of
    one training image."""
    rng = annotation_rng(scene, "train")
    # "regions" grounds the caption's phrases in pixel boxes, as Kosmos-2's GRIT pairs do; LLaVA's
    # loaders ignore the field, and stage 0a's region-phrase contrastive loss reads it.
    caption = {"id": f"{scene.image_id:012d}", "image": scene.file_name,
               "conversations": turns([(pick(rng, CAPTION_PROMPTS), pick(rng, caption_variants(scene)))]),
               "regions": [{"phrase": obj.name, "box": list(obj.box)} for obj in scene.objects]}
    return caption, instruct_samples(rng, scene, box_style, existence_turns), text_document(rng, scene)


def draw_image(job: tuple[int, str, int, int, int, float, str, Path]) -> Scene:
    """Sample one scene and save its PNG; job = (seed, split, index, image_id, image_size,
    object_scale, layout, images_dir)."""
    seed, split, index, image_id, image_size, object_scale, layout, images_dir = job
    scene = sample_scene(seed, split, index, image_id, image_size, object_scale, layout)
    render_scene(scene).save(images_dir / scene.file_name)
    return scene


def parallel_map(function, items: list, workers: int) -> list:
    """Ordered map over worker processes (the results do not depend on `workers`). Forked, not
    spawned, where possible: a spawned worker re-imports the caller's main script (train.py)."""
    if workers <= 1:
        return [function(item) for item in items]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(function, items, chunksize=max(1, len(items) // (8 * workers))))


def default_workers(num_images: int) -> int:
    """One process per usable core (at most 8) for large worlds; 1 for small ones, where starting
    processes would cost more than it saves."""
    if num_images < 1000:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def build_world(out_dir: str | Path = DEFAULT_WORLD_DIR, seed: int = 0,
                num_train_images: int = DEFAULT_SIZES["num_train_images"],
                num_eval_images: int = DEFAULT_SIZES["num_eval_images"], image_size: int = DEFAULT_IMAGE_SIZE,
                box_style: str = "lion", object_scale: float = 1.0, workers: int | None = None,
                existence_turns: int = 0, layout: str = "free") -> Path:
    """Write the shapes world into out_dir (layout in the module docstring) and return
    out_dir. Cached: if out_dir/world.json records the same arguments, nothing is done; otherwise
    the world's entries (WORLD_ENTRIES, nothing else) are removed and regenerated.

    box_style: how REC answers and REG questions write boxes (data.format_box, data.BOX_STYLES):
    "lion", LION's "[0.525,0.000,0.675,0.394]", or "llava15", LLaVA-1.5's "[0.53, 0.0, 0.68, 0.39]".
    A model learns the one it is trained on, and eval reads both.
    object_scale: the objects' size factor (sample_scene).
    existence_turns: a fourth stage-2 sample per image with that many existence questions (0: none).
    layout: "free" (objects anywhere, sample_scene) or "grid" (one object per cell, sample_grid_scene).
    workers: processes for the per-image work (None: default_workers). The bytes written never
    depend on it.
    """
    if num_train_images < 1 or num_eval_images < 1 or image_size < 32 or not 0 < object_scale <= 1:
        raise ValueError(f"build_world needs >= 1 train and eval image, image_size >= 32 and object_scale in "
                         f"(0, 1], got {num_train_images}, {num_eval_images}, {image_size}, {object_scale}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    if layout == "grid" and object_scale != 1.0:
        raise ValueError("the grid layout sizes its objects by the cell (GRID_SIDES); object_scale must stay 1")
    if box_style not in BOX_STYLES:
        raise ValueError(f"unknown box_style {box_style!r}; known: {BOX_STYLES}")
    out_dir = Path(out_dir)
    arguments = generator_arguments(seed, num_train_images, num_eval_images, image_size, box_style, object_scale,
                                    existence_turns, layout)
    marker = out_dir / MARKER_FILE
    if marker_arguments(marker) == arguments and all((out_dir / entry).exists() for entry in WORLD_ENTRIES):
        return out_dir
    for entry in WORLD_ENTRIES:
        path = out_dir / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True)
    if workers is None:
        workers = default_workers(num_train_images + num_eval_images)

    jobs = [(seed, "train", index, index + 1, image_size, object_scale, layout, images_dir)
            for index in range(num_train_images)]
    jobs += [(seed, "eval", index, num_train_images + index + 1, image_size, object_scale, layout, images_dir)
             for index in range(num_eval_images)]
    scenes = parallel_map(draw_image, jobs, workers)
    train_scenes, eval_scenes = scenes[:num_train_images], scenes[num_train_images:]

    per_image = parallel_map(functools.partial(train_annotations, box_style=box_style, existence_turns=existence_turns),
                             train_scenes, workers)
    pretrain = [caption for caption, _, _ in per_image]
    instruct = [sample for _, samples, _ in per_image for sample in samples]
    documents = [document for _, _, document in per_image]
    text_rng = random_stream(seed, "train", 0, "text_only")
    # LLaVA-1.5's share of text-only conversations (40K ShareGPT of the 665K mixture, 6%): at 1% (the
    # world's first share) they filled six of 700 stage-2 steps, each with a loss of 2-6 nats,
    # and were never learned.
    text_only = [text_only_sample(text_rng, k) for k in range(max(1, round(0.06 / 0.94 * len(instruct))))]
    instruct.extend(text_only)
    documents.extend(" ".join(turn["value"] for turn in sample["conversations"]) for sample in text_only)
    write_json(out_dir / "train" / "pretrain.json", pretrain)
    write_json(out_dir / "train" / "instruct.json", instruct)
    write_json(out_dir / "train" / "instruct_no_format_prompts.json", without_format_prompts(instruct))
    write_jsonl(out_dir / "train" / "text.jsonl", [{"text": d} for d in documents])

    eval_dir = out_dir / "eval"
    refs, instances, rec_rows = refcoco_files(eval_scenes)
    (eval_dir / "refcoco").mkdir(parents=True)
    # Protocol 2, as the public RefCOCO pickles: the refer toolkit dates from Python 2.
    (eval_dir / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_json(eval_dir / "refcoco" / "instances.json", instances)
    for split, rows in rec_rows.items():
        write_jsonl(eval_dir / "refcoco" / f"refcoco_{split}.jsonl", rows)
    questions, annotations = vqa_files(eval_scenes, per_image=3)
    write_json(eval_dir / "vqa" / "questions.json", questions)
    write_json(eval_dir / "vqa" / "annotations.json", annotations)
    write_json(eval_dir / "captions" / "captions.json", karpathy_captions(eval_scenes))
    for split, rows in pope_files(eval_scenes, train_scenes).items():
        write_jsonl(eval_dir / "pope" / f"pope_{split}.jsonl", rows)
    write_jsonl(eval_dir / "mc" / "questions.jsonl", multiple_choice_rows(eval_scenes))
    write_json(out_dir / "tags.json", {s.file_name: tags_entry(s, box_style) for s in scenes})
    per_size = len(SHAPES) * max(2, num_eval_images // 8)
    first_id = num_train_images + num_eval_images + 1
    jobs = [(seed, index, first_id + index, image_size, SIZES[index // per_size], object_scale, images_dir)
            for index in range(per_size * len(SIZES))]
    classification = parallel_map(draw_classification_image, jobs, workers)
    for position, size in enumerate(SIZES):
        write_json(eval_dir / "classification" / f"{size}.json", {
            "classes": list(SHAPES), "templates": CLASSIFICATION_TEMPLATES[size],
            "images": [{"image": scene.file_name, "label": scene.objects[0].shape}
                       for scene in classification[position * per_size:(position + 1) * per_size]]})

    # The vocabulary is closed: the first TOKENIZER_IMAGES images' text holds every word, and
    # learning from it alone keeps the tokenizer fast and identical for all larger worlds.
    tokenizer_texts = list(TEMPLATE_STRINGS)
    for caption, samples, document in per_image[:TOKENIZER_IMAGES]:
        tokenizer_texts += [chat_layout(sample["conversations"]) for sample in [caption] + samples]
        tokenizer_texts.append(document)
    tokenizer_texts += documents[len(train_scenes):]  # the text-only samples
    tokenizer = train_tokenizer(tokenizer_texts)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    train_qformer_tokenizer(tokenizer_texts).save(str(out_dir / "qformer_tokenizer.json"))
    write_json(marker, {"arguments": arguments,
                        "counts": {"train_images": len(train_scenes), "eval_images": len(eval_scenes),
                                   "classification_images": len(classification),
                                   "pretrain_samples": len(pretrain), "instruct_samples": len(instruct),
                                   "text_documents": len(documents), "vqa_questions": len(questions["questions"]),
                                   "refcoco_refs": len(refs), "vocab_size": tokenizer.get_vocab_size()}})
    return out_dir



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WORLD_DIR, help="world directory (cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train-images", type=int, default=DEFAULT_SIZES["num_train_images"])
    parser.add_argument("--num-eval-images", type=int, default=DEFAULT_SIZES["num_eval_images"])
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="longer image side in pixels")
    parser.add_argument("--box-style", choices=BOX_STYLES, default="lion", help="box text of REC / REG samples")
    parser.add_argument("--object-scale", type=float, default=1.0, help="factor on every object's size")
    parser.add_argument("--layout", choices=LAYOUTS, default="free", help="objects anywhere, or one per grid cell")
    parser.add_argument("--small", action="store_true",
                        help=f"the CI smoke world: {SMALL_WORLD['num_train_images']} train, "
                             f"{SMALL_WORLD['num_eval_images']} eval images (overrides --num-*)")
    args = parser.parse_args()
    sizes = SMALL_WORLD if args.small else {"num_train_images": args.num_train_images,
                                            "num_eval_images": args.num_eval_images}
    start = time.perf_counter()
    out_dir = build_world(args.out, seed=args.seed, image_size=args.image_size, box_style=args.box_style,
                          object_scale=args.object_scale, layout=args.layout, **sizes)
    counts = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))["counts"]
    print(f"shapes world in {out_dir} ({time.perf_counter() - start:.1f} s): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
