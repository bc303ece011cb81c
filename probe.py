"""Probes: quick measurements that say where a recipe loses what it needs, without rerunning it.

    python probe.py vision out/shapes_llava15/clip                    # a CLIP checkpoint (stage 0a)
    python probe.py vision out/shapes_llava15/finetune --layer -2     # the tower inside a LLaVA checkpoint
    python probe.py image-use out/shapes_llava15/finetune
    python probe.py image-use out/shapes_llava15/finetune --data data/shapes/train/instruct.json --samples 256
    python probe.py text-binding write data/text_binding
    python train.py configs/shapes_llava15.py --stage lm --out_dir=out/text_binding \\
        --lm.data=data/text_binding/train.jsonl --lm.max_steps=2000 --stop_after_steps=250
    python probe.py text-binding score out/text_binding/checkpoints/lm --data data/text_binding
    (again with train.py's --resume for the next 250 steps, and so on)
    python probe.py text-loss out/shapes_lynx/instruct                # any MLLM or LlamaForCausalLM checkpoint
    python probe.py lookup --steps 1200 --every 200                  # also --hidden-size, --filler, --seed
    python probe.py vqa-compare out/A/eval/vqa/vqa_val.predictions.jsonl out/B/eval/vqa/vqa_val.predictions.jsonl

vision: linear probes on a vision tower, for the object attributes of the shapes world its
features hold. image-use: does a LLaVA checkpoint use its image (answer loss with its own image,
another's, zeros)? text-binding: can the language model answer POPE's existence question from a
description it has just read, with the vision tower out of the picture? `write` makes the
documents for train.py's lm stage, `score` measures the yes / no accuracy of its checkpoint.
lookup: how many questions the LLaMA needs to learn POPE's comparison with perfect vision (the
scene as discrete tokens), and what a wider model or the tokens between a question and its answer
change. text-loss: how much language ability an MLLM's LLM kept (Lynx's question: adapters vs
finetuning the whole LLM), as its loss on held-out text documents of the world. vqa-compare: two
runs' VQA accuracy question by question, per slice of the questions, with the paired standard error.
`python probe.py SUBCOMMAND --help` says more. train.py draws its logs with the curves at the end
(`plot_curves`): the training loss per modality, and the held-out metrics of the last stage.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Tokenizer

import data
import shapes
from checkpoints import read_config_json
from conversation import BOS_TOKEN, require_token_id
from layers import IGNORE_INDEX, row_log_likelihoods
from model import MLLM, LanguageModel, TextConfig
import vision
from vision import VisionTransformer

SHAPES_TOKENIZER = "data/shapes/tokenizer.json"


def add_command(commands: argparse._SubParsersAction, name: str,
                run: Callable[[argparse.Namespace], None] | None = None,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help is its function's docstring, so the text lives in one place; a
    group of subcommands has no function and brings its description. bench.py's subcommands are
    made here too."""
    description = description or inspect.getdoc(run)
    parser = commands.add_parser(name, help=description.split("\n")[0], description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


# vision: which object attributes do the tower's features hold?

ATTRIBUTES = {"color": shapes.COLORS, "size": shapes.SIZES, "shape": shapes.SHAPES}


def load_vision_tower(path: str) -> VisionTransformer:
    """The tower of a CLIP checkpoint, or of a LLaVA one (stage 1 / 2 output, llava-hf layout)."""
    if read_config_json(path).get("model_type") == "llava":
        return MLLM.from_pretrained(path).vision_tower
    return VisionTransformer.from_pretrained(path)


@torch.no_grad()
def object_features(tower: VisionTransformer, scenes: list[shapes.Scene], layer: int,
                    batch_size: int = 100) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objects, 2 * width) features: the mean of the layer's patches under each object's box
    concatenated with the patch at its center, in LLaVA-1.5's padded square; and each object's
    attribute labels (indices into ATTRIBUTES' tuples)."""
    tower.eval()
    grid = tower.config.image_size // tower.config.patch_size
    features, labels = [], {name: [] for name in ATTRIBUTES}
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start:start + batch_size]
        pixels = torch.stack([vision.preprocess_image(shapes.render_scene(scene), tower.config.image_size, True)
                              for scene in batch])
        patches = tower(pixels)[layer][:, 1:].unflatten(1, (grid, grid))  # CLS dropped, as LLaVA-1.5 does
        for image, scene in zip(patches, batch):
            for obj in scene.objects:
                x0, y0, x1, y1 = shapes.padded_square_box(obj.box, scene.width, scene.height)
                columns = slice(int(x0 * grid), max(int(x0 * grid) + 1, math.ceil(x1 * grid)))
                rows = slice(int(y0 * grid), max(int(y0 * grid) + 1, math.ceil(y1 * grid)))
                center = image[min(grid - 1, int((y0 + y1) / 2 * grid)), min(grid - 1, int((x0 + x1) / 2 * grid))]
                features.append(torch.cat([image[rows, columns].mean((0, 1)), center]))
                for name, values in ATTRIBUTES.items():
                    labels[name].append(values.index(getattr(obj, name)))
    return torch.stack(features), {name: torch.tensor(values) for name, values in labels.items()}


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train_fraction: float = 0.8,
                          steps: int = 300, seed: int = 0) -> tuple[float, float]:
    """(held-out accuracy of a softmax classifier fit on the first train_fraction of the rows,
    accuracy of always answering the most frequent training label). Features are standardized
    with the training rows' statistics."""
    split = int(train_fraction * len(features))
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-5
    features = (features - mean) / std
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(classifier(features[:split]), labels[:split]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (classifier(features[split:]).argmax(-1) == labels[split:]).float().mean().item()
    majority = (labels[split:] == labels[:split].mode().values).float().mean().item()
    return accuracy, majority


def probe_vision(args: argparse.Namespace) -> None:
    """Linear probes on a vision tower: which object attributes of the shapes world do its features hold?

    Every question of the miniature recipe (configs/shapes_llava15.py) first needs an object's
    color, size or shape from the image tokens. LLaVA-1.5 freezes its vision tower, so what the
    tower does not encode, no later stage can read. This probe renders training scenes of the
    world from their seed (no files needed) and runs the tower on them. For each object it takes
    the layer's patch features under the object's box (their mean, next to the patch at the box
    center). On 80% of the objects it fits one linear classifier per attribute, and it reports the
    accuracy on the other 20%, beside the majority-class baseline. A stage-0a CLIP takes about
    20 s, so the tower can be tuned without running the whole 20-minute job.
    """
    tower = load_vision_tower(args.checkpoint)
    scenes = [shapes.sample_scene(args.seed, "train", index, index + 1, args.image_size)
              for index in range(args.images)]
    features, labels = object_features(tower, scenes, args.layer)
    print(f"{args.checkpoint}, layer {args.layer}: {len(features)} objects of {len(scenes)} scenes")
    print("| attribute | linear probe accuracy | majority baseline |\n|---|---|---|")
    for name, values in labels.items():
        accuracy, majority = linear_probe_accuracy(features, values)
        print(f"| {name} | {accuracy:.3f} | {majority:.3f} |")


# image-use: does a LLaVA checkpoint read its image?

IMAGE_CONDITIONS = ("own image", "another sample's image", "zeros")


def sample_kind(record_id: str) -> str:
    """"000000000012_grounding" -> "grounding"; ids without a kind suffix count as "all"."""
    suffix = str(record_id).rsplit("_", 1)[-1]
    return suffix if suffix.isalpha() else "all"


@torch.no_grad()
def rows_of_other_images(files: list[str]) -> list[int]:
    """For each row, the first row after it (cyclically) whose image file differs; the row itself
    when every row shows the same file."""
    count = len(files)
    return [next(((row + shift) % count for shift in range(1, count) if files[(row + shift) % count] != files[row]),
                 row) for row in range(count)]


def image_use(model: MLLM, dataset: data.InstructionDataset, num_samples: int,
              batch_size: int = 16) -> dict[str, dict[str, float]]:
    """{kind: {condition: mean answer-token loss}} over the first num_samples image samples. Another
    sample's image is the next one in the batch showing another image file (the world's records
    come in runs of one image's samples, so the plain next sample would often show the same)."""
    model.eval()
    indices = [i for i, has_image in enumerate(dataset.has_image) if has_image][:num_samples]
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(IMAGE_CONDITIONS, 0.0))
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        batch = data.collate([dataset[i] for i in rows], model.config.pad_token_id)
        pixels = batch["pixel_values"]
        kinds = [sample_kind(dataset.records[i].get("id", "")) for i in rows]
        others = rows_of_other_images([dataset.records[i]["image"] for i in rows])
        for condition, images in zip(IMAGE_CONDITIONS, (pixels, pixels[others], torch.zeros_like(pixels))):
            logits = model(batch["input_ids"], images, batch["attention_mask"])
            log_likelihoods, num_tokens = row_log_likelihoods(logits, batch["labels"])
            for kind, log_likelihood in zip(kinds, log_likelihoods.tolist()):
                sums[kind][condition] -= log_likelihood
        for kind, count in zip(kinds, num_tokens.tolist()):
            counts[kind] += count
    return {kind: {c: total / max(1, counts[kind]) for c, total in sums[kind].items()} for kind in sorted(sums)}


