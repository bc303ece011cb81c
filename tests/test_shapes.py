"""Tests of the shapes world (shapes.py): determinism, caching, and every file checked against its
public format and against the scenes, with an independent reader of the world's language (the
referring expressions and questions are resolved here from tags.json, not with shapes.py's code).
"""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import eval as evaluation
import metrics
import retrieval
import shapes

NUM_TRAIN, NUM_EVAL = 40, 24
RELATIONS = {
    "to the left of": lambda a, b: a[2] <= b[0],
    "to the right of": lambda a, b: b[2] <= a[0],
    "above": lambda a, b: a[3] <= b[1],
    "below": lambda a, b: b[3] <= a[1],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=NUM_TRAIN,
                              num_eval_images=NUM_EVAL, image_size=96)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def scene_objects(world: Path) -> dict[int, list[dict]]:
    """image_id -> objects with size, color, shape and pixel box, read from tags.json."""
    objects = {}
    for file_name, entry in read_json(world / "tags.json").items():
        objects[image_id_of(file_name)] = [dict(zip(("size", "color", "shape"), o["name"].split()), box=o["box"])
                                  for o in entry["objects"]]
    return objects


def image_id_of(file_name: str) -> int:
    return int(Path(file_name).stem)


def resolve(expression: str, objects: list[dict]) -> list[dict]:
    """The objects a referring expression denotes: "the [size] [color] shape-or-'shape'", optionally
    followed by a relation and an anchor expression that must denote exactly one object."""
    assert expression.startswith("the "), expression
    target, anchor_objects, relation = expression, None, None
    for phrase, test in RELATIONS.items():
        if f" {phrase} the " in expression:
            target, anchor = expression.split(f" {phrase} ", 1)
            anchor_objects, relation = resolve(anchor, objects), test
            assert len(anchor_objects) == 1, f"ambiguous anchor in {expression!r}"
    *attributes, noun = target.removeprefix("the ").split()
    matching = []
    for obj in objects:
        if noun != "shape" and obj["shape"] != noun:
            continue
        if any(word not in (obj["size"], obj["color"]) for word in attributes):
            continue
        if relation and (obj is anchor_objects[0] or not relation(obj["box"], anchor_objects[0]["box"])):
            continue
        matching.append(obj)
    return matching


