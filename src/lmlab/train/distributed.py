"""Training on several processes with PyTorch's own engine (torch.distributed, DDP, FSDP2).

    torchrun --nproc-per-node 2 -m lmlab.cli train cfg.yaml

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the loop joins the process group
(nccl on CUDA, one GPU per process: cuda:LOCAL_RANK; gloo elsewhere) and wraps the model in
DistributedDataParallel (``train.distributed: ddp``) or shards it with FSDP2 (``fsdp``: every block of
each nn.ModuleList, then the whole model). Each rank computes rows ``rank::world`` of the same global
batch a single process would draw, so the steps are those of one process (up to float reduction order).
Checkpoints keep the weights consolidated (one model.safetensors, gathered to rank 0, which every other
command reads as it is). Under FSDP2 the optimizer state, twice the weights, is never gathered: every
rank writes its shard with torch.distributed.checkpoint into the checkpoint's ``optimizer/`` folder,
which resumes on any number of processes, sharded or not (torch.distributed.checkpoint reshards it).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from lmlab.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> torch.device:
    """Join the process group when ``launched()``; return this process's device (cuda:LOCAL_RANK on CUDA),
    or ``device`` unchanged for a single process."""
    if not launched() or active():
        return _local(device) if active() else device
    if not dist.is_available():
        raise ConfigError("this torch has no torch.distributed; run without torchrun")
    device = _local(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    atexit.register(teardown)
    if is_main():
        log.info("distributed: %d processes, backend %s", world_size(), backend)
    else:  # library code logs on rank 0 only; the others say only what goes wrong
        logging.getLogger("lmlab").setLevel(logging.WARNING)
    return device


def _local(device: torch.device) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) for a CUDA device, else ``device``."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    if active():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 for a single process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 for a single process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing for a single process)."""
    if active():
        dist.barrier()


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself for a single process)."""
    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def all_sum(value: float, device: torch.device) -> float:
    """The sum of ``value`` over the ranks, in float64 (``value`` itself for a single process)."""
    if not active():
        return value
    box = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.SUM)
    return float(box.item())


def rank0_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself for a single process): a decision that each rank
    could make otherwise (is time up?) made once, so that all ranks act on it together."""
    if not active():
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.broadcast(box, src=0)
    return bool(box.item())


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module to run forward and backward through: ``model`` in DDP, or ``model`` itself sharded in
    place by FSDP2 (``mode`` "fsdp"); ``model`` unchanged for a single process."""
    if not active():
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (the members of its nn.ModuleLists): FSDP2's units, and what
    activation checkpointing recomputes."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (train.activation_checkpointing):
    PyTorch's composable ``checkpoint``, which keeps the parameter names and works under DDP and FSDP2."""
    from torch.distributed._composable import checkpoint
    for block in blocks(model):
        checkpoint(block)


def gradient_sync(forward_model: nn.Module, sync: bool):
    """A context in which backward all-reduces gradients (``sync``) or only accumulates them locally
    (the micro-batches before a step's last)."""
    if sync or not active():
        return contextlib.nullcontext()
    if hasattr(forward_model, "no_sync"):  # DDP
        return forward_model.no_sync()
    return _fsdp_no_sync(forward_model)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2's equivalent of DDP's no_sync: hold gradients unreduced for the block."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights of an FSDP2 model, on the CPU of rank 0 ({} on the others).
    Every rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single process's ``optimizer.state_dict()`` (a checkpoint of a run that was not sharded)
    into the optimizer of an FSDP2 model, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    order = _names_in_optimizer_order(model, optimizer)
    named = {"state": {order[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=_options())


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the optimizer state of an FSDP2 model into ``folder`` with torch.distributed.checkpoint:
    each rank its own shard (one .distcp file per rank and a .metadata file). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load the optimizer state ``save_sharded_optimizer`` wrote into ``optimizer``, whatever the number of
    processes now and whether ``model`` is sharded or not: torch.distributed.checkpoint reshards it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)  # this run's layout, filled in place by dcp.load
    try:
        dcp.load({"optimizer": state}, checkpoint_id=str(folder))
    except CheckpointException as e:  # a BaseException: make it an error that reaches the user
        raise RuntimeError(f"{folder} does not load: {first_line(e)[:200]}") from None
    set_optimizer_state_dict(model, optimizer, state)


def rank0_temporary(path: Path, what: str) -> Path:
    """``.NAME.WHAT.tmp-PID`` beside ``path``, with rank 0's process id on every rank: a temporary folder
    the ranks write together, which ``runs.remove_stale_temporaries`` removes if rank 0 dies."""
    pid = [os.getpid()]
    if active():
        dist.broadcast_object_list(pid, src=0)
    return path.with_name(f".{path.name}.{what}.tmp-{pid[0]}")


def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of ``model`` in the order the optimizer numbers its parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