def probe_image_use(args: argparse.Namespace) -> None:
    """Does a trained LLaVA checkpoint use its image?

    The answer loss with each sample's own image, with another sample's image, and with the image
    replaced by zeros (eval.py's --blind). A model that reads the image scores its own image
    clearly best; a model that answers from the question alone scores all three alike. The loss
    is LLaVA's (Visual Instruction Tuning, Eq. 3: mean cross-entropy over the answer tokens),
    grouped by the kind of sample (the shapes world's ids end in it: vqa, grounding, conversation,
    detail, caption, choice). It takes seconds, where the eval's with-image vs blind comparison
    needs a whole stage 2 first and mixes in decoding.
    """
    model = MLLM.from_pretrained(args.checkpoint)
    if model.high_resolution is not None:
        raise SystemExit(f"{args.checkpoint}: image-use swaps images between samples, and with AnyRes an image's "
                         "token count follows its size; probe the same recipe at one tile instead")
    config = model.config
    dataset = data.InstructionDataset(args.data, args.image_folder, data.load_tokenizer(args.tokenizer),
                                      args.template, config.image_token_index, model.num_image_tokens,
                                      config.vision_config.image_size, config.image_aspect_ratio == "pad",
                                      max_seq_len=config.text_config.max_position_embeddings)
    results = image_use(model, dataset, args.samples)
    print(f"{args.checkpoint} on {args.data}: answer-token loss (lower is better)")
    print("| sample kind | " + " | ".join(IMAGE_CONDITIONS) + " |")
    print("|---|" + "---|" * len(IMAGE_CONDITIONS))
    for kind, losses in results.items():
        print(f"| {kind} | " + " | ".join(f"{losses[c]:.3f}" for c in IMAGE_CONDITIONS) + " |")