def padded_box_text(box: list[int], width: int, height: int, style: str = "lion") -> str:
    """The box as text in the world's box style: LION's "[0.525,0.000,0.675,0.394]" or
    LLaVA-1.5's "[0.53, 0.0, 0.68, 0.39]"."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    values = [(box[0] + left) / side, (box[1] + top) / side, (box[2] + left) / side, (box[3] + top) / side]
    if style == "llava15":
        return "[" + ", ".join(str(round(v, 2)) for v in values) + "]"
    return "[" + ",".join(f"{v:.3f}" for v in values) + "]"


def shoelace_area(polygon: list[float]) -> float:
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def rasterize(polygons: list[list[float]], x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """(height, width) mask of the pixels, from (x0, y0) on, whose centers lie inside any of the COCO
    polygons (even-odd rule): pycocotools' reading of a polygon, with pixel (x, y) the square
    [x, x+1] x [y, y+1], independent of shapes.py and of pycocotools."""
    ys, xs = np.mgrid[y0:y0 + height, x0:x0 + width] + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        inside = np.zeros_like(mask)
        vertices = np.array(polygon).reshape(-1, 2)
        for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0)):
            if ay != by:
                crosses = (ay > ys) != (by > ys)
                inside ^= crosses & (xs < ax + (ys - ay) * (bx - ax) / (by - ay))
        mask |= inside
    return mask


def answer(question: str, objects: list[dict]) -> str:
    """The correct short answer to every question form the world asks, computed from the objects."""
    question = question.removesuffix(shapes.SHORT_ANSWER_PROMPT)
    if match := re.fullmatch(r"What (color|shape|size) is (.+)\?", question):
        (obj,) = resolve(match[2], objects)
        return obj[match[1]]
    if question == "How many shapes are there?":
        return str(len(objects))
    if match := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o["color"] == match[1] for o in objects))
    if match := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o["shape"] == match[1] for o in objects))
    if match := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return "yes" if any((o["color"], o["shape"]) == (match[1], match[2]) for o in objects) else "no"
    if match := re.fullmatch(r"Is (.+) to the left or to the right of (.+)\?", question):
        (a,), (b,) = resolve(match[1], objects), resolve(match[2], objects)
        return "left" if RELATIONS["to the left of"](a["box"], b["box"]) else "right"
    if match := re.fullmatch(r"Is (.+) above or below (.+)\?", question):
        (a,), (b,) = resolve(match[1], objects), resolve(match[2], objects)
        return "above" if RELATIONS["above"](a["box"], b["box"]) else "below"
    if match := re.fullmatch(r"Is (.+) (to the left of|above) (.+)\?", question):
        (a,), (b,) = resolve(match[1], objects), resolve(match[3], objects)
        return "yes" if RELATIONS[match[2]](a["box"], b["box"]) else "no"
    raise AssertionError(f"a question form the test does not know: {question!r}")


# ---------------------------------------------------------------------------------------------
# Building: determinism and caching
# ---------------------------------------------------------------------------------------------

def test_build_is_deterministic_and_independent_of_workers(world, tmp_path):
    again = shapes.build_world(tmp_path / "again", seed=0, num_train_images=NUM_TRAIN,
                               num_eval_images=NUM_EVAL, image_size=96, workers=2)
    assert tree_bytes(world) == tree_bytes(again)


def test_eval_images_do_not_depend_on_the_number_of_train_images(world, tmp_path):
    other = shapes.build_world(tmp_path / "other", seed=0, num_train_images=NUM_TRAIN + 5,
                               num_eval_images=NUM_EVAL, image_size=96)
    for index in range(NUM_EVAL):
        first = (world / "images" / f"{NUM_TRAIN + index + 1:012d}.png").read_bytes()
        second = (other / "images" / f"{NUM_TRAIN + 5 + index + 1:012d}.png").read_bytes()
        assert first == second


def test_second_call_is_cached_and_new_arguments_regenerate(tmp_path):
    out = tmp_path / "cache"
    shapes.build_world(out, seed=0, num_train_images=8, num_eval_images=6)
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    start = time.perf_counter()
    assert shapes.build_world(out, seed=0, num_train_images=8, num_eval_images=6) == out
    assert time.perf_counter() - start < 0.5
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == stamps

    (out / "notes.txt").write_text("not the world's")
    first_image = (out / "images" / f"{1:012d}.png").read_bytes()
    shapes.build_world(out, seed=1, num_train_images=8, num_eval_images=6)
    assert (out / "notes.txt").exists(), "regenerating must only remove the world's own entries"
    assert (out / "images" / f"{1:012d}.png").read_bytes() != first_image
    assert read_json(out / shapes.MARKER_FILE)["arguments"]["seed"] == 1


def test_cli_small_world(tmp_path):
    subprocess.run([sys.executable, str(Path(shapes.__file__)), "--out", str(tmp_path / "small"), "--small"],
                   check=True, capture_output=True)
    counts = read_json(tmp_path / "small" / shapes.MARKER_FILE)["counts"]
    assert counts["train_images"] == shapes.SMALL_WORLD["num_train_images"]
    assert counts["classification_images"] == 2 * len(shapes.SHAPES) * 2  # two sizes, two images a class
    assert len(list((tmp_path / "small" / "images").glob("*.png"))) == (sum(shapes.SMALL_WORLD.values())
                                                                        + counts["classification_images"])


def test_classification_tasks_are_one_balanced_object_of_their_size(world):
    eval_ids = set()
    for size in shapes.SIZES:
        classes, templates, rows = retrieval.read_classification_task(str(world / "eval" / "classification" / f"{size}.json"))
        assert classes == list(shapes.SHAPES) and all(size in template for template in templates)
        assert [row["label"] for row in rows] == [classes[i % len(classes)] for i in range(len(rows))]
        for row in rows:
            image = Image.open(world / "images" / row["image"])
            eval_ids.add(row["image"])
            # One object on a pale background: every saturated pixel lies in one square box of its size.
            dark = (np.asarray(image.convert("RGB")).min(axis=2) <= 60).nonzero()
            height, width = np.ptp(dark[0]) + 1, np.ptp(dark[1]) + 1
            low, high = shapes.SIZE_FRACTIONS[size]
            assert low * max(image.size) - 2 <= max(height, width) <= high * max(image.size) + 2, row
    assert len(eval_ids) == 2 * len(rows)


# ---------------------------------------------------------------------------------------------
# Images and boxes
# ---------------------------------------------------------------------------------------------

def test_boxes_are_inside_apart_and_drawn(world):
    objects = scene_objects(world)
    assert len(objects) == NUM_TRAIN + NUM_EVAL
    sizes = Counter()
    for image_id, scene in objects.items():
        image = Image.open(world / "images" / f"{image_id:012d}.png")
        sizes[image.width == image.height] += 1
        pixels = np.asarray(image.convert("RGB"))
        assert 1 <= len(scene) <= shapes.MAX_OBJECTS
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for k, obj in enumerate(scene):
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            # The box center is never covered by another object (overlap <= 10% of the smaller box).
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == shapes.COLOR_RGB[obj["color"]], obj
            covered[y0:y1, x0:x1] = True
            for other in scene[:k]:
                a, b = obj["box"], other["box"]
                intersection = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
                assert intersection <= shapes.MAX_OVERLAP * min(area_a, area_b)
                assert intersection / (area_a + area_b - intersection) <= shapes.MAX_OVERLAP
        # Backgrounds are pale: no channel below 190, unlike every object color.
        assert pixels[~covered].min() >= 190
    assert sizes[False] > 0 and sizes[True] > 0, "both square and non-square images must occur"


# ---------------------------------------------------------------------------------------------
# Training files (LLaVA instruction JSON, text jsonl)
# ---------------------------------------------------------------------------------------------

def test_llava_json_schema(world):
    pretrain = read_json(world / "train" / "pretrain.json")
    instruct = read_json(world / "train" / "instruct.json")
    assert len(pretrain) == NUM_TRAIN
    for record in pretrain + instruct:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        has_image = "image" in record
        assert turns[0]["value"].startswith("<image>\n") == has_image
        assert sum("<image>" in t["value"] for t in turns) == int(has_image)
        if has_image:
            assert image_id_of(record["image"]) <= NUM_TRAIN, "training data must not use eval images"
            assert (world / "images" / record["image"]).is_file()
    assert len({r["id"] for r in instruct}) == len(instruct)
    kinds = Counter("text" if "image" not in r else r["id"].split("_", 1)[1] for r in instruct)
    assert kinds["vqa"] == kinds["grounding"] == NUM_TRAIN and kinds["text"] > 0
    assert sum(kinds.values()) == 3 * NUM_TRAIN + kinds["text"]
    documents = read_jsonl(world / "train" / "text.jsonl")
    assert len(documents) >= NUM_TRAIN and all(d["text"].strip() for d in documents)


def test_training_answers_are_correct(world):
    """Every short answer, REC box and REG description agrees with the scene."""
    objects = scene_objects(world)
    sizes = {i: Image.open(world / "images" / f"{i:012d}.png").size for i in objects}
    checked = Counter()
    for record in read_json(world / "train" / "instruct.json"):
        if "image" not in record:
            continue
        image_id = image_id_of(record["image"])
        scene = objects[image_id]
        turns = record["conversations"]
        for question, reply in zip(turns[0::2], turns[1::2]):
            text, response = question["value"].removeprefix("<image>\n"), reply["value"]
            if text.endswith(shapes.SHORT_ANSWER_PROMPT):
                assert response == answer(text, scene), text
                checked["short"] += 1
            elif text.startswith(shapes.REC_PROMPT):
                referents = resolve(text.removeprefix(shapes.REC_PROMPT), scene)
                assert len(referents) == 1, f"ambiguous: {text}"
                assert response == padded_box_text(referents[0]["box"], *sizes[image_id])
                checked["rec"] += 1
            elif text.startswith(shapes.REG_PROMPT):
                box = text.removeprefix(shapes.REG_PROMPT)
                (obj,) = [o for o in scene if padded_box_text(o["box"], *sizes[image_id]) == box]
                assert response == f"{obj['size']} {obj['color']} {obj['shape']}"
                checked["reg"] += 1
            elif text.endswith(shapes.MULTIPLE_CHOICE_PROMPT):
                question_text, *options = text.removesuffix(shapes.MULTIPLE_CHOICE_PROMPT).split("\n")
                chosen = options["ABCD".index(response)].split(". ", 1)[1]
                assert chosen == answer(question_text, scene)
                checked["multiple_choice"] += 1
    assert checked["short"] > 50 and checked["rec"] > 20 and checked["reg"] > 5 and checked["multiple_choice"] > 0


def test_world_hash_covers_the_data_helpers_it_writes_boxes_and_prompts_with(monkeypatch):
    hashes = {shapes.generator_sha256()}
    monkeypatch.setattr(shapes, "DATA_HELPERS", shapes.DATA_HELPERS[:-1])
    hashes.add(shapes.generator_sha256())
    monkeypatch.setattr(shapes, "REC_PROMPT", "Where is: ")
    hashes.add(shapes.generator_sha256())
    assert len(hashes) == 3


def test_training_files_load_with_data_loaders(world):
    tokenizer = data.load_tokenizer(str(world))
    image_token = tokenizer.token_to_id("<image>")
    for name, template in (("instruct.json", "vicuna_v1"), ("pretrain.json", "plain")):
        dataset = data.InstructionDataset(str(world / "train" / name), str(world / "images"), tokenizer,
                                          template=template, image_token_index=image_token, num_image_tokens=4,
                                          image_size=32, pad_to_square=True, max_seq_len=512, on_error="raise")
        assert len(dataset) == len(read_json(world / "train" / name)) and dataset.num_truncated == 0
        assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    captions = data.CaptionDataset(str(world / "train" / "pretrain.json"), str(world / "images"), tokenizer,
                                   image_size=32, max_text_len=64, on_error="raise")
    assert len(captions) == NUM_TRAIN and max(captions.lengths) < 64, "captions must fit the tiny CLIP text tower"
    grounded = data.CaptionDataset(str(world / "train" / "pretrain.json"), str(world / "images"), tokenizer,
                                   image_size=32, pad_to_square=True, max_text_len=64, on_error="raise",
                                   with_regions=True)
    objects = scene_objects(world)
    for index, record in enumerate(read_json(world / "train" / "pretrain.json")):
        expected = objects[int(record["id"])]
        assert sorted((r["phrase"], tuple(r["box"])) for r in record["regions"]) == \
            sorted((" ".join((o["size"], o["color"], o["shape"])), tuple(o["box"])) for o in expected)
        assert tokenizer.decode(list(grounded[index]["region_phrases"][0])) == record["regions"][0]["phrase"]
    text = data.TextDataset(str(world / "train" / "text.jsonl"), tokenizer, max_seq_len=256, on_error="raise")
    assert len(text) >= NUM_TRAIN


# ---------------------------------------------------------------------------------------------
# Evaluation files (public benchmark formats)
# ---------------------------------------------------------------------------------------------

def test_refcoco_pickle_and_instances(world):
    folder = world / "eval" / "refcoco"
    pickled = (folder / "refs(unc).p").read_bytes()
    assert pickled[:2] == b"\x80\x02", "protocol 2, as the public RefCOCO pickles the refer toolkit reads"
    with open(folder / "refs(unc).p", "rb") as file:
        refs = pickle.load(file)
    instances = read_json(folder / "instances.json")
    # What pycocotools' COCO.info() prints and what COCO images point to.
    assert {"description", "version", "year", "date_created"} <= set(instances["info"])
    license_ids = {entry["id"] for entry in instances["licenses"]}
    assert all({"id", "name", "url"} <= set(entry) for entry in instances["licenses"]) and license_ids
    assert all(image["license"] in license_ids for image in instances["images"])
    objects = scene_objects(world)
    annotations = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    assert set(images) == set(range(NUM_TRAIN + 1, NUM_TRAIN + NUM_EVAL + 1))
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert annotation["iscrowd"] == 0 and 0 < annotation["area"] <= w * h
        assert annotation["area"] == sum(shoelace_area(polygon) for polygon in annotation["segmentation"])
        assert [x, y, x + w, y + h] in [o["box"] for o in objects[annotation["image_id"]]]
    split_of_image, sentences_per_split = {}, Counter()
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences", "sent_ids", "file_name"} <= set(ref)
        assert ref["split"] in ("val", "testA", "testB")
        assert split_of_image.setdefault(ref["image_id"], ref["split"]) == ref["split"], "one split per image"
        annotation = annotations[ref["ann_id"]]
        assert annotation["image_id"] == ref["image_id"] and categories[ref["category_id"]] in shapes.SHAPES
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        x, y, w, h = annotation["bbox"]
        for sentence in ref["sentences"]:
            assert {"sent_id", "sent", "tokens", "raw"} <= set(sentence)
            (obj,) = resolve(sentence["sent"], objects[ref["image_id"]])
            assert obj["box"] == [x, y, x + w, y + h], sentence["sent"]
            sentences_per_split[ref["split"]] += 1
    assert len({s["sent_id"] for r in refs for s in r["sentences"]}) == sum(sentences_per_split.values())
    for split in ("val", "testA", "testB"):
        rows = read_jsonl(folder / f"refcoco_{split}.jsonl")
        assert len(rows) == sentences_per_split[split] > 0
        for row in rows:
            assert set(row) == {"image", "expression", "bbox", "width", "height"}
            (obj,) = resolve(row["expression"], objects[image_id_of(row["image"])])
            assert obj["box"] == row["bbox"]


def test_refcoco_segmentations_are_the_drawn_pixels(world):
    """Every annotation's polygons (what the refer toolkit's getMask and pycocotools' annToMask
    rasterize) cover exactly the pixels of its shape in the PNG, wherever no other object's box
    could cover or share them; the polygons' shoelace area is their pixel count."""
    instances = read_json(world / "eval" / "refcoco" / "instances.json")
    images = {image["id"]: image for image in instances["images"]}
    colors = {tuple(o["box"]): o["color"] for scene in scene_objects(world).values() for o in scene}
    boxes_of_image: dict[int, list[list[float]]] = {}
    for annotation in instances["annotations"]:
        boxes_of_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    worst, whole = 0.0, 0
    for annotation in instances["annotations"]:
        x, y, w, h = (int(v) for v in annotation["bbox"])
        polygons = annotation["segmentation"]
        assert polygons and all(len(p) % 2 == 0 and len(p) >= 6 for p in polygons)
        # Inside the bbox and touching all four sides, as COCO's bbox is the segmentation's box.
        xs, ys = [v for p in polygons for v in p[0::2]], [v for p in polygons for v in p[1::2]]
        assert [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] == [x, y, w, h]
        mask = rasterize(polygons, x, y, w, h)
        area = sum(shoelace_area(p) for p in polygons)
        assert area == mask.sum() == annotation["area"]

        image = images[annotation["image_id"]]
        pixels = np.asarray(Image.open(world / "images" / image["file_name"]).convert("RGB"))[y:y + h, x:x + w]
        drawn = (pixels == shapes.COLOR_RGB[colors[(x, y, x + w, y + h)]]).all(axis=-1)
        contested = np.zeros_like(mask)
        for other in boxes_of_image[annotation["image_id"]]:
            if other != annotation["bbox"]:
                ox, oy, ow, oh = (int(v) for v in other)
                contested[max(0, oy - y):max(0, oy + oh - y), max(0, ox - x):max(0, ox + ow - x)] = True
        assert (mask == drawn)[~contested].all(), annotation["id"]
        if not contested.any():
            worst = max(worst, abs(area - drawn.sum()) / drawn.sum())
            whole += 1
    assert whole >= 10 and worst == 0.0


