"""Running the dataflow in several processes at once, under `torchrun` or `accelerate launch`.

Every process runs the whole DAG. The Hugging Face Trainer does the data-parallel training
(DDP: gloo on CPU, nccl on GPU; or FSDP / DeepSpeed when asked) from the launcher's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Evaluation batches are shared
out between the processes and the results gathered, so every process ends with the same
predictions as a single-process run; when the weights themselves are sharded (FSDP, ZeRO-3),
every process instead takes part in every batch. Only the main process writes files and prints;
the others wait for it. In a single process all of this reduces to doing the work once.
"""

import sys
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers.integrations import is_deepspeed_zero3_enabled

T = TypeVar("T")


def _state() -> PartialState:
    """The processes of this run (joined on first use, as the Trainer also does): gloo on a
    machine without CUDA, nccl with one GPU per process (cuda:LOCAL_RANK) otherwise."""
    return PartialState(cpu=not torch.cuda.is_available())


def process_device() -> torch.device:
    """This process's device: its own GPU under a launcher, the GPU or the CPU otherwise."""
    return _state().device


def world_size() -> int:
    """How many processes run the dataflow together (1 without a launcher)."""
    return _state().num_processes


def is_main_process() -> bool:
    """Whether this process writes the files and prints the summary (rank 0)."""
    return _state().is_main_process


def weights_sharded(model: torch.nn.Module) -> bool:
    """Whether each process holds only a shard of the model's weights (FSDP, DeepSpeed ZeRO-3),
    so that every forward pass needs every process."""
    if is_deepspeed_zero3_enabled():
        return True
    # a model can only be wrapped by FSDP once its module is imported (~0.5 s: not imported here)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    wrapped = (fsdp.FSDPModule, fsdp.FullyShardedDataParallel)
    return any(isinstance(module, wrapped) for module in model.modules())


def this_process_share(items: list[T], model: torch.nn.Module) -> list[T]:
    """The items this process runs `model` on: every world_size-th one, starting at its rank;
    all of them when the model's weights are sharded."""
    if weights_sharded(model):
        return items
    state = _state()
    return items[state.process_index :: state.num_processes]


def gathered(results: list[T], model: torch.nn.Module) -> list[T]:
    """Every process's `results` of `this_process_share`, concatenated in rank order, on every
    process (its own results when the model's weights are sharded: it ran every item)."""
    if world_size() == 1 or weights_sharded(model):
        return results
    return gather_object(results)


def wait_for_everyone() -> None:
    """Blocks until every process gets here (nothing to wait for in a single process)."""
    _state().wait_for_everyone()


def end() -> None:
    """Leaves the process group, if one was joined, before the process exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _state().wait_for_everyone()
        torch.distributed.destroy_process_group()
