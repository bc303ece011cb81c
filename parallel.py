"""Training on many processes: the process group, DDP or FSDP2 around the model, torch.compile per
block, the training state on disk (atomic checkpoints, exact resume, sharded through DCP), and
the memory a stage needs per GPU.

LLaVA trains its 7B / 13B stage 2 under DeepSpeed ZeRO-3: weights, gradients and AdamW moments
are split across the GPUs, and each layer's weights are gathered only while it runs. PyTorch's
own engine for this is FSDP2 (`torch.distributed.fsdp.fully_shard`): here every transformer block
(the LLM's decoder layers, the tower's blocks, the Q-Former's layers) is one unit that is
all-gathered before its forward and backward and freed after, and the root holds the rest (the
embeddings, the head, the connector). Parameters stay fp32 shards (the optimizer's master copy);
on CUDA they are cast to bf16 for compute and gradients are reduced in fp32
(`MixedPrecisionPolicy`). Frozen parameters are sharded too but never reach the optimizer.

The training state of a sharded run is written with `torch.distributed.checkpoint` (DCP): every
process writes its shards, and any number of processes reads them back, so a run stopped on 8
GPUs resumes on 4. The stage's weights are still gathered into one llava-hf safetensors file
(`gathered_state_dict`), which transformers and eval.py read.
"""
from __future__ import annotations

import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from layers import PostNormBlock, PreNormBlock

PARALLEL = ("ddp", "fsdp")
SHARDED_STATE = "sharded"  # the DCP directory inside a checkpoint of a sharded run


# ----------------------------------------------------------------------------------------------
# Processes

@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str) -> Runtime:
    """One process, or one of `torchrun`'s (RANK / WORLD_SIZE / LOCAL_RANK in the environment):
    NCCL between GPUs, gloo between CPU processes. `device`: "auto" (cuda if available), "cuda", "cpu"."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Runtime(0, 1, torch.device("cuda" if use_cuda else device if device != "auto" else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(),
                   torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def gather_from_processes(value, runtime: Runtime) -> list:
    """`value` of every process, in rank order (each process has its own RNG stream to save)."""
    if runtime.world_size == 1:
        return [value]
    values = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def mean_over_processes(value: float, runtime: Runtime) -> float:
    if runtime.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.item() / runtime.world_size


# ----------------------------------------------------------------------------------------------
# The model on many processes

def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units of sharding and compilation: every block of layers.py's one block family that
    no other block holds (REACT's gated block runs inside the block it precedes)."""
    blocks, inside = [], set()
    for module in model.modules():  # parents come before their children
        if isinstance(module, (PreNormBlock, PostNormBlock)) and id(module) not in inside:
            blocks.append(module)
            inside.update(id(child) for child in module.modules())
    return blocks


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block in place: the blocks of a family share one compiled graph (a
    decoder layer has no graph break, tests/test_layers.py), so compiling takes seconds rather
    than the minutes of a whole-model graph, and the code between blocks (embedding, image
    merge, loss) stays eager and easy to debug."""
    for block in transformer_blocks(model):
        block.compile()


def wrap(model: torch.nn.Module, parallel: str, runtime: Runtime, find_unused_parameters: bool) -> torch.nn.Module:
    """The model as the training loop calls it. One process: itself. Several: DDP (each process a
    full replica; `find_unused_parameters` only for stages where some step leaves trainable
    parameters without gradients, since the search costs a graph walk every step) or FSDP2
    (sharded in place; the returned module is `model` itself)."""
    if runtime.world_size == 1:
        return model
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    cuda = runtime.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(train_model: torch.nn.Module, enabled: bool):
    """A context in which backward reduces gradients across processes only if `enabled` (the last
    micro-batch of a step): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if enabled:
        return nullcontext()
    if isinstance(train_model, torch.nn.parallel.DistributedDataParallel):
        return train_model.no_sync()
    if is_sharded(train_model):
        return without_gradient_sync(train_model)
    return nullcontext()