def test_traced_polygons_give_back_every_mask_size():
    """mask_polygons over every shape at every side from 5 px (the smallest image_size's small
    shapes, where a star's tips touch only at corners) to 40 px."""
    for shape in shapes.SHAPES:
        for side in range(5, 41):
            obj = shapes.ShapeObject(shape, "red", "small", (3, 7, 3 + side, 7 + side))
            mask = shapes.shape_mask(obj)
            polygons = shapes.mask_polygons(mask, 3, 7)
            assert (rasterize(polygons, 3, 7, side, side) == mask).all(), (shape, side)
            assert sum(shoelace_area(p) for p in polygons) == mask.sum(), (shape, side)


def test_box_style_is_a_world_setting(world, tmp_path):
    """A llava15 world writes LLaVA-1.5's box text in every REC answer and REG question, records the
    style in world.json (so switching styles regenerates a cached world) and changes nothing else
    a lion world writes but the instruction text, the tokenizer learned from it, and tags.json's
    box text (written as the REC answers write it)."""
    out = tmp_path / "styled"
    shapes.build_world(out, seed=0, num_train_images=NUM_TRAIN, num_eval_images=NUM_EVAL, image_size=96)
    assert read_json(out / shapes.MARKER_FILE)["arguments"]["box_style"] == "lion"
    shapes.build_world(out, seed=0, num_train_images=NUM_TRAIN, num_eval_images=NUM_EVAL, image_size=96,
                       box_style="llava15")
    assert read_json(out / shapes.MARKER_FILE)["arguments"]["box_style"] == "llava15"
    objects = scene_objects(out)
    sizes = {i: Image.open(out / "images" / f"{i:012d}.png").size for i in objects}
    checked = Counter()
    for record in read_json(out / "train" / "instruct.json"):
        if "image" not in record:
            continue
        image_id = image_id_of(record["image"])
        turns = record["conversations"]
        for question, reply in zip(turns[0::2], turns[1::2]):
            text = question["value"].removeprefix("<image>\n")
            if text.startswith(shapes.REC_PROMPT):
                (obj,) = resolve(text.removeprefix(shapes.REC_PROMPT), objects[image_id])
                assert reply["value"] == padded_box_text(obj["box"], *sizes[image_id], style="llava15")
                checked["rec"] += 1
            elif text.startswith(shapes.REG_PROMPT):
                box = text.removeprefix(shapes.REG_PROMPT)
                (obj,) = [o for o in objects[image_id]
                          if padded_box_text(o["box"], *sizes[image_id], style="llava15") == box]
                assert reply["value"] == f"{obj['size']} {obj['color']} {obj['shape']}"
                checked["reg"] += 1
    assert checked["rec"] > 20 and checked["reg"] > 5
    lion, llava15 = tree_bytes(world), tree_bytes(out)
    differing = {name for name in lion if lion[name] != llava15[name]}
    instruction_files = {"train/instruct.json", "train/instruct_no_format_prompts.json", shapes.MARKER_FILE}
    assert instruction_files <= differing <= instruction_files | {"tokenizer.json", "qformer_tokenizer.json", "tags.json"}
    with pytest.raises(ValueError, match="box_style"):
        shapes.build_world(tmp_path / "unknown", box_style="shikra")


