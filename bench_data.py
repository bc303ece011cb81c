"""Input pipeline against the training step, on the shapes world (issue 3: the loader must be at
least 3x faster than the step, so it is never the bottleneck).

Loader: samples/s of the DataLoader alone (PNG decode + pad-to-square + CLIP preprocessing +
template rendering/tokenization + collate) over the finetune stage's instruction data, for each
worker count. Step: samples/s of forward + backward + AdamW on the same stage's model and batches
(batches collected first, so loading is not counted), on the same machine in the same run.

    python bench_data.py                                   # configs/shapes_llava15.py, stage finetune
    python bench_data.py --num-workers 0 1 2 --steps 8
"""
import argparse
import os
import time

import torch

import data
import shapes
import train
from adapters import set_trainable
from model import MLLM, MLLMConfig, TextConfig
from vision import VisionConfig


def loader_rate(dataset, batch_size: int, pad_token_id: int, num_workers: int, num_batches: int) -> float:
    """Samples/s over `num_batches` batches, after one batch that starts the workers."""
    loader = data.make_dataloader(dataset, batch_size, pad_token_id, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for _, batch in zip(range(num_batches), iterator):
        count += batch["input_ids"].shape[0]
    return count / (time.perf_counter() - start)


def step_rate(model: MLLM, batches: list[dict], learning_rate: float) -> float:
    """Samples/s of full training steps (after one warm-up step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    start, count = 0.0, 0
    for index, batch in enumerate(batches):
        if index == 1:
            start, count = time.perf_counter(), 0
        loss = model(**train.model_inputs(batch, "mllm", torch.device("cpu")))[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count += batch["input_ids"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/shapes_llava15.py")
    parser.add_argument("--stage", default="finetune")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    config, stages = train.load_config(args.config, [])
    shapes.build_world(**config.world)
    stage = next(s for s in stages if s.name == args.stage)
    tokenizer = data.load_tokenizer(config.tokenizer)
    # The stage's model with the recipe's dims (random weights: speed does not depend on them).
    vision = next(s for s in stages if s.objective == "clip").architecture["vision_config"]
    text = next(s for s in stages if s.objective == "lm").architecture
    model = MLLM(MLLMConfig(
        vision_config=VisionConfig(**vision),
        text_config=TextConfig.from_dict({**text, "vocab_size": tokenizer.get_vocab_size()}),
        image_token_index=tokenizer.token_to_id("<image>"), pad_token_id=tokenizer.token_to_id("<pad>"),
        **config.model))
    set_trainable(model, stage.trainable)
    dataset = train.build_dataset(stage, config, model, tokenizer)
    pad_token_id = tokenizer.token_to_id("<pad>")

    batches = [batch for _, batch in zip(range(args.steps + 1),
                                         data.make_dataloader(dataset, stage.micro_batch_size, pad_token_id))]
    step = step_rate(model, batches, stage.learning_rate)
    print(f"{args.config} stage {stage.name}: {len(dataset)} samples, {model.num_image_tokens} image tokens, "
          f"batch {stage.micro_batch_size}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads\n")
    print("| what | samples/s | x training step |")
    print("|---|---:|---:|")
    print(f"| training step (forward + backward + AdamW) | {step:,.1f} | 1.0 |")
    for num_workers in args.num_workers:
        rate = loader_rate(dataset, stage.micro_batch_size, pad_token_id, num_workers, args.loader_batches)
        print(f"| DataLoader, {num_workers} workers | {rate:,.0f} | {rate / step:,.0f} |")


if __name__ == "__main__":
    main()