# text-binding: can the LLaMA compare a question with a scene it has read?

TEXT_BINDING = """Can the tiny LLaMA answer "Is there a blue square?" from a description it has just read?

`write` makes the language-model documents, train.py's lm stage trains on them, and `score`
measures the yes / no accuracy of the resulting checkpoint on held-out scenes."""
ANSWERS = (" yes", " no")


def binding_document(scene: shapes.Scene, rng: np.random.Generator,
                     num_questions: int) -> tuple[str, list[tuple[str, str]]]:
    """(caption, [(question, answer)]): POPE's question about the scene, asked num_questions times."""
    caption = shapes.capitalize(shapes.pick(rng, shapes.caption_variants(scene)))
    questions = []
    for _ in range(num_questions):
        category, present = shapes.existence_probe(rng, scene)
        questions.append((f"Is there {shapes.with_article(category)} in the image?", ANSWERS[0 if present else 1]))
    return caption, questions


def write_documents(out_dir: str | Path, seed: int = 0, num_train: int = 20000, num_heldout: int = 500,
                    num_questions: int = 8) -> None:
    """train.jsonl ({"text"}, for the lm stage) from the world's training scenes and heldout.jsonl
    ({"context", "answer"}: a caption and one question) from its eval scenes. Only the scenes are
    drawn, no images: the text is all this probe needs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, count, name in (("train", num_train, "train.jsonl"), ("eval", num_heldout, "heldout.jsonl")):
        rows = []
        for index in range(count):
            scene = shapes.sample_scene(seed, split, index, index + 1, shapes.DEFAULT_IMAGE_SIZE)
            rng = np.random.default_rng([seed, shapes.SPLITS.index(split), index])
            caption, questions = binding_document(scene, rng, num_questions)
            if split == "train":
                rows.append({"text": caption + "".join(f" {q}{a}." for q, a in questions)})
            else:
                rows.append({"context": f"{caption} {questions[0][0]}", "answer": questions[0][1]})
        shapes.write_jsonl(out_dir / name, rows)


def answer_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of " yes" and " no", which the accuracy compares: each must be a single token."""
    ids = [tokenizer.encode(answer, add_special_tokens=False).ids for answer in ANSWERS]
    if any(len(token_ids) != 1 for token_ids in ids):
        raise ValueError(f"the tokenizer splits the answers {ANSWERS} into {ids}; the probe needs one token each")
    return [token_ids[0] for token_ids in ids]