def test_vqa_questions_and_ten_answers(world):
    questions = read_json(world / "eval" / "vqa" / "questions.json")["questions"]
    annotations = {a["question_id"]: a for a in read_json(world / "eval" / "vqa" / "annotations.json")["annotations"]}
    objects = scene_objects(world)
    assert len(questions) == 3 * NUM_EVAL and set(annotations) == {q["question_id"] for q in questions}
    perfect = 0
    for question in questions:
        annotation = annotations[question["question_id"]]
        assert annotation["image_id"] == question["image_id"] > NUM_TRAIN
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert annotation["answer_type"] in ("yes/no", "number", "other")
        truth = answer(question["question"], objects[question["image_id"]])
        perfect += metrics.vqa_accuracy(truth, [a["answer"] for a in annotation["answers"]]) == 1.0
    assert perfect >= 0.9 * len(questions), "the true answer must get full VQA accuracy almost always"


def test_karpathy_captions(world):
    images = read_json(world / "eval" / "captions" / "captions.json")["images"]
    assert len(images) == NUM_EVAL and {i["split"] for i in images} == {"val", "test"}
    for image in images:
        assert len(image["sentences"]) == 5 == len({s["raw"] for s in image["sentences"]})
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        assert (world / "images" / image["filename"]).is_file() and image["cocoid"] == image_id_of(image["filename"])
        for sentence in image["sentences"]:
            assert sentence["tokens"] == re.sub(r"[^a-z ]", "", sentence["raw"].lower()).split()


