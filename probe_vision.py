"""Linear probes on a vision tower: which object attributes of the shapes world do its features hold?

Every question of the miniature recipe (configs/shapes_llava15.py) first needs an object's color,
size or shape from the image tokens. LLaVA-1.5 freezes its vision tower, so what the tower does not
encode, no later stage can read. This script renders training scenes of the world from their
seed (no files needed) and runs the tower on them. For each object it takes the layer's patch
features under the object's box (their mean, next to the patch at the box center). On 80% of the
objects it fits one linear classifier per attribute, and it reports the accuracy on the other 20%,
beside the majority-class baseline. A stage-0a CLIP takes about 20 s, so the tower can be tuned
without running the whole 20-minute job.

    python probe_vision.py out/shapes_llava15/clip                  # a CLIP checkpoint (stage 0a)
    python probe_vision.py out/shapes_llava15/finetune --layer -2   # the tower inside a LLaVA checkpoint
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import data
import shapes
from model import MLLM
from vision import VisionTransformer, read_config_json

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
        pixels = torch.stack([data.preprocess_image(shapes.render_scene(scene), tower.config.image_size, True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a CLIP or LLaVA checkpoint directory")
    parser.add_argument("--layer", type=int, default=-2, help="hidden state to probe (LLaVA-1.5 reads -2)")
    parser.add_argument("--images", type=int, default=1200, help="training scenes of the world to render")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--image-size", type=int, default=shapes.DEFAULT_IMAGE_SIZE, help="the world's longer side")
    args = parser.parse_args()

    tower = load_vision_tower(args.checkpoint)
    scenes = [shapes.sample_scene(args.seed, "train", index, index + 1, args.image_size)
              for index in range(args.images)]
    features, labels = object_features(tower, scenes, args.layer)
    print(f"{args.checkpoint}, layer {args.layer}: {len(features)} objects of {len(scenes)} scenes")
    print("| attribute | linear probe accuracy | majority baseline |\n|---|---|---|")
    for name, values in labels.items():
        accuracy, majority = linear_probe_accuracy(features, values)
        print(f"| {name} | {accuracy:.3f} | {majority:.3f} |")


if __name__ == "__main__":
    main()
