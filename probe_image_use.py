"""Does a trained LLaVA checkpoint use its image? The answer loss with each sample's own image,
with another sample's image, and with the image replaced by zeros (eval.py's --blind).

A model that reads the image scores its own image clearly best; a model that answers from the
question alone scores all three alike. The loss is LLaVA's (Eq. 3.3: mean cross-entropy over the
answer tokens), grouped by the kind of sample (the shapes world's ids end in it: vqa, grounding,
conversation, detail, caption, choice). It takes seconds, where the eval's with-image vs blind
comparison needs a whole stage 2 first and mixes in decoding.

    python probe_image_use.py out/shapes_llava15/finetune
    python probe_image_use.py out/shapes_llava15/finetune --data data/shapes/train/instruct.json --samples 256
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import data
from model import MLLM, row_log_likelihoods

IMAGE_CONDITIONS = ("own image", "another sample's image", "zeros")


def sample_kind(record_id: str) -> str:
    """"000000000012_grounding" -> "grounding"; ids without a kind suffix count as "all"."""
    suffix = str(record_id).rsplit("_", 1)[-1]
    return suffix if suffix.isalpha() else "all"


@torch.no_grad()
def image_use(model: MLLM, dataset: data.InstructionDataset, num_samples: int,
              batch_size: int = 16) -> dict[str, dict[str, float]]:
    """{kind: {condition: mean answer-token loss}} over the first num_samples image samples. Another
    sample's image is the next one in the batch (the batch's images rolled by one)."""
    model.eval()
    indices = [i for i, has_image in enumerate(dataset.has_image) if has_image][:num_samples]
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(IMAGE_CONDITIONS, 0.0))
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        batch = data.collate([dataset[i] for i in rows], model.config.pad_token_id)
        pixels = batch["pixel_values"]
        kinds = [sample_kind(dataset.records[i].get("id", "")) for i in rows]
        for condition, images in zip(IMAGE_CONDITIONS, (pixels, pixels.roll(1, 0), torch.zeros_like(pixels))):
            logits = model(batch["input_ids"], images, batch["attention_mask"])
            log_likelihoods, num_tokens = row_log_likelihoods(logits, batch["labels"])
            for kind, log_likelihood in zip(kinds, log_likelihoods.tolist()):
                sums[kind][condition] -= log_likelihood
        for kind, count in zip(kinds, num_tokens.tolist()):
            counts[kind] += count
    return {kind: {c: total / max(1, counts[kind]) for c, total in sums[kind].items()} for kind in sorted(sums)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a LLaVA checkpoint directory (llava-hf layout)")
    parser.add_argument("--data", default="data/shapes/train/instruct.json", help="LLaVA instruction JSON")
    parser.add_argument("--image-folder", default="data/shapes/images")
    parser.add_argument("--tokenizer", default="data/shapes/tokenizer.json")
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    model = MLLM.from_pretrained(args.checkpoint)
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


if __name__ == "__main__":
    main()