def test_pope_splits_are_balanced_and_follow_the_definitions(world):
    objects = scene_objects(world)
    categories = {i: {f"{o['color']} {o['shape']}" for o in scene} for i, scene in objects.items()}
    frequency = Counter(c for i, cs in categories.items() if i <= NUM_TRAIN for c in cs)
    for split in ("random", "popular", "adversarial"):
        rows = read_jsonl(world / "eval" / "pope" / f"pope_{split}.jsonl")
        assert rows and Counter(r["label"] for r in rows)["yes"] * 2 == len(rows)
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        by_image: dict[int, list[tuple[str, str]]] = {}
        for row in rows:
            category = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", row["text"])[1]
            by_image.setdefault(image_id_of(row["image"]), []).append((category, row["label"]))
        for image_id, asked in by_image.items():
            present = categories[image_id]
            assert len(present) >= 3 and Counter(label for _, label in asked) == {"yes": 3, "no": 3}
            assert all((category in present) == (label == "yes") for category, label in asked)
            negatives = [category for category, label in asked if label == "no"]
            if split == "popular":
                absent = sorted((f"{color} {shape}" for color in shapes.COLORS for shape in shapes.SHAPES
                                 if f"{color} {shape}" not in present), key=lambda c: (-frequency[c], c))
                assert negatives == absent[:3]
            if split == "adversarial":
                colors, kinds = {c.split()[0] for c in present}, {c.split()[1] for c in present}
                assert all(c.split()[0] in colors or c.split()[1] in kinds for c in negatives)


