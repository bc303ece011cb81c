"""Benchmarks, one subcommand each; every one prints a markdown table of throughputs.

    python bench.py model [--threads N] [--repeats R]     # ours vs transformers' LLaVA, on the CPU
    python bench.py model --threads 1 --clock cpu          # robust when other jobs share the cores
    python bench.py t5 [--threads N] [--repeats R]        # ours vs transformers' T5, greedy, on the CPU
    python bench.py data                                   # configs/shapes_llava15.py, stage finetune
    python bench.py data --num-workers 0 1 2 --steps 8
    python bench.py eval [--samples 64] [--new-tokens 8,32] [--width 128] [--threads 1] [--device cpu]
    python bench.py train --gpu [--layers 4] | --cpu       # tokens/s, MFU, memory of a 7B-shaped slice
    torchrun --nproc_per_node 8 bench.py train --gpu --parallel fsdp
    python bench.py decode --gpu [--dtype bf16] | --cpu    # generation against the bandwidth roofline
    python bench.py memory [--processes 8]                 # LLaVA-1.5 7B / 13B stage 2 per GPU, DDP vs FSDP

model: a training step and greedy generation of our MLLM against transformers'
LlavaForConditionalGeneration, same weights, same inputs. t5: greedy generation of our T5
against transformers' T5ForConditionalGeneration. data: the input pipeline against the
training step (the loader must never be the bottleneck). eval: batched eval generation against
one sample at a time (the floor is a 3x speedup). train: a training step's tokens/s, MFU and peak
memory (one GPU, or FSDP over a node). decode: generation tokens/s as a fraction of the weight-
bandwidth roofline. `python bench.py SUBCOMMAND --help` says more.
Only `model`, `t5` and `decode` need transformers (a dev dependency); it is imported there alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image
from tokenizers import Tokenizer

import data
import parallel
import shapes
import train
from adapters import LLAVA15_LORA_TARGETS, apply_lora, set_trainable
from eval import run_eval
from model import MLLM, LanguageModel, MLLMConfig, T5LanguageModel, TextConfig
from probe import add_command
from vision import VisionConfig

if TYPE_CHECKING:
    import transformers


def print_table(caption: str, header: list[str], rows: list[list[str]]) -> None:
    """The caption, then a markdown table: every subcommand's result is pasted into the README."""
    print(caption + "\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# model: ours against transformers' LlavaForConditionalGeneration

NEW_TOKENS = 128


def special_tokens(vocab_size: int) -> tuple[int, int]:
    """(image token, pad token): the last two ids of the vocabulary."""
    return vocab_size - 2, vocab_size - 1


def build_reference(vocab_size: int) -> transformers.LlavaForConditionalGeneration:
    """A random LLaVA-1.5 of mid size in transformers: 8 LLaMA layers of width 512 and a narrow CLIP
    tower at 336 px, so that the benchmark takes minutes and not hours."""
    import transformers

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


def seconds(function: Callable[[], None], clock: Callable[[], float]) -> float:
    start = clock()
    function()
    return clock() - start


def bench_model(args: argparse.Namespace) -> None:
    """Our MLLM against transformers' LlavaForConditionalGeneration on the CPU.

    Same weights, same inputs, one run: tokens/s of a training step (forward + backward, loss on
    the text) and of greedy generation of 128 new tokens with the KV cache (batch 1 and --batch),
    after a 576-token image (LLaVA-1.5's 336 px / 14 px grid) and a short prompt. A mid-size
    config (8 layers of width 512, a narrow vision tower) keeps it to minutes. Runs alternate
    between the two models and the median is reported, so background load hits both alike.
    transformers is needed here (a dev dependency).
    """
    import transformers

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
        results[name] = [tokens / statistics.median(timings[key]) for key in ("ours", "transformers")]

    print_table(
        f"CPU, {args.threads} threads, {args.clock} clock, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; LLM 8 layers x 512, vocabulary {args.vocab_size}, vision 6 layers x 256 at "
        f"336 px ({num_image_tokens} image tokens); training batch {args.batch} x {input_ids.shape[1]} tokens; "
        f"generation prompts {num_image_tokens + 16} tokens (the prefill counts in the time); median of {args.repeats}",
        ["measurement", "nanoMLLM tokens/s", "transformers tokens/s", "ratio"],
        [[name, f"{mine:.1f}", f"{theirs:.1f}", f"{mine / theirs:.2f}x"]
         for name, (mine, theirs) in results.items()])


# t5: ours against transformers' T5ForConditionalGeneration

T5_NEW_TOKENS = 64
T5_PROMPT_TOKENS = 256


def bench_t5(args: argparse.Namespace) -> None:
    """Greedy generation of 64 tokens after a 256-token encoder input (batch 1 and --batch), our
    T5LanguageModel against transformers' T5ForConditionalGeneration with the same weights, in
    T5 v1.1-small's shape (8 + 8 layers of width 512, 6 heads of 64, gated-GELU 1024, vocabulary
    32128). The time includes the encoder pass. Runs alternate, median of --repeats."""
    import transformers

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    reference = transformers.T5ForConditionalGeneration(config).eval()
    reference.lm_head.weight = torch.nn.Parameter(torch.randn(32128, 512) * 0.05)
    reference.config.tie_word_embeddings = False
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = T5LanguageModel.from_pretrained(directory).eval()
    prompts = torch.randint(2, 32000, (args.batch, T5_PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    def generate(model, rows: int) -> torch.Tensor:
        with torch.inference_mode():
            if model is reference:
                return model.generate(input_ids=prompts[:rows], max_new_tokens=T5_NEW_TOKENS,
                                      min_new_tokens=T5_NEW_TOKENS, do_sample=False)[:, 1:]
            return model.generate(prompts[:rows], max_new_tokens=T5_NEW_TOKENS, min_new_tokens=T5_NEW_TOKENS)

    rows_out = []
    for rows in (1, args.batch):
        same = torch.equal(generate(ours, rows), generate(reference, rows))  # also the warm-up
        timings = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            for model, key in ((ours, "ours"), (reference, "transformers")):
                timings[key].append(seconds(lambda: generate(model, rows), clock))
        mine, theirs = (rows * T5_NEW_TOKENS / statistics.median(timings[key]) for key in ("ours", "transformers"))
        rows_out.append([f"greedy, {T5_PROMPT_TOKENS}-token encoder input, {T5_NEW_TOKENS} new tokens, batch {rows}",
                         f"{mine:.1f}", f"{theirs:.1f}", f"{mine / theirs:.2f}x", "yes" if same else "NO"])
    print_table(
        f"CPU, {args.threads} threads, {args.clock} clock, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; T5 v1.1-small shape (8 + 8 layers x 512, vocabulary 32128); "
        f"median of {args.repeats}",
        ["measurement", "nanoMLLM tokens/s", "transformers tokens/s", "ratio", "same tokens"], rows_out)


# data: the input pipeline against the training step

def loader_rate(dataset: torch.utils.data.Dataset, batch_size: int, pad_token_id: int, num_workers: int,
                num_batches: int) -> float:
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


def bench_data(args: argparse.Namespace) -> None:
    """The input pipeline against the training step, on the shapes world.

    The loader must be at least 3x faster than the step, so it is never the bottleneck. Loader:
    samples/s of the DataLoader alone (PNG decode + pad-to-square + CLIP preprocessing + template
    rendering/tokenization + collate) over the stage's instruction data, for each worker count.
    Step: samples/s of forward + backward + AdamW on the same stage's model and batches (batches
    collected first, so loading is not counted), on the same machine in the same run.
    """
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
    rows = [["training step (forward + backward + AdamW)", f"{step:,.1f}", "1.0"]]
    for num_workers in args.num_workers:
        rate = loader_rate(dataset, stage.micro_batch_size, pad_token_id, num_workers, args.loader_batches)
        rows.append([f"DataLoader, {num_workers} workers", f"{rate:,.0f}", f"{rate / step:,.0f}"])
    print_table(f"{args.config} stage {stage.name}: {len(dataset)} samples, {model.num_image_tokens} image tokens, "
                f"batch {stage.micro_batch_size}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads",
                ["what", "samples/s", "x training step"], rows)


# eval: batched generation against one sample at a time

def write_vqa_files(root: Path, num_questions: int) -> None:
    """Eight images and `num_questions` VQAv2-style questions (10 answers each) about them."""
    (root / "images").mkdir()
    for image_id in range(8):
        image = Image.new("RGB", (64 + 8 * image_id, 64), (30 * image_id, 120, 200))
        image.save(root / "images" / f"{image_id:012d}.png")
    questions = [{"question_id": index, "image_id": index % 8,
                  "question": ["What color is the circle?", "How many shapes are there in the picture?",
                               "Is there a small red star to the left of the square?"][index % 3]}
                 for index in range(num_questions)]
    annotations = [{"question_id": index, "answers": [{"answer": "red"}] * 10} for index in range(num_questions)]
    (root / "eval" / "vqa").mkdir(parents=True)
    (root / "eval" / "vqa" / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "eval" / "vqa" / "annotations.json").write_text(json.dumps({"annotations": annotations}))


def build_eval_model(device: str, width: int) -> tuple[MLLM, Tokenizer]:
    """A random LLaVA-1.5 at the scale of a CPU recipe (a 2-layer ViT at 56 px = 16 image tokens, a
    4-layer LLaMA of width `width`), with a tokenizer fit to the VQA prompts it will read."""
    tokenizer = shapes.train_tokenizer(["A chat between a curious user and an artificial intelligence assistant.",
                                        "USER: What color is the circle? "
                                        "Answer the question using a single word or phrase.",
                                        "ASSISTANT: red. How many shapes are there in the picture? 3"] * 20)
    ids = {token: tokenizer.token_to_id(token) for token in shapes.SPECIAL_TOKENS}
    text = TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=width, intermediate_size=width * 8 // 3,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          image_size=56, patch_size=14)
    config = MLLMConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                        pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return MLLM(config).to(device).eval(), tokenizer


def bench_eval(args: argparse.Namespace) -> None:
    """Eval throughput with batched generation against one sample at a time.

    Samples/s of generation in batches of --batch-size (left-padded, KV cache) and of batch 1, same
    model, same data, same number of new tokens; the floor is a 3x speedup and the command exits 1
    below it.

    The model is a small random LLaVA-1.5 (a 2-layer ViT at 56 px = 16 image tokens, a 4-layer
    LLaMA of width --width, 128 by default, the scale of a CPU recipe); the data are VQA files in
    the public format on a handful of synthetic images. Every answer is forced to the measured
    number of new tokens (min = max new tokens) so both runs do the same work whatever the random
    model says.
    """
    torch.set_num_threads(args.threads)
    model, tokenizer = build_eval_model(args.device, args.width)
    options = {"image_template": "{image_id:012d}.png", "progress": False, "print_results": False}
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_vqa_files(Path(directory), args.samples)
        # One small warm-up run so the first measurement does not pay for lazy initialization.
        run_eval(model, tokenizer, "vqa", directory, limit=2, max_new_tokens=2, **options)
        for new_tokens in [int(value) for value in args.new_tokens.split(",")]:
            rates = []
            for batch_size in (1, args.batch_size):
                metrics = run_eval(model, tokenizer, "vqa", directory, limit=args.samples, batch_size=batch_size,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
                rates.append(metrics["samples_per_second"])
            rows.append((new_tokens, *rates, rates[1] / rates[0]))
    print_table(f"eval throughput, {args.samples} VQA samples (prompt ~110 tokens with 16 image tokens), LLM width "
                f"{args.width}, device {args.device}, {torch.get_num_threads()} thread(s)",
                ["new tokens", "batch 1 samples/s", f"batch {args.batch_size} samples/s", "speedup"],
                [[str(new_tokens), f"{single:.2f}", f"{batched:.2f}", f"{speedup:.2f}x"]
                 for new_tokens, single, batched, speedup in rows])
    slow = [row for row in rows if row[3] < args.floor]
    if slow:
        print(f"\nFAIL: below the {args.floor}x floor for "
              + ", ".join(f"{row[0]} new tokens ({row[3]:.2f}x)" for row in slow))
        sys.exit(1)


# train: tokens/s, MFU and memory of a training step; decode: generation against the roofline

# Dense bf16 tensor-core peaks per GPU (the vendors' datasheets, without sparsity), by name fragment,
# most specific first: torch.cuda.get_device_name says e.g. "NVIDIA H100 80GB HBM3".
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
                  ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


def slice_config(args: argparse.Namespace) -> TextConfig:
    """LLaMA-2-7B's block (width 4096, 32 heads, SwiGLU 11008, vocabulary 32000) with --layers of
    its 32 layers on a GPU; on the CPU a small model of similar proportions."""
    if args.gpu:
        return TextConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, num_hidden_layers=args.layers, max_position_embeddings=4096)
    return TextConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=args.layers, max_position_embeddings=4096)


def flops_per_token(model: LanguageModel, sequence_length: int) -> float:
    """Model FLOPs of training one token (PaLM, appendix B; nanoGPT's estimate_mfu): 6 per
    parameter (forward 2, backward 4; the embedding lookup excluded, the norms' few counted) plus
    attention's QK^T and AV, 12 x layers x width x sequence (causal masking not subtracted, by
    convention)."""
    config = model.config
    matmul_weights = sum(p.numel() for p in model.parameters()) - model.input_embeddings().weight.numel()
    return 6 * matmul_weights + 12 * config.num_hidden_layers * config.hidden_size * sequence_length


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Seconds per call, after one untimed call."""
    function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak: the datasheet's for a known GPU, else a measured large matmul (a CPU's
    practical peak, so its MFU reads as a fraction of what its matmul kernel reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_FLOPS:
            if fragment in name:
                return flops, f"{name}, datasheet bf16 peak {flops / 1e12:.0f} TFLOP/s"
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    flops = 2 * size ** 3 / timed(lambda: a @ b, device, repeats=10)
    return flops, f"{device.type}, peak = a measured {size}^2 {str(dtype).removeprefix('torch.')} matmul, " \
                   f"{flops / 1e12:.2f} TFLOP/s"


def peak_memory(device: torch.device) -> float:
    """Bytes: the CUDA allocator's peak, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def attention_kernels(model: torch.nn.Module, input_ids: torch.Tensor, autocast) -> str:
    """Which kernels SDPA dispatched to in a forward (the profiler's op names): flash, memory-
    efficient, cuDNN, or the math fallback that materializes the attention matrix."""
    with torch.profiler.profile() as profiler, torch.no_grad(), autocast:
        model(input_ids)
    names = {event.name.removeprefix("aten::_scaled_dot_product_") for event in profiler.events()
             if event.name.startswith("aten::_scaled_dot_product_")}
    return ", ".join(sorted(names)) or "math (no fused kernel)"


def bench_train(args: argparse.Namespace) -> None:
    """Training throughput of a LLaMA-7B-shaped slice, as train.py runs it: tokens/s per device,
    model FLOP/s and MFU, peak memory against train.py's estimate (on the CPU the peak is the
    process's resident set, the framework included), and the SDPA kernel that ran.

    --gpu: LLaMA-2-7B's block (width 4096, 32 heads, SwiGLU 11008) x --layers, vocabulary 32000,
    --seq 2048 tokens, bf16 autocast, blocks compiled (parallel.compile_blocks), AdamW; MFU
    against the GPU's datasheet bf16 peak. Under torchrun with --parallel fsdp, FSDP2 over the
    processes (parallel.wrap), the numbers per GPU. --cpu: a small model of similar proportions
    in fp32, MFU against a measured matmul; CI runs it.
        python bench.py train --gpu --layers 4
        torchrun --nproc_per_node 8 bench.py train --gpu --layers 8 --parallel fsdp
    """
    runtime = parallel.setup_runtime("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    config = slice_config(args)
    model = LanguageModel(config)
    model.gradient_checkpointing = args.gradient_checkpointing
    estimate = parallel.estimate_memory(model, args.micro_batch, args.seq, runtime.world_size,
                                        args.gradient_checkpointing)[args.parallel]
    model_flops = flops_per_token(model, args.seq)
    parameters = sum(p.numel() for p in model.parameters())
    if args.gpu and not args.no_compile:
        parallel.compile_blocks(model)
    if args.parallel == "fsdp" and runtime.world_size > 1:
        parallel.wrap(model, "fsdp", runtime, find_unused_parameters=False)
    model.to(runtime.device)
    train_model = parallel.wrap(model, "ddp", runtime, False) if args.parallel == "ddp" else model
    optimizer = train.build_optimizer(model, train.StageConfig(learning_rate=1e-5))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.gpu else nullcontext()
    generator = torch.Generator().manual_seed(runtime.rank)
    input_ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq), generator=generator)
    input_ids = input_ids.to(runtime.device)

    def step() -> None:
        with autocast:
            loss = train_model(input_ids, labels=input_ids)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # compilation, the allocator's first requests
        step()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    tokens_per_second = args.micro_batch * args.seq / timed(step, runtime.device, args.steps)
    achieved = tokens_per_second * model_flops
    peak, peak_source = peak_flops(runtime.device, torch.bfloat16 if args.gpu else torch.float32)
    kernels = attention_kernels(train_model, input_ids, autocast)
    if runtime.is_main:
        print_table(
            f"{peak_source}; torch {torch.__version__}; {parameters / 1e6:.0f}M parameters ({config.num_hidden_layers} "
            f"layers x {config.hidden_size}), micro-batch {args.micro_batch} x {args.seq} tokens, {args.parallel} over "
            f"{runtime.world_size} process(es), {'bf16 autocast' if args.gpu else 'fp32'}, gradient checkpointing "
            f"{args.gradient_checkpointing}; mean of {args.steps} steps after {args.warmup + 1}",
            ["tokens/s per device", "model TFLOP/s per device", "MFU", "peak memory", "train.py's estimate",
             "SDPA kernel"],
            [[f"{tokens_per_second:.0f}", f"{achieved / 1e12:.4g}", f"{achieved / peak:.1%}",
              parallel.format_bytes(peak_memory(runtime.device)), parallel.format_bytes(estimate["total"]), kernels]])
    if runtime.world_size > 1:
        torch.distributed.destroy_process_group()


def bench_memory(args: argparse.Namespace) -> None:
    """Bytes per GPU of LLaVA-1.5's stage 2 (configs/llava15.py and llava15_lora.py: micro-batch
    16 x 2048 tokens, gradient checkpointing, the tower frozen) at 7B and 13B, under DDP and FSDP
    over --processes GPUs: parallel.estimate_memory on models built from the published dims on
    the meta device, so no weights are needed. `train.py CONFIG --estimate_memory` does the same
    for any config whose checkpoints are at hand."""
    sizes = {"7B": TextConfig(vocab_size=32064),
             "13B": TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40)}
    rows = []
    for size, text in sizes.items():
        for recipe in ("full", "LoRA"):
            with torch.device("meta"):
                model = MLLM(MLLMConfig(text_config=text))
                if recipe == "LoRA":
                    apply_lora(model, LLAVA15_LORA_TARGETS, rank=128, alpha=256)
            set_trainable(model, [r"^multi_modal_projector\.", r"^language_model\." if recipe == "full" else r"lora_"])
            estimates = parallel.estimate_memory(model, 16, 2048, args.processes, gradient_checkpointing=True,
                                                 tokens_per_image=model.config.vision_config.num_patches + 1)
            for mode, estimate in estimates.items():
                rows.append([f"LLaVA-1.5-{size}, {recipe}", mode, *(parallel.format_bytes(estimate[key]) for key in
                             ("weights", "gradients", "optimizer", "activations", "total")),
                             "yes" if estimate["total"] < 0.85 * args.gpu_memory * 2 ** 30 else "no"])
    print_table(f"stage 2 per GPU, {args.processes} processes, micro-batch 16 x 2048 tokens, gradient checkpointing; "
                f"fits = under 85% of {args.gpu_memory} GiB",
                ["model, stage 2", "parallel", "weights", "gradients", "optimizer", "activations", "total", "fits"],
                rows)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy within the device's memory (each byte read once, written once)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * size / timed(lambda: target.copy_(source), device, repeats=10)


