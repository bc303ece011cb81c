"""Lyrics' visual refiner as data (sec. 3.1): what the refiner found in each image, stored once
per dataset and read by the MQ-Former's grounding queries and the spatial representation.

Lyrics runs three public models on every image. RAM tags it, Grounding-DINO boxes the tags, and
SAM segments the boxes. The MQ-Former then reads Grounding-DINO's per-query decoder state with
its box (256 + 4 numbers a query in the official code). Those models are far outside this
codebase, so here the refiner is a directory that producers write:

    refiner.json         {"feature_size": d, "source": "...", "images": {image file: [{"tag": str,
                          "box": [x1, y1, x2, y2]}, ...]}}: the boxes as fractions of the square
                          the tower sees (LLaVA-1.5's padded square for a non-square image)
    refiner.safetensors  one (objects, d) float tensor per image file, its rows the objects in order

Two producers write it:

- `write_oracle_refiner` is the shapes world's perfect refiner. It takes the true objects from
  tags.json, and for each object it pools the frozen tower's last-layer patch features inside
  the box (vision.pool_regions, the pooling of the CLIP region loss).
- `import_grounding_dino` converts real Grounding-DINO dumps. Each dump holds one image's decoder
  states and reference boxes, as Lyrics feeds them to the MQ-Former.

`Refiner` reads the directory and checks each image's boxes against its features.
`Refiner.mqformer_input` gives an image's objects as the grounding queries read them: each
feature followed by its box as (cx, cy, w, h), Grounding-DINO's reference-point form. The result
is padded to a fixed number of slots, and the padding slots are masked, never read as objects.
`LyricsCaptionDataset` joins the refiner to caption records for the MQ-Former's pretraining.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from checkpoints import save_safetensors
from conversation import LYRICS_SPATIAL_BOS, DataError, require_token_id, spatial_representation
from data import QFormerCaptionDataset, load_image
from pretraining import CAPTION, SPATIAL
from vision import VisionTransformer, box_in_view, pool_regions, preprocess_image

REFINER_JSON, REFINER_TENSORS = "refiner.json", "refiner.safetensors"


def write_refiner(directory: str | Path, objects: dict[str, list[dict]], features: dict[str, torch.Tensor],
                  source: str) -> Path:
    """Write a refiner directory (the format above): `objects` image file -> [{"tag", "box"}],
    `features` image file -> (len(objects[image]), d). Both files are written atomically."""
    directory = Path(directory)
    sizes = {tensor.shape[1] for tensor in features.values()}
    if len(sizes) != 1:
        raise ValueError(f"refiner features of different widths {sorted(sizes)}")
    for image, rows in objects.items():
        if image not in features or len(features[image]) != len(rows):
            raise ValueError(f"{image}: {len(rows)} objects but {len(features.get(image, []))} feature rows")
    save_safetensors({image: tensor.float().contiguous() for image, tensor in features.items()},
                     directory / REFINER_TENSORS)
    temporary = directory / f".{REFINER_JSON}.tmp"
    temporary.write_text(json.dumps({"feature_size": sizes.pop(), "source": source, "images": objects}))
    os.replace(temporary, directory / REFINER_JSON)
    return directory


class Refiner:
    """A refiner directory, read lazily: the boxes and tags at once, each image's features when
    asked, through one memory-mapped handle per process (safetensors parses the file's header of
    every image once, not per sample; a DataLoader worker opens its own)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / REFINER_JSON
        if not path.is_file() or not (self.directory / REFINER_TENSORS).is_file():
            raise FileNotFoundError(f"{self.directory}: not a refiner directory (needs {REFINER_JSON} and "
                                    f"{REFINER_TENSORS}; refiner.py writes them)")
        try:
            values = json.loads(path.read_text())
            self.feature_size = int(values["feature_size"])
            self.images: dict[str, list[dict]] = values["images"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: not a refiner file ({{feature_size, images}}): {error}") from error
        with safe_open(self.directory / REFINER_TENSORS, "pt") as tensors:
            stored = set(tensors.keys())
            for image, rows in self.images.items():
                if image not in stored:
                    raise DataError(f"{self.directory}: image {image} has {len(rows)} boxes but no features")
                shape = tensors.get_slice(image).get_shape()
                if len(shape) != 2 or shape[0] != len(rows) or shape[1] != self.feature_size:
                    raise DataError(f"{self.directory}: image {image} has {len(rows)} boxes but features of shape "
                                    f"{tuple(shape)} (expected ({len(rows)}, {self.feature_size}))")
                for index, row in enumerate(rows):
                    box = row.get("box") if isinstance(row, dict) else None
                    if not (isinstance(row, dict) and isinstance(row.get("tag"), str) and isinstance(box, list)
                            and len(box) == 4 and 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
                        raise DataError(f"{self.directory}: image {image} object {index} needs a 'tag' and a 'box' "
                                        f"[x1, y1, x2, y2] of fractions, got {row!r}")
        self.max_objects = max((len(rows) for rows in self.images.values()), default=0)
        self._tensors: Any = None

    def __getstate__(self) -> dict:  # a spawned worker opens its own handle
        return {**self.__dict__, "_tensors": None}

    @property
    def object_width(self) -> int:
        """The width of one object as the grounding queries read it: features + (cx, cy, w, h)."""
        return self.feature_size + 4

    def objects(self, image: str) -> list[dict]:
        if image not in self.images:
            raise DataError(f"{self.directory}: the refiner has no entry for image {image}")
        return self.images[image]

    def spatial_text(self, image: str) -> list[str]:
        """Each object's spatial representation (conversation.spatial_representation)."""
        return [spatial_representation(row["tag"], row["box"]) for row in self.objects(image)]

    def mqformer_input(self, image: str, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, object_width) features with boxes, and (slots,) True on real objects. `slots`:
        the padded count (default: the most objects of any image); an image with more objects than
        `slots` keeps its first ones, as a detector keeps its best queries."""
        slots = self.max_objects if slots is None else slots
        rows = self.objects(image)[:slots]
        if self._tensors is None:
            self._tensors = safe_open(self.directory / REFINER_TENSORS, "pt")
        features = self._tensors.get_tensor(image)[:slots]
        boxes = torch.tensor([row["box"] for row in rows], dtype=torch.float32).reshape(-1, 4)
        centered = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=1)
        padded = torch.zeros(max(slots, 1), self.object_width)
        padded[:len(rows)] = torch.cat([features, centered], dim=1)
        present = torch.zeros(max(slots, 1), dtype=torch.bool)
        present[:len(rows)] = True
        return padded, present


# ----------------------------------------------------------------------------------------------
# Producers


@torch.no_grad()
def write_oracle_refiner(world: str | Path, tower_path: str | Path, out_dir: str | Path,
                         pad_to_square: bool = True, batch_size: int = 64) -> Path:
    """The shapes world's perfect refiner: every object of tags.json with its true box, its tag
    the object's name, its features the frozen tower's last layer pooled inside the box. This is
    what Lyrics' refiner would give with perfect tagging and detection (sec. 3.1)."""
    world = Path(world)
    tower = VisionTransformer.from_pretrained(tower_path).eval()
    entries = json.loads((world / "tags.json").read_text())
    objects, features = {}, {}
    names = sorted(entries)
    for begin in range(0, len(names), batch_size):
        batch = names[begin:begin + batch_size]
        images = [load_image(str(world / "images" / name)) for name in batch]
        pixels = torch.stack([preprocess_image(image, tower.config.image_size, pad_to_square) for image in images])
        hidden = tower(pixels)[-1]
        boxes, owners = [], []
        for row, (name, image) in enumerate(zip(batch, images)):
            objects[name] = [{"tag": entry["name"],
                              "box": [round(v, 4) for v in box_in_view(entry["box"], image.size, pad_to_square)]}
                             for entry in entries[name]["objects"]]
            boxes += [found["box"] for found in objects[name]]
            owners += [row] * len(objects[name])
        pooled = pool_regions(hidden, torch.tensor(boxes).reshape(-1, 4), torch.tensor(owners, dtype=torch.long))
        counts = [len(objects[name]) for name in batch]
        for name, rows in zip(batch, pooled.split(counts)):
            features[name] = rows
    return write_refiner(out_dir, objects, features, source=f"oracle: {world / 'tags.json'}, tower {tower_path}")


def import_grounding_dino(dump_dir: str | Path, image_folder: str | Path, out_dir: str | Path,
                          pad_to_square: bool = True) -> Path:
    """A refiner from Grounding-DINO dumps, one `<image file>.safetensors` per image in
    `dump_dir`, holding what the official Lyrics code feeds its MQ-Former:

        hidden_states  (queries, 256)  the decoder's last-layer state of every query (hs[-1])
        boxes          (queries, 4)    its reference box (reference[-1]): cx, cy, w, h in [0, 1]
                                       of the image Grounding-DINO saw (the original image)
        metadata "tags": a JSON list of each query's phrase (RAM's tag it matched)

    The boxes move into the frame the tower sees (the padded square, `pad_to_square`), which
    needs each image's size from `image_folder`."""
    objects, features = {}, {}
    for path in sorted(Path(dump_dir).glob("*.safetensors")):
        image = path.name.removesuffix(".safetensors")
        with safe_open(path, "pt") as dump:
            if not {"hidden_states", "boxes"} <= set(dump.keys()):
                raise DataError(f"{path}: a Grounding-DINO dump needs 'hidden_states' and 'boxes'")
            hidden, boxes = dump.get_tensor("hidden_states"), dump.get_tensor("boxes")
            tags: Any = json.loads((dump.metadata() or {}).get("tags", "null"))
        if len(hidden) != len(boxes) or not isinstance(tags, list) or len(tags) != len(boxes):
            raise DataError(f"{path}: {len(hidden)} states, {len(boxes)} boxes and "
                            f"{len(tags) if isinstance(tags, list) else 'no'} tags; one of each per query")
        width, height = load_image(str(Path(image_folder) / image)).size
        corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1).clamp(0, 1)
        pixels = corners * torch.tensor([width, height, width, height])
        objects[image] = [{"tag": tag, "box": [round(v, 4) for v in box_in_view(box, (width, height), pad_to_square)]}
                          for tag, box in zip(tags, pixels.tolist())]
        features[image] = hidden
    if not objects:
        raise DataError(f"{dump_dir}: no <image file>.safetensors dumps")
    return write_refiner(out_dir, objects, features, source=f"Grounding-DINO dumps: {dump_dir}")


# ----------------------------------------------------------------------------------------------
# The MQ-Former's pretraining data (Lyrics sec. 3.2)


class LyricsCaptionDataset(QFormerCaptionDataset):
    """Caption records (LLaVA JSON, as BLIP-2's stage 1 reads them) joined to the refiner: each
    item's text is "[BOS] <br>...</br> ... [CLS] caption [SEP]" in the Q-Former's tokenizer with
    Lyrics' tokens (conversation.with_lyrics_tokens), with `text_segments` (SPATIAL / CAPTION per
    token), `object_spans` (the object each spatial token spells, -1 elsewhere: MSP masks whole
    objects), and the objects as the grounding queries read them (`object_features` padded to the
    refiner's most objects, `object_mask`). A text longer than `max_text_len` loses whole objects
    from its end; an image the refiner lacks is reported and skipped, as a missing image is."""

    def __init__(self, json_path: str, image_folder: str, qformer_tokenizer: Tokenizer, image_size: int,
                 refiner: Refiner, pad_to_square: bool = False, max_text_len: int = 256, on_error: str = "skip"):
        self.refiner = refiner
        super().__init__(json_path, image_folder, qformer_tokenizer, image_size, pad_to_square, max_text_len, on_error)
        bos = require_token_id(qformer_tokenizer, LYRICS_SPATIAL_BOS)
        self.text_ids, self.text_spans = [], []
        for image_path, caption_ids in zip(self.image_paths, self.token_ids):
            ids, spans = [bos], [-1]
            pieces = qformer_tokenizer.encode_batch(refiner.spatial_text(image_path), add_special_tokens=False)
            for index, piece in enumerate(pieces):
                if len(ids) + len(piece.ids) + len(caption_ids) > max_text_len:
                    break
                ids += piece.ids
                spans += [index] * len(piece.ids)
            self.text_ids.append(ids + caption_ids)
            self.text_spans.append(spans + [-1] * len(caption_ids))
        self.lengths = [len(ids) for ids in self.text_ids]

    def _validate(self, record: Any) -> tuple[str, str, list[dict]]:
        validated = super()._validate(record)
        self.refiner.objects(record["image"])  # a DataError naming the image if the refiner lacks it
        return validated

    def _sample(self, index: int) -> dict[str, Any]:
        sample = super()._sample(index)
        spatial_length = len(self.text_ids[index]) - len(self.token_ids[index])
        features, present = self.refiner.mqformer_input(self.image_paths[index])
        return {**sample, "input_ids": torch.tensor(self.text_ids[index]),
                "text_segments": torch.tensor([SPATIAL] * spatial_length + [CAPTION] * len(self.token_ids[index])),
                "object_spans": torch.tensor(self.text_spans[index]), "object_features": features,
                "object_mask": present}