def test_multiple_choice_and_tags(world):
    objects = scene_objects(world)
    rows = read_jsonl(world / "eval" / "mc" / "questions.jsonl")
    assert len(rows) == NUM_EVAL
    for row in rows:
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["choices"][row["answer"]] == answer(row["question"], objects[image_id_of(row["image"])])
    tags = read_json(world / "tags.json")
    for entry in tags.values():
        assert entry["tags"] == sorted({" ".join(o["name"].split()[1:]) for o in entry["objects"]})


def test_eval_files_load_with_eval_task_loaders(world):
    expected = {("refcoco", "val"): None, ("refcoco", "testA"): None, ("refcoco", "testB"): None,
                ("vqa", "val"): 3 * NUM_EVAL, ("captions", "test"): None, ("captions", "val"): None,
                ("pope", "all"): sum(len(read_jsonl(world / "eval" / "pope" / f"pope_{s}.jsonl"))
                                     for s in ("random", "popular", "adversarial")),
                ("mc", "test"): NUM_EVAL}
    for (task, split), count in expected.items():
        samples = evaluation.load_task(task, world, split, image_template="{image_id:012d}.png")
        assert samples and (count is None or len(samples) == count), (task, split)
        assert all(sample.image.is_file() for sample in samples), (task, split)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def test_tokenizer_special_tokens_digits_and_round_trip(world):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    assert [tokenizer.token_to_id(t) for t in shapes.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.get_vocab_size() <= shapes.TOKENIZER_VOCAB_SIZE
    for special in ("</s>", "<image>"):
        assert tokenizer.encode(f"A red circle.{special}USER:", add_special_tokens=False).ids.count(
            tokenizer.token_to_id(special)) == 1
    assert len(tokenizer.encode("2024", add_special_tokens=False).ids) == 4, "digits are single tokens"
    for text in ("[0.525,0.000,0.675,0.394]", "small red circle.", " ASSISTANT: 3</s>USER: <image>\nHow many?",
                 "Answer with the option's letter from the given choices directly.", "  odd  spacing é"):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = tokenizer.encode("the box [0.200,0.500,0.400,0.700]</s>", add_special_tokens=False).ids
    assert tokenizer.decode(ids) == "the box [0.200,0.500,0.400,0.700]"
    system = shapes.TEMPLATE_STRINGS[0]
    assert len(tokenizer.encode(system, add_special_tokens=False).ids) < len(system.split()) * 1.5
    # What the vicuna_v1 template adds to every turn, and the answers after it, as few tokens.
    for text, tokens in ((" USER:", 2), ("</s>USER:", 3), (" ASSISTANT:", 2), (" ASSISTANT: yes</s>", 4),
                         (" ASSISTANT: circle</s>", 4)):
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == tokens, text


def test_existence_turns_add_a_sample_of_existence_questions_per_image(tmp_path):
    """The dense variant: a fourth stage-2 sample per image, N existence questions answered from the
    scene, and the other samples exactly as without it."""
    plain = shapes.build_world(tmp_path / "plain", seed=0, num_train_images=12, num_eval_images=4)
    dense = shapes.build_world(tmp_path / "dense", seed=0, num_train_images=12, num_eval_images=4, existence_turns=3)
    records, dense_records = (read_json(world / "train" / "instruct.json") for world in (plain, dense))
    extra = [record for record in dense_records if record["id"].endswith("_existence")]
    assert len(extra) == 12 and [r for r in dense_records if r not in extra][:36] == records[:36]
    objects = scene_objects(dense)
    for record in extra:
        present = {f"{o['color']} {o['shape']}" for o in objects[image_id_of(record["image"])]}
        turns = record["conversations"]
        assert len(turns) == 6
        for question, reply in zip(turns[::2], turns[1::2]):
            category = re.search(r"Is there an? (\w+ \w+) in the image", question["value"]).group(1)
            assert reply["value"] == ("yes" if category in present else "no")


def test_grid_layout_puts_one_object_centred_in_each_cell_aligned_with_the_padded_square(tmp_path):
    """The grid layout: every object centred in a 24 px cell of its own (a large one 0.9 of the
    cell, a small one half), non-square images whole rows or columns short, so that LLaVA-1.5's
    pad-to-square adds whole cells and each cell is one 16 px patch of the 64 px tower."""
    world = shapes.build_world(tmp_path, seed=0, num_train_images=60, num_eval_images=8, layout="grid")
    cell = 96 // 4
    sizes = Counter()
    for file_name, entry in read_json(world / "tags.json").items():
        width, height = Image.open(world / "images" / file_name).size
        assert (width, height) in ((96, 96), (96, 48), (48, 96)), file_name
        cells = []
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            side = x1 - x0
            assert side == y1 - y0 == {"small": 12, "large": 22}[obj["name"].split()[0]]
            column, row = x0 // cell, y0 // cell
            assert (x0 + x1) / 2 == pytest.approx((column + 0.5) * cell, abs=0.5)
            assert (y0 + y1) / 2 == pytest.approx((row + 0.5) * cell, abs=0.5)
            cells.append((column, row))
            sizes[obj["name"].split()[0]] += 1
            # The box text is the padded square's: the padding is whole cells, so it stays on the grid.
            padded = [float(v) * 96 for v in obj["box_text"].strip("[]").split(",")]
            offset = ((96 - width) // 2, (96 - height) // 2, (96 - width) // 2, (96 - height) // 2)
            assert padded == pytest.approx([b + o for b, o in zip(obj["box"], offset)], abs=0.06)
            assert all(o % cell == 0 for o in offset)
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= shapes.MAX_OBJECTS
        # The object is drawn where its box says: its cell's centre pixel has the object's color.
        image = np.asarray(Image.open(world / "images" / file_name).convert("RGB"))
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            if obj["name"].split()[2] in ("circle", "square", "diamond"):
                assert tuple(image[(y0 + y1) // 2, (x0 + x1) // 2]) == shapes.COLOR_RGB[obj["name"].split()[1]]
    assert sizes["small"] > 20 and sizes["large"] > 20
    marker = read_json(world / shapes.MARKER_FILE)["arguments"]
    assert marker["layout"] == "grid"
    with pytest.raises(ValueError, match="unknown layout"):
        shapes.build_world(tmp_path / "other", layout="hexagonal")
    with pytest.raises(ValueError, match="object_scale must stay 1"):
        shapes.build_world(tmp_path / "other", layout="grid", object_scale=0.5)
