"""REACT's retrieval (the dissertation, section 2.3): a task's training pairs, chosen from a pool
of image-text pairs by how close they are to the task's prompts, text-to-text (eq. 2.2) or
text-to-image (eq. 2.3); the zero-shot classification task files that name those prompts, and
the zero-shot classification that scores a customized CLIP on them (section 2.4)."""
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from conversation import DataError, require_token_id
from data import CaptionDataset, load_image, pad_sequences, read_json
from metrics import format_table
from vision import CLIPModel, preprocess_image

def read_classification_task(path: str) -> tuple[list[str], list[str], list[dict]]:
    """(classes, templates, images) of a zero-shot classification task file: JSON
    {"classes": [names], "templates": ["a photo of a {}.", ...], "images": [{"image": file,
    "label": a class name}, ...]}. Classes and templates are the task instruction (REACT's J0 and
    prompt set P, eq. 2.1; CLIP's prompt ensembling, Radford et al. 2021, section 3.1.4); the
    images are only for evaluation, and retrieval never reads them."""
    task = read_json(path, "classification task")
    classes, templates, images = (task.get(key) if isinstance(task, dict) else None
                                  for key in ("classes", "templates", "images"))
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    if not (isinstance(templates, list) and templates and all(isinstance(t, str) and "{}" in t for t in templates)):
        raise DataError(f"{path}: 'templates' must be a non-empty list of strings with a '{{}}' for the class name")
    for index, row in enumerate(images or []):
        if not (isinstance(row, dict) and isinstance(row.get("image"), str) and row.get("label") in classes):
            raise DataError(f"{path}: images[{index}] needs an 'image' file and a 'label' from 'classes', got {row!r}")
    return classes, templates, images or []


@torch.no_grad()
def embed_texts(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_token_id: int,
                batch_size: int = 256) -> torch.Tensor:
    """(texts, projection_dim) normalized CLIP text embeddings of tokenized texts (CaptionDataset.encode_texts)."""
    device = next(model.parameters()).device
    embeddings = []
    for begin in range(0, len(token_ids), batch_size):
        rows = token_ids[begin:begin + batch_size]
        input_ids, attention_mask = pad_sequences(rows, pad_token_id)
        embeddings.append(F.normalize(model.encode_text(input_ids.to(device), attention_mask.to(device)).float(),
                                      dim=-1))
    return torch.cat(embeddings).cpu()


@torch.no_grad()
def retrieve_pairs(model: torch.nn.Module, tokenizer: Tokenizer, pool: "CaptionDataset", concepts: list[list[str]],
                   per_concept: int, by: Literal["text", "image"], batch_size: int = 256) -> list[int]:
    """Indices into `pool` of the pairs REACT retrieves for a task's `concepts`, each given as its
    prompts (eq. 2.1: the concept in every template), with the frozen CLIP `model`. A pair's
    relevance to a concept is its best cosine similarity to one of the concept's prompts, by the
    pair's text (`by="text"`, T2T, eq. 2.2: closer matches) or image (`by="image"`, T2I, eq. 2.3:
    more varied captions); each concept takes its top `per_concept` pairs, and the union comes back
    without duplicates, in order of first retrieval. The search is exact (numpy); at a web-scale
    pool an approximate index (the dissertation's FAISS HNSW) replaces `np.argsort`. A pool image
    that cannot be read is reported to `pool.problems` and never retrieved."""
    if by not in ("text", "image"):
        raise ValueError(f"retrieval by must be 'text' (T2T) or 'image' (T2I), not {by!r}")
    pad_token_id = require_token_id(tokenizer, "<pad>")
    max_text_len = model.config.text_config.max_position_embeddings
    prompts = [prompt for concept in concepts for prompt in concept]
    query_embeddings = embed_texts(model, CaptionDataset.encode_texts(tokenizer, prompts, max_text_len),
                                   pad_token_id, batch_size)
    readable = list(range(len(pool)))
    if by == "text":
        pool_embeddings = embed_texts(model, pool.token_ids, pad_token_id, batch_size)
    else:
        device = next(model.parameters()).device
        pool_embeddings, readable = [], []
        for begin in range(0, len(pool), batch_size):
            samples = [(index, pool[index]) for index in range(begin, min(begin + batch_size, len(pool)))]
            for _, sample in samples:
                if "problem" in sample:
                    pool.problems.report(*sample["problem"])
            samples = [(index, sample) for index, sample in samples if "problem" not in sample]
            if samples:
                pixels = torch.stack([sample["pixel_values"] for _, sample in samples]).to(device)
                pool_embeddings.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
                readable += [index for index, _ in samples]
        pool_embeddings = torch.cat(pool_embeddings)
    prompt_scores = (query_embeddings @ pool_embeddings.t()).numpy()
    ends = np.cumsum([len(concept) for concept in concepts])
    scores = np.stack([prompt_scores[end - len(concept):end].max(axis=0) for concept, end in zip(concepts, ends)])
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :per_concept]
    chosen = dict.fromkeys(readable[position] for position in ranked.flatten())  # ordered, deduplicated
    return list(chosen)


