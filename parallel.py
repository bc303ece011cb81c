"""Training on many processes: the process group, DDP or FSDP2 around the model, torch.compile per
block, the sharded training state on disk, and the memory a stage needs per GPU.

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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

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
        return requires_gradient_sync(train_model, False)
    return nullcontext()


@contextmanager
def requires_gradient_sync(model: FSDPModule, enabled: bool):
    model.set_requires_gradient_sync(enabled)
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
