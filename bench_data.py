"""Input-pipeline benchmark: samples/s of the DataLoader alone (image decode + CLIP
preprocessing + template rendering and tokenization + collate, with workers), on generated PNGs
and a LLaVA-style instruction file. Issue 3 asks the loader to be at least 3x faster than a
training step; this script measures the loader side.

    python bench_data.py --num-workers 0 2 --image-size 64 --batch-size 16
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data

QUESTIONS = ["What color is the circle?", "How many squares are there?",
             "Is the triangle left of the star?", "Describe the image in detail."]
ANSWERS = ["The circle is red.", "There are 3 squares.", "Yes.", "A small blue square sits above a "
           "large green circle on a textured background."]


def write_inputs(folder: str, num_samples: int, source_size: int, seed: int) -> str:
    """PNG images of `source_size` px with smooth noise and an instruction JSON (80% image
    samples, multi-turn, 20% text-only); returns the JSON path."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_samples):
        turns = []
        for turn in range(1 + index % 3):
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            turns += [{"from": "human", "value": question},
                      {"from": "gpt", "value": ANSWERS[(index + turn) % len(ANSWERS)]}]
        record = {"id": str(index), "conversations": turns}
        if index % 5:
            name = f"{index:012d}.png"
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((source_size, source_size * 3 // 4),
                                           Image.Resampling.BILINEAR).save(os.path.join(folder, name))
            record["image"] = name
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append(record)
    path = os.path.join(folder, "instruct.json")
    with open(path, "w") as file:
        json.dump(records, file)
    return path


def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE over the benchmark's text, with the project's special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = QUESTIONS + ANSWERS + [template.system for template in data.TEMPLATES.values()]
    tokenizer.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=512, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"]))
    return tokenizer


def samples_per_second(dataset: data.InstructionDataset, batch_size: int, num_workers: int,
                       epochs: int) -> float:
    """Throughput over `epochs` full passes, after one warm-up pass that starts the workers."""
    loader = data.make_dataloader(dataset, batch_size, pad_token_id=3, num_workers=num_workers)
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            count += batch["input_ids"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=64, help="CLIP input side (px)")
    parser.add_argument("--source-size", type=int, default=128, help="width of the PNGs (px)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--num-image-tokens", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--template", default="vicuna_v1", choices=sorted(data.TEMPLATES))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        json_path = write_inputs(folder, args.num_samples, args.source_size, seed=0)
        dataset = data.InstructionDataset(
            json_path, folder, train_tokenizer(), args.template, image_token_index=4,
            num_image_tokens=args.num_image_tokens, image_size=args.image_size,
            pad_to_square=True, max_seq_len=2048)
        print(f"{len(dataset)} samples ({sum(dataset.has_image)} with an image), "
              f"{args.source_size}x{args.source_size * 3 // 4} PNG -> {args.image_size} px, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs\n")
        print("| workers | samples/s |")
        print("|---:|---:|")
        for num_workers in args.num_workers:
            rate = samples_per_second(dataset, args.batch_size, num_workers, args.epochs)
            print(f"| {num_workers} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