@torch.no_grad()
def yes_no_accuracy(model: LanguageModel, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of rows whose " yes" vs " no" next-token logit after the context picks the answer."""
    model.eval()
    yes_id, no_id = answer_token_ids(tokenizer)
    bos_id = require_token_id(tokenizer, BOS_TOKEN)
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        encodings = tokenizer.encode_batch([row["context"] for row in chunk], add_special_tokens=False)
        encoded = [[bos_id] + encoding.ids for encoding in encodings]
        batch = data.collate([{"input_ids": torch.tensor(ids), "pixel_values": None} for ids in encoded],
                             model.config.pad_token_id)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        last = logits[torch.arange(len(chunk)), batch["attention_mask"].sum(1) - 1]
        says_yes = (last[:, yes_id] > last[:, no_id]).tolist()
        correct += sum(yes == (row["answer"] == ANSWERS[0]) for yes, row in zip(says_yes, chunk))
    return correct / len(rows)


def write_text_binding(args: argparse.Namespace) -> None:
    """Write train.jsonl and heldout.jsonl: captions followed by POPE's existence questions.

    POPE's question compares the question with its context: half the answers are yes, so neither
    the question alone nor the context alone predicts the answer, and a model gains nothing until
    it compares the two. This probe asks whether the language model learns that comparison at all
    when the objects are given as TEXT, with the vision tower out of the picture. The documents
    are a scene's caption, then existence questions with POPE's negatives
    (shapes.existence_probe: half present, the absent ones half random, half sharing a color or a
    shape with a present object), each answered. train.py's lm stage trains on train.jsonl.
    """
    write_documents(args.out_dir, args.seed, args.num_train, num_questions=args.questions)


def score_text_binding(args: argparse.Namespace) -> None:
    """Yes / no accuracy of a language model on heldout.jsonl.

    Teacher-forced, on held-out scenes: the first question after each caption, where chance is
    0.5. A model that has not learned to compare the question with the caption stays at chance.
    """
    lines = (Path(args.data) / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    model = LanguageModel.from_pretrained(args.checkpoint)
    accuracy = yes_no_accuracy(model, data.load_tokenizer(args.tokenizer), rows)
    yes_share = sum(row["answer"] == ANSWERS[0] for row in rows) / len(rows)
    print(f"{args.checkpoint}: yes / no accuracy {accuracy:.3f} on {len(rows)} held-out questions "
          f"(chance 0.5; yes is the answer of {yes_share:.3f})")


# lookup: how fast does the LLaMA learn to search its context for a named object, with perfect vision?

def lookup_batch(rng: np.random.Generator, size: int, slots: int, filler: int,
                 sharing: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (size, 2 * slots + 4 + filler), answers (size,)) of the idealized existence task.

    Each row is a scene as discrete tokens: 1-6 objects, a color token and a shape token each, in
    random slots of `slots` (the others EMPTY, EMPTY), then IS <color> <shape> ?, then `filler`
    constant tokens (what a chat template puts between a question and its answer: LLaVA-1.5's
    "\\nAnswer the question using a single word or phrase. ASSISTANT:" is 15 of the world's tokens).
    The answer (YES / NO) is yes half the time; of the absent objects asked about, a share
    `sharing` has a color or a shape of a present one (0.5: as shapes.existence_probe draws POPE's),
    the others are random."""
    colors, kinds = len(shapes.COLORS), len(shapes.SHAPES)
    empty = 0  # then the color tokens, the shape tokens, IS, ?, YES, NO and the filler
    is_token, question, yes, no = (colors + kinds + offset for offset in (1, 2, 3, 4))
    fill = list(range(5 + colors + kinds, 5 + colors + kinds + filler))
    rows, answers = [], []
    for _ in range(size):
        count = int(rng.integers(1, shapes.MAX_OBJECTS + 1))
        objects = [(int(o) // kinds, int(o) % kinds) for o in rng.permutation(colors * kinds)[:count]]
        scene = [empty, empty] * slots
        for slot, (color, kind) in zip(rng.permutation(slots)[:count].tolist(), objects):
            scene[2 * slot:2 * slot + 2] = [1 + color, 1 + colors + kind]
        if rng.random() < 0.5:
            asked, answer = objects[int(rng.integers(count))], yes
        else:
            absent = [(c, k) for c in range(colors) for k in range(kinds) if (c, k) not in objects]
            shared = [(c, k) for c, k in absent if any(c == oc or k == ok for oc, ok in objects)]
            pool = shared if shared and rng.random() < sharing else absent
            asked, answer = pool[int(rng.integers(len(pool)))], no
        rows.append(scene + [is_token, 1 + asked[0], 1 + colors + asked[1], question] + fill)
        answers.append(answer)
    return torch.tensor(rows), torch.tensor(answers)


def probe_lookup(args: argparse.Namespace) -> None:
    """Train a LLaMA from scratch (by default the main job's, 4 x 192) on the idealized existence
    task (lookup_batch) and print its held-out accuracy every --every steps.

    This is POPE's question with perfect vision and no chat: each object is two discrete tokens,
    the question follows the scene, and only the answer is supervised. It measures how many
    questions the comparison costs this model (chance is 0.5), and what the tokens between the
    question and the answer (--filler) add to that cost."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vocab = 5 + len(shapes.COLORS) + len(shapes.SHAPES) + args.filler
    model = LanguageModel(TextConfig(vocab_size=vocab, hidden_size=args.hidden_size,
                                     intermediate_size=args.hidden_size * 8 // 3, num_hidden_layers=args.layers,
                                     num_attention_heads=args.hidden_size // 32, num_key_value_heads=2,
                                     max_position_embeddings=2 * args.slots + 4 + args.filler))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    held_out, held_out_answers = lookup_batch(np.random.default_rng(args.seed + 1), 1000, args.slots, args.filler,
                                              args.sharing)
    for step in range(1, args.steps + 1):
        tokens, answers = lookup_batch(rng, args.batch_size, args.slots, args.filler, args.sharing)
        loss = F.cross_entropy(model(tokens)[:, -1], answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                accuracy = (model(held_out)[:, -1].argmax(-1) == held_out_answers).float().mean().item()
            print(f"filler {args.filler}, sharing {args.sharing}, {args.layers} x {args.hidden_size}, lr {args.lr}: "
                  f"step {step}, {step * args.batch_size} questions, held-out accuracy {accuracy:.3f}", flush=True)


# text-loss: the language ability an MLLM's LLM keeps

@torch.no_grad()
def probe_text_loss(args: argparse.Namespace) -> None:
    """Mean next-token loss (nats per token) of a checkpoint's LLM on held-out text, no image.

    The documents are the world's language-model documents (shapes.text_document: caption,
    description, questions and answers), written for the eval split's scenes, which no training
    document describes. An MLLM is measured through its language model with whatever the recipe
    put there (Lynx's adapters, a finetuned LLaMA); compare with the LM stage's own checkpoint.
    """
    config = read_config_json(args.checkpoint)
    model = (MLLM.from_pretrained(args.checkpoint).language_model if "text_config" in config
             else LanguageModel.from_pretrained(args.checkpoint)).eval()
    tokenizer = data.load_tokenizer(args.tokenizer)
    scenes = [shapes.sample_scene(args.seed, "eval", index, index + 1, args.image_size) for index in range(args.documents)]
    texts = [shapes.text_document(shapes.annotation_rng(scene, "train"), scene) for scene in scenes]
    bos_id = require_token_id(tokenizer, BOS_TOKEN)
    total, count = 0.0, 0
    for start in range(0, len(texts), args.batch_size):
        encoded = [[bos_id] + encoding.ids for encoding in tokenizer.encode_batch(texts[start:start + args.batch_size],
                                                                                   add_special_tokens=False)]
        batch = data.collate([{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids), "pixel_values": None}
                              for ids in encoded], model.config.pad_token_id)
        _, loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        predicted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model's loss is their mean
        total, count = total + float(loss) * predicted, count + predicted
    print(f"{args.checkpoint}: held-out text loss {total / count:.4f} nats / token over {count} tokens "
          f"({len(texts)} documents of eval scenes)")


# vqa-compare: is one run's VQA accuracy really above another's?

# Slices of the shapes world's questions, by their words (NAME=REGEX on the question text).
VQA_SLICES = ("counting=^How many", "color=^What color", "shape=^What shape",
              r"small object=\b(small|tiny|little)\b")


def paired_accuracy(first: list[dict], second: list[dict], pattern: str = "") -> dict[str, float]:
    """Both runs' mean VQA accuracy over the questions whose text matches `pattern` (re.search),
    the mean difference and its standard error (the differences' standard deviation / sqrt(n)):
    the two runs answered the same questions, so the difference is measured question by question."""
    second_by_id = {row["id"]: row for row in second}
    if set(second_by_id) != {row["id"] for row in first}:
        raise ValueError("the two predictions files hold different questions (ids differ)")
    pairs = [(row["accuracy"], second_by_id[row["id"]]["accuracy"]) for row in first
             if re.search(pattern, row["question"])]
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} questions match {pattern!r}")
    differences = [a - b for a, b in pairs]
    mean = sum(differences) / len(pairs)
    variance = sum((d - mean) ** 2 for d in differences) / (len(pairs) - 1)
    return {"questions": len(pairs), "first": sum(a for a, _ in pairs) / len(pairs),
            "second": sum(b for _, b in pairs) / len(pairs), "difference": mean,
            "standard_error": math.sqrt(variance / len(pairs))}


def read_predictions(path: str) -> list[dict]:
    def invalid(line: int, error: json.JSONDecodeError) -> None:
        raise ValueError(f"{path} line {line}: not JSON ({error})")

    return [record for _, record in data.read_json_lines(path, invalid, "predictions file")]


def probe_vqa_compare(args: argparse.Namespace) -> None:
    """Two runs' VQA accuracy on the same questions (eval.py's vqa predictions.jsonl), per slice.

    The difference is taken question by question, so its standard error is the paired one,
    smaller than either accuracy's own when the runs agree on most questions. A difference within
    two standard errors is not a difference a second seed would be sure to repeat.
    """
    first, second = (read_predictions(path) for path in (args.first, args.second))
    print(f"first: {args.first}\nsecond: {args.second}\n")
    print("| questions | n | first | second | first - second | standard error |\n|---|---|---|---|---|---|")
    for name, pattern in [("all", ""), *(entry.split("=", 1) for entry in args.slice or VQA_SLICES)]:
        paired = paired_accuracy(first, second, pattern)
        print(f"| {name} | {paired['questions']} | {paired['first']:.3f} | {paired['second']:.3f} | "
              f"{paired['difference']:+.3f} | {paired['standard_error']:.3f} |")


# ----------------------------------------------------------------------------------------------
# Curves (train.py draws its logs with these)

CURVE_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def plot_curves(series: dict[str, tuple[list[int], list[float]]], path: Path, title: str, smoothing: float = 0.0) -> None:
    """A small PNG of named curves over steps, drawn with pillow (no plotting dependency). With
    `smoothing`, each curve is drawn faint as measured and solid as its exponential moving average
    (the weight of the past, as TensorBoard's slider)."""
    width, height, margin = 720, 400, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    drawn = {name: (steps, values) for name, (steps, values) in series.items() if len(values) >= 2}
    if drawn:
        first, last = min(s[0] for s, _ in drawn.values()), max(s[-1] for s, _ in drawn.values())
        low, high = min(min(v) for _, v in drawn.values()), max(max(v) for _, v in drawn.values())
        span_x, span_y = max(1, last - first), max(1e-12, high - low)

        def point(step: int, value: float) -> tuple[float, float]:
            return (margin + (step - first) / span_x * (width - 1.5 * margin),
                    height - margin - (value - low) / span_y * (height - 1.5 * margin))

        for index, (name, (steps, values)) in enumerate(drawn.items()):
            color = CURVE_COLORS[index % len(CURVE_COLORS)]
            if smoothing:
                faint = tuple(255 - (255 - c) // 4 for c in color)
                draw.line([point(s, v) for s, v in zip(steps, values)], fill=faint, width=1)
                average, smoothed = values[0], []
                for value in values:
                    average = smoothing * average + (1 - smoothing) * value
                    smoothed.append(average)
                values = smoothed
            draw.line([point(s, v) for s, v in zip(steps, values)], fill=color, width=2)
            draw.text((width - 200, margin // 2 + 6 + 14 * index), name, fill=color)
        draw.text((4, margin // 2), f"{high:.3f}", fill="black")
        draw.text((4, height - margin - 10), f"{low:.3f}", fill="black")
        draw.text((margin, height - margin + 6), f"step {first}", fill="black")
        draw.text((width - 3 * margin, height - margin + 6), f"step {last}", fill="black")
    draw.text((margin, 4), title, fill="black")
    image.save(path)


def plot_held_out(points: list[dict], path_stem: Path, stage_name: str, samples: int) -> None:
    """The held-out curve: rates (accuracies, F1, yes-ratio: within [0, 1]) in PATH_STEM.png,
    unbounded scores (CIDEr) apart in PATH_STEM_scores.png, so that neither flattens the other."""
    series = {key: ([p["step"] for p in points], [p[key] for p in points]) for key in points[0] if key != "step"}
    rates = {key: curve for key, curve in series.items() if all(0 <= value <= 1 for value in curve[1])}
    scores = {key: curve for key, curve in series.items() if key not in rates}
    title = f"{stage_name}: held-out, the first {samples} samples of each task"
    for suffix, group in (("", rates), ("_scores", scores)):
        if group:
            plot_curves(group, path_stem.with_name(path_stem.name + suffix + ".png"), title)


def plot_training_loss(records: list[dict], path: Path, stage_name: str) -> None:
    """The loss per step, per modality when the stage has text-only steps (each step holds one
    modality: data.ModalityLengthGroupedSampler), smoothed, so that rare text-only steps neither
    hide in nor spike the image curve."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        steps, values = series.setdefault(record.get("modality", "loss"), ([], []))
        steps.append(record["step"])
        values.append(record["loss"])
    plot_curves(series, path, f"{stage_name}: training loss (faint: each step; solid: smoothed)", smoothing=0.9)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (sys.argv when argv is None; the tests pass a list) and run the subcommand."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    vision = add_command(commands, "vision", probe_vision)
    vision.add_argument("checkpoint", help="a CLIP or LLaVA checkpoint directory")
    vision.add_argument("--layer", type=int, default=-2, help="hidden state to probe (LLaVA-1.5 reads -2)")
    vision.add_argument("--images", type=int, default=1200, help="training scenes of the world to render")
    vision.add_argument("--seed", type=int, default=0, help="the world's seed")
    vision.add_argument("--image-size", type=int, default=shapes.DEFAULT_IMAGE_SIZE, help="the world's longer side")

    image = add_command(commands, "image-use", probe_image_use)
    image.add_argument("checkpoint", help="a LLaVA checkpoint directory (llava-hf layout)")
    image.add_argument("--data", default="data/shapes/train/instruct.json", help="LLaVA instruction JSON")
    image.add_argument("--image-folder", default="data/shapes/images")
    image.add_argument("--tokenizer", default=SHAPES_TOKENIZER)
    image.add_argument("--template", default="vicuna_v1")
    image.add_argument("--samples", type=int, default=512)

    binding = add_command(commands, "text-binding", description=TEXT_BINDING)
    actions = binding.add_subparsers(dest="action", required=True)
    write = add_command(actions, "write", write_text_binding)
    write.add_argument("out_dir")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--num-train", type=int, default=20000)
    write.add_argument("--questions", type=int, default=8, help="questions per training document")
    score = add_command(actions, "score", score_text_binding)
    score.add_argument("checkpoint", help="a LlamaForCausalLM directory (train.py's lm stage)")
    score.add_argument("--data", default="data/text_binding")
    score.add_argument("--tokenizer", default=SHAPES_TOKENIZER)

    text_loss = add_command(commands, "text-loss", probe_text_loss)
    text_loss.add_argument("checkpoint", help="an MLLM or LlamaForCausalLM checkpoint directory")
    text_loss.add_argument("--tokenizer", default=SHAPES_TOKENIZER)
    text_loss.add_argument("--documents", type=int, default=300, help="eval scenes of the world to describe")
    text_loss.add_argument("--batch-size", type=int, default=32)
    text_loss.add_argument("--seed", type=int, default=0, help="the world's seed")
    text_loss.add_argument("--image-size", type=int, default=shapes.DEFAULT_IMAGE_SIZE, help="the world's longer side")

    lookup = add_command(commands, "lookup", probe_lookup)
    lookup.add_argument("--slots", type=int, default=16, help="object slots of a scene")
    lookup.add_argument("--filler", type=int, default=0, help="constant tokens between the question and the answer")
    lookup.add_argument("--sharing", type=float, default=0.5,
                        help="share of the absent objects asked about that share a color or shape with a present one")
    lookup.add_argument("--hidden-size", type=int, default=192, help="the LLaMA's width (heads of 32)")
    lookup.add_argument("--layers", type=int, default=4)
    lookup.add_argument("--steps", type=int, default=500)
    lookup.add_argument("--batch-size", type=int, default=128)
    lookup.add_argument("--lr", type=float, default=1e-3)
    lookup.add_argument("--every", type=int, default=100, help="steps between held-out accuracies")
    lookup.add_argument("--seed", type=int, default=0)

    compare = add_command(commands, "vqa-compare", probe_vqa_compare)
    compare.add_argument("first", help="eval.py's VQA predictions jsonl of one run")
    compare.add_argument("second", help="the same questions' predictions of another run")
    compare.add_argument("--slice", action="append", metavar="NAME=REGEX",
                         help=f"a slice of the questions (repeatable; default: {', '.join(VQA_SLICES)})")

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
