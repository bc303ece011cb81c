"""Benchmark of issue 2: our MLLM against transformers' LlavaForConditionalGeneration on the CPU.

Same weights, same inputs, one run: tokens/s of a training step (forward + backward, loss on the
text) and of greedy generation of 128 new tokens with the KV cache (batch 1 and --batch), after
a 576-token image (LLaVA-1.5's 336 px / 14 px grid) and a short prompt. A mid-size config (8 layers of width 512, a
narrow vision tower) keeps it to minutes. Runs alternate between the two models and the median is
reported, so background load hits both alike. transformers is needed here (a dev dependency).

    python bench.py [--threads N] [--repeats R]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from model import MLLM

NEW_TOKENS = 128


def special_tokens(vocab_size: int) -> tuple[int, int]:
    """(image token, pad token): the last two ids of the vocabulary."""
    return vocab_size - 2, vocab_size - 1


def build_reference(vocab_size: int) -> transformers.LlavaForConditionalGeneration:
    image_token, pad_token = special_tokens(vocab_size)
    vision = transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                           num_attention_heads=4, image_size=336, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                                    rms_norm_eps=1e-5, pad_token_id=pad_token)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                      vision_feature_layer=-2, pad_token_id=pad_token)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config)


def seconds(function, clock) -> float:
    start = clock()
    function()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="training batch size, and the second generation batch")
    parser.add_argument("--vocab-size", type=int, default=32064,
                        help="llava-1.5-hf's 32064 by default; a decode step then reads the 66 MB head")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu = this process's CPU time: robust when other jobs share the cores; "
                             "use it with --threads 1 (idle OpenMP threads spin and would count)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)

    reference = build_reference(args.vocab_size)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = MLLM.from_pretrained(directory)
    num_image_tokens = ours.num_image_tokens
    generator = torch.Generator().manual_seed(0)
    image_token, pad_token = special_tokens(args.vocab_size)
    text = torch.randint(3, image_token, (args.batch, 64), generator=generator)
    image = torch.full((args.batch, num_image_tokens), image_token)
    input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    labels = input_ids.masked_fill(input_ids == image_token, -100)
    pixel_values = torch.randn(args.batch, 3, 336, 336, generator=generator)

    def train_step(model, is_reference: bool) -> None:
        model.zero_grad(set_to_none=True)
        if is_reference:
            loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        else:
            loss = model(input_ids, pixel_values, labels=labels)[1]
        loss.backward()

    def generate(model, is_reference: bool, rows: int) -> None:
        prompt, prompt_pixels = input_ids[:rows, :num_image_tokens + 16], pixel_values[:rows]
        if is_reference:
            output = model.generate(input_ids=prompt, pixel_values=prompt_pixels, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_token)
            assert output.shape[1] - prompt.shape[1] == NEW_TOKENS
        else:
            assert model.generate(prompt, prompt_pixels, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS).shape[1] == NEW_TOKENS

    measurements = [("training step", train_step, input_ids.numel(), True)]
    for rows in (1, args.batch):
        measurements.append((f"greedy generation, {NEW_TOKENS} new tokens, batch {rows}",
                             lambda model, is_reference, rows=rows: generate(model, is_reference, rows),
                             rows * NEW_TOKENS, False))
    results = {}
    for name, function, tokens, training in measurements:
        timings = {"ours": [], "transformers": []}
        for model in (ours, reference):
            model.train(training)
            function(model, model is reference)  # warm-up
        for _ in range(args.repeats):
            for model, key in ((ours, "ours"), (reference, "transformers")):
                timings[key].append(seconds(lambda: function(model, model is reference), clock))
        results[name] = {key: tokens / statistics.median(values) for key, values in timings.items()}

    print(f"CPU, {args.threads} threads, {args.clock} clock, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"LLM 8 layers x 512, vocabulary {args.vocab_size}, vision 6 layers x 256 at 336 px ({num_image_tokens} image tokens); "
          f"training batch {args.batch} x {input_ids.shape[1]} tokens; generation prompts "
          f"{num_image_tokens + 16} tokens (the prefill counts in the time); median of {args.repeats}\n")
    print("| measurement | nanoMLLM tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|")
    for name, speeds in results.items():
        print(f"| {name} | {speeds['ours']:.1f} | {speeds['transformers']:.1f} | "
              f"{speeds['ours'] / speeds['transformers']:.2f}x |")


if __name__ == "__main__":
    main()
