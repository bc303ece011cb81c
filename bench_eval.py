"""Benchmark: eval throughput (samples/s) with batched generation (batch 16, left-padded, KV cache)
against one sample at a time, same model, same data, same number of new tokens (issue 5; the
floor is a 3x speedup).

The model is a small random LLaVA-1.5 (a 2-layer ViT at 56 px = 16 image tokens, a 4-layer
LLaMA of width `--width`, 128 by default, the scale of a CPU recipe); the data are VQA files in
the public format on a handful of synthetic images. Every answer is forced to `--new-tokens` tokens (min = max new tokens) so both runs do
the same work whatever the random model says.

    python bench_eval.py [--samples 64] [--new-tokens 16] [--width 128] [--threads 1] [--device cpu]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from eval import run_eval
from model import MLLM, MLLMConfig, TextConfig
from shapes import SPECIAL_TOKENS, train_tokenizer
from vision import VisionConfig


def write_vqa_files(root: Path, num_questions: int) -> None:
    """Eight images and `num_questions` VQAv2-style questions (10 answers each) about them."""
    (root / "images").mkdir()
    for image_id in range(8):
        Image.new("RGB", (64 + 8 * image_id, 64), (30 * image_id, 120, 200)).save(root / "images" / f"{image_id:012d}.png")
    questions = [{"question_id": index, "image_id": index % 8,
                  "question": ["What color is the circle?", "How many shapes are there in the picture?",
                               "Is there a small red star to the left of the square?"][index % 3]}
                 for index in range(num_questions)]
    annotations = [{"question_id": index, "answers": [{"answer": "red"}] * 10} for index in range(num_questions)]
    (root / "eval" / "vqa").mkdir(parents=True)
    (root / "eval" / "vqa" / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "eval" / "vqa" / "annotations.json").write_text(json.dumps({"annotations": annotations}))


def build_model(device: str, width: int):
    tokenizer = train_tokenizer(["A chat between a curious user and an artificial intelligence assistant.",
                                 "USER: What color is the circle? Answer the question using a single word or phrase.",
                                 "ASSISTANT: red. How many shapes are there in the picture? 3"] * 20)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    text = TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=width, intermediate_size=width * 8 // 3,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          image_size=56, patch_size=14)
    config = MLLMConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                        pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return MLLM(config).to(device).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--new-tokens", default="8,32",
                        help="answer lengths to measure, comma-separated (short VQA answers, REC box text)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=128, help="LLM width")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 gives stable numbers on a shared CPU, and more threads only "
                             "help the batched run, whose matrices are bigger")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--floor", type=float, default=3.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.device, args.width)
    options = {"image_template": "{image_id:012d}.png", "progress": False, "print_results": False}
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_vqa_files(Path(directory), args.samples)
        # One small warm-up run so the first measurement does not pay for lazy initialization.
        run_eval(model, tokenizer, "vqa", directory, limit=2, **options)
        for new_tokens in [int(value) for value in args.new_tokens.split(",")]:
            rates = []
            for batch_size in (1, args.batch_size):
                metrics = run_eval(model, tokenizer, "vqa", directory, limit=args.samples, batch_size=batch_size,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
                rates.append(metrics["samples_per_second"])
            rows.append((new_tokens, *rates, rates[1] / rates[0]))
    print(f"eval throughput, {args.samples} VQA samples (prompt ~110 tokens with 16 image tokens), LLM width "
          f"{args.width}, device {args.device}, {torch.get_num_threads()} thread(s)\n")
    print(f"| new tokens | batch 1 samples/s | batch {args.batch_size} samples/s | speedup |")
    print("|---|---|---|---|")
    for new_tokens, single, batched, speedup in rows:
        print(f"| {new_tokens} | {single:.2f} | {batched:.2f} | {speedup:.2f}x |")
    slow = [row for row in rows if row[3] < args.floor]
    if slow:
        print(f"\nFAIL: below the {args.floor}x floor for " + ", ".join(f"{row[0]} new tokens ({row[3]:.2f}x)" for row in slow))
        sys.exit(1)


if __name__ == "__main__":
    main()