def retrieve_for_task(model: torch.nn.Module, tokenizer: Tokenizer, pool: "CaptionDataset", task: str,
                      per_concept: int, by: Literal["text", "image"], out_path: str | os.PathLike[str]) -> str:
    """REACT's retrieval-augmented task instruction (dissertation section 2.3, eq. 2.1-2.3): the
    pool's pairs nearest to each class of the classification `task` file in its templates, by
    the frozen CLIP `model` (retrieve_pairs), written to `out_path` (LLaVA caption JSON, the
    pool's own records) so a reader can see what the model will train on. Returns that path."""
    classes, templates, _ = read_classification_task(task)
    chosen = retrieve_pairs(model, tokenizer, pool, [[t.format(name) for t in templates] for name in classes],
                            per_concept, by)
    if pool.problems.total:
        print(f"retrieval pool: {pool.problems.summary()}")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    temporary = f"{out_path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump([pool.records[index] for index in chosen], file)
    os.replace(temporary, out_path)
    print(f"retrieved {len(chosen)} of {len(pool)} pool pairs ({'text-to-text' if by == 'text' else 'text-to-image'}, "
          f"top {per_concept} for each of {len(classes)} classes in {len(templates)} templates) -> {out_path}")
    return str(out_path)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification with a CLIP model (REACT's task transfer, dissertation section 2.4)

CLASSIFICATION_TASK = "classification"  # DATA/eval/classification/{split}.json (retrieval.read_classification_task)


def run_zero_shot_classification(model: CLIPModel, tokenizer: Tokenizer, data_dir: str | Path, split: str,
                                 annotation_dir: str | Path | None = None, image_dir: str | Path | None = None,
                                 pad_to_square: bool = True, batch_size: int = 64, out_dir: str | Path | None = None,
                                 print_results: bool = True, task: str = CLASSIFICATION_TASK,
                                 limit: int | None = None) -> dict[str, float]:
    """Zero-shot accuracy of a CLIP model on a classification task file: each class is the
    normalized mean of its templates' normalized text embeddings (CLIP's prompt ensembling,
    Radford et al. 2021, section 3.1.4), each image goes to the class of highest cosine. Reports
    accuracy, the mean of the per-class accuracies and chance (1 / classes). `pad_to_square`: the
    tower sees the images as it was trained (the shapes world's CLIP pads). `limit`: the first N images."""
    annotations = Path(annotation_dir) if annotation_dir else Path(data_dir) / "eval" / task
    images = Path(image_dir) if image_dir else Path(data_dir) / "images"
    classes, templates, rows = read_classification_task(str(annotations / f"{split}.json"))
    rows = rows[:limit]
    if not rows:
        raise ValueError(f"{annotations / f'{split}.json'}: no images to classify")
    was_training = model.training
    model.eval()
    device, image_size = next(model.parameters()).device, model.config.vision_config.image_size
    with torch.inference_mode():
        prompt_ids = CaptionDataset.encode_texts(tokenizer, [t.format(name) for name in classes for t in templates],
                                                 model.config.text_config.max_position_embeddings)
        class_embeddings = F.normalize(embed_texts(model, prompt_ids, require_token_id(tokenizer, "<pad>")).view(
            len(classes), len(templates), -1).mean(1), dim=-1)
        predictions = []
        for begin in range(0, len(rows), batch_size):
            pixels = torch.stack([preprocess_image(load_image(str(images / row["image"])), image_size, pad_to_square)
                                  for row in rows[begin:begin + batch_size]])
            image_embeddings = F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu()
            predictions += (image_embeddings @ class_embeddings.t()).argmax(1).tolist()
    model.train(was_training)
    labels = [classes.index(row["label"]) for row in rows]
    correct = [prediction == label for prediction, label in zip(predictions, labels)]
    per_class = [sum(c for c, label in zip(correct, labels) if label == k) / max(1, labels.count(k))
                 for k in range(len(classes)) if k in labels]
    metrics = {"accuracy": sum(correct) / len(correct), "mean_per_class_accuracy": sum(per_class) / len(per_class),
               "chance": 1 / len(classes)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{task}_{split}.predictions.jsonl", "w", encoding="utf-8") as file:
            for row, prediction in zip(rows, predictions):
                file.write(json.dumps({**row, "prediction": classes[prediction]}) + "\n")
        (out / f"{task}_{split}.metrics.json").write_text(json.dumps(
            {"task": task, "split": split, "templates": templates, "metrics": metrics}, indent=2) + "\n")
    if print_results:
        print(format_table(task, split, metrics))
    return metrics