def bench_decode(args: argparse.Namespace) -> None:
    """Greedy generation at batch 1 against the weight-bandwidth roofline: each new token reads
    every weight once (the input embedding's one row aside), so tokens/s is at most the device's
    copy bandwidth / the weights' bytes. Ours and transformers' LlamaForCausalLM, same weights,
    same dtype (--dtype bf16: bf16 weights for inference). --gpu: LLaMA-2-7B's shape with
    --layers (32 = the whole 7B); --cpu: a small model. Needs transformers (a dev dependency)."""
    import transformers

    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = slice_config(args)
    torch.manual_seed(0)
    with torch.device(device):  # built where they run: a 7B model never passes through the CPU or the disk
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            num_hidden_layers=config.num_hidden_layers, max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False)).to(dtype).eval()
        ours = LanguageModel(config).to(dtype).eval()
    ours.load_state_dict(reference.state_dict())  # LLaMA's names are transformers' (checkpoints.LLAMA_LAYOUT)
    embedding = ours.input_embeddings().weight
    weight_bytes = (sum(p.numel() * p.element_size() for p in ours.parameters())
                    - embedding.numel() * embedding.element_size())
    bandwidth = copy_bandwidth(device)
    roofline = bandwidth / weight_bytes
    prompt = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def generate(model) -> None:
        if model is reference:
            model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)
        else:
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    rates = {name: args.new_tokens / timed(lambda: generate(model), device, args.repeats)
             for name, model in (("nanoMLLM", ours), ("transformers", reference))}
    print_table(
        f"{torch.cuda.get_device_name(device) if args.gpu else 'CPU'}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {config.num_hidden_layers} layers x {config.hidden_size}, {args.dtype} weights "
        f"({weight_bytes / 2 ** 30:.2f} GiB read per token), copy bandwidth {bandwidth / 1e9:.0f} GB/s, roofline "
        f"{roofline:.0f} tokens/s; batch 1, 16-token prompt, {args.new_tokens} new tokens (prefill included), "
        f"mean of {args.repeats}",
        ["model", "tokens/s", "fraction of the roofline"],
        [[name, f"{rate:.1f}", f"{rate / roofline:.1%}"] for name, rate in rates.items()])


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (sys.argv when argv is None; the tests pass a list) and run the subcommand."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    model = add_command(commands, "model", bench_model)
    model.add_argument("--threads", type=int, default=torch.get_num_threads())
    model.add_argument("--repeats", type=int, default=3)
    model.add_argument("--batch", type=int, default=4, help="training batch size, and the second generation batch")
    model.add_argument("--vocab-size", type=int, default=32064,
                       help="llava-1.5-hf's 32064 by default; a decode step then reads the 66 MB head")
    model.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="cpu = this process's CPU time: robust when other jobs share the cores; "
                            "use it with --threads 1 (idle OpenMP threads spin and would count)")

    t5 = add_command(commands, "t5", bench_t5)
    t5.add_argument("--threads", type=int, default=torch.get_num_threads())
    t5.add_argument("--repeats", type=int, default=3)
    t5.add_argument("--batch", type=int, default=4, help="the second generation batch")
    t5.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = this process's CPU time (use with --threads 1 on a shared CPU)")

    loader = add_command(commands, "data", bench_data)
    loader.add_argument("--config", default="configs/shapes_llava15.py")
    loader.add_argument("--stage", default="finetune")
    loader.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    loader.add_argument("--loader-batches", type=int, default=40)
    loader.add_argument("--steps", type=int, default=6)

    evaluation = add_command(commands, "eval", bench_eval)
    evaluation.add_argument("--samples", type=int, default=64)
    evaluation.add_argument("--new-tokens", default="8,32",
                            help="answer lengths to measure, comma-separated (short VQA answers, REC box text)")
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--width", type=int, default=128, help="LLM width")
    evaluation.add_argument("--threads", type=int, default=1,
                            help="CPU threads; 1 gives stable numbers on a shared CPU, and more threads only "
                                 "help the batched run, whose matrices are bigger")
    evaluation.add_argument("--device", default="cpu")
    evaluation.add_argument("--floor", type=float, default=3.0, help="least batched / single speedup")

    training = add_command(commands, "train", bench_train)
    decode = add_command(commands, "decode", bench_decode)
    for command, layers in ((training, 4), (decode, 32)):
        where = command.add_mutually_exclusive_group(required=True)
        where.add_argument("--gpu", action="store_true", help="LLaMA-2-7B's block on CUDA")
        where.add_argument("--cpu", action="store_true", help="a small model on the CPU (CI)")
        command.add_argument("--layers", type=int, default=layers)
    memory = add_command(commands, "memory", bench_memory)
    memory.add_argument("--processes", type=int, default=8)
    memory.add_argument("--gpu-memory", type=int, default=80, help="GiB per GPU")
    training.add_argument("--seq", type=int, default=2048)
    training.add_argument("--micro-batch", type=int, default=1)
    training.add_argument("--steps", type=int, default=10)
    training.add_argument("--warmup", type=int, default=2)
    training.add_argument("--parallel", choices=parallel.PARALLEL, default="ddp")
    training.add_argument("--gradient-checkpointing", action="store_true")
    training.add_argument("--no-compile", action="store_true", help="eager blocks on the GPU")
    decode.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    decode.add_argument("--new-tokens", type=int, default=128)
    decode.add_argument("--repeats", type=int, default=3)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