@contextmanager
def without_gradient_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def gathered_state_dict(model: torch.nn.Module):
    """Within this block the main process's `model.state_dict()` is the full, unsharded state on
    the CPU (empty on the others), so every `save_pretrained` writes a sharded model as it writes
    any other. Every process must enter it: the gather is collective. Unsharded models are left as
    they are."""
    if not is_sharded(model):
        yield
        return
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.state_dict = lambda *args, **kwargs: state  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.state_dict


def sharded_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The trainable parameters (LoRA factors unmerged) and the optimizer's state, by parameter name."""
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its own shards (collective)."""
    dcp.save(sharded_training_state(model, optimizer), checkpoint_id=str(directory))


def load_sharded_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reads shards written by any number of processes into this run's sharding (or an unsharded model)."""
    state = sharded_training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    # Not strict: the frozen parameters are not in it (they come from the stage's starting weights),
    # while a trainable one missing from the files already stopped dcp.load.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


# ----------------------------------------------------------------------------------------------
# The training state on disk

@contextmanager
def atomic_directory(path: Path):
    """Write a directory under a temporary name, then swap it in, so a crash mid-write never
    leaves a half checkpoint: at any moment `path` (or, during the swap, `path.old`) is complete."""
    temporary = path.with_name(path.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    yield temporary
    swap_in(temporary, path)


def swap_in(temporary: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    temporary.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def complete_directory(path: Path) -> Path | None:
    """`path`, or its `.old` copy if a crash interrupted the swap of atomic_directory."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, progress: dict, runtime: Runtime,
                    tokenizer_path: str, qformer_tokenizer_path: str = "", sharded: bool = False) -> None:
    """Weights via save_pretrained (the layout every tool reads) plus the training state: the step,
    data position and every process's RNG states in train_state.pt, with the optimizer and the
    trainable tensors as they are in memory (LoRA factors unmerged: save_pretrained merges them,
    so exact resume needs them separately) in train_state.pt too, or with `sharded` (an FSDP
    stage, on any number of processes) in the DCP directory `sharded/`. The tokenizers go along (the Q-Former's as
    qformer_tokenizer.json), so eval.py needs only the directory. Every process calls this."""
    progress = {**progress, "rng": gather_from_processes(rng_states(), runtime)}
    temporary = path.with_name(path.name + ".tmp")
    if runtime.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(runtime)
    with gathered_state_dict(model):
        if runtime.is_main:
            model.save_pretrained(str(temporary))
    if sharded:
        save_sharded_state(temporary / SHARDED_STATE, model, optimizer)
    else:
        progress.update(optimizer=optimizer.state_dict(),
                        trainable={name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad})
    if runtime.is_main:
        for source_path, name in ((tokenizer_path, "tokenizer.json"), (qformer_tokenizer_path, "qformer_tokenizer.json")):
            if source_path:
                source = Path(source_path)
                shutil.copy(source / name if source.is_dir() else source, temporary / name)
        torch.save(progress, temporary / "train_state.pt")
        swap_in(temporary, path)
    barrier(runtime)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, trainable: list[str],
                    runtime: Runtime) -> dict:
    """Restore what save_checkpoint wrote into this run's model and optimizer (the saved moments
    and step counts; the hyperparameters stay this run's, so an override on resume counts) and
    this process's RNG states. A sharded state reads back on any number of processes; the RNG
    streams (dropout) then restart from the seed. Returns the progress (step, epoch, batches_done)."""
    progress = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if (path / SHARDED_STATE).is_dir():
        load_sharded_state(path / SHARDED_STATE, model, optimizer)
    else:
        missing, unexpected = model.load_state_dict(progress["trainable"], strict=False)
        if unexpected or set(trainable) & set(missing):
            raise ValueError(f"{path}: train_state.pt does not fit this stage's trainable parameters "
                             f"(unexpected {unexpected[:5]}, missing {sorted(set(trainable) & set(missing))[:5]})")
        optimizer.load_state_dict(progress["optimizer"])
    for group, fresh in zip(optimizer.param_groups, hyperparameters):
        group.update(fresh)
    if len(progress["rng"]) == runtime.world_size:
        restore_rng_states(progress["rng"][runtime.rank])
    elif not (path / SHARDED_STATE).is_dir():
        raise ValueError(f"{path} was written by {len(progress['rng'])} processes; resume with as many "
                         f"(a stage with parallel='fsdp' resumes on any number)")
    elif runtime.is_main:
        print(f"{path} was written by {len(progress['rng'])} processes, this run has {runtime.world_size}: "
              f"weights, optimizer and data position resume exactly, random streams (dropout) start afresh")
    return progress


# ----------------------------------------------------------------------------------------------
# Memory per GPU, before launching

def activation_elements_per_token(block: torch.nn.Module) -> int:
    """What backward keeps of one block, per token: each Linear's input and output (its input for
    the weight gradient; its output feeds SDPA or the activation function, which keep it) and each
    norm's input. LLaMA's block: 11 h + 2 kv + 3 i, within a third of a hand count of its saved
    tensors; flash / memory-efficient SDPA keeps no attention matrix."""
    total = 0
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            total += module.weight.shape[0]
    return total


def estimate_memory(model: torch.nn.Module, micro_batch_size: int, max_seq_len: int, processes: int,
                    gradient_checkpointing: bool, tokens_per_image: int = 0) -> dict[str, dict[str, float]]:
    """Bytes per GPU of one training stage under DDP and under FSDP over `processes` GPUs:
    - weights: fp32 (the optimizer's master copy). DDP: all on every GPU; FSDP: a 1/processes
      shard, plus two blocks gathered in bf16 (the one running and the one prefetched);
    - gradients: fp32, of the trainable parameters (sharded under FSDP);
    - optimizer: AdamW's two fp32 moments of the trainable parameters (sharded under FSDP);
    - activations: bf16, the same under both: per block, activation_elements_per_token for every
      token of a micro-batch (max_seq_len per sample for the LLM, `tokens_per_image` for a tower
      block that trains), or with gradient checkpointing each block's input plus one block
      recomputed; plus the fp32 logits and their gradient (2 x 4 x vocabulary per token).
    An estimate (the allocator's fragmentation and temporary buffers are not in it): leave 10-20%."""
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    blocks = set(map(id, transformer_blocks(model)))
    largest_block, kept, recomputed = 0, 0, 0
    for name, block in model.named_modules():
        if id(block) not in blocks:
            continue
        largest_block = max(largest_block, sum(p.numel() for p in block.parameters()))
        reads_image = any(part in name for part in ("vision", "qformer", "projector"))  # the tower and connector
        if reads_image and not any(p.requires_grad for p in block.parameters()):
            continue  # a frozen tower keeps nothing for backward: no gradient flows into it
        tokens = micro_batch_size * (tokens_per_image if reads_image else max_seq_len)
        width = next(m for m in block.modules() if isinstance(m, torch.nn.Linear)).in_features
        full = 2 * tokens * activation_elements_per_token(block)
        kept += 2 * tokens * width if gradient_checkpointing else full
        recomputed = max(recomputed, full if gradient_checkpointing else 0)
    head = next((module for name, module in model.named_modules() if name.endswith("lm_head")), None)
    vocabulary = head.out_features if head is not None else 0
    activations = kept + recomputed + 2 * 4 * micro_batch_size * max_seq_len * vocabulary
    estimates = {"ddp": {"weights": 4 * total, "gradients": 4 * trainable, "optimizer": 8 * trainable},
                 "fsdp": {"weights": 4 * total / processes + 2 * 2 * largest_block,
                          "gradients": 4 * trainable / processes, "optimizer": 8 * trainable / processes}}
    for estimate in estimates.values():
        estimate["activations"] = activations
        estimate["total"] = sum(estimate.values())
    return estimates


def format_bytes(count: float) -> str:
    return f"{count / 2 ** 30:.1f} GiB" if count >= 2 ** 30 else f"{count / 2 ** 20:.1f} MiB"
