"""Where and how tensors compute: the device, the precision, threads, random state and memory.

Every part of lmlab that runs a model (training, evaluation, generation, serving) asks this module,
so that ``--device auto`` and ``precision: auto`` mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys

import torch

from lmlab.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to torch.device.

    Checked here as well as in the config (train.device): the commands' ``--device`` comes straight here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but this torch sees no CUDA GPU")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to compute in: ``auto`` means bf16 on GPUs that support it and fp32 elsewhere.

    ``precision`` is one of train.precision's choices (the config checks that); whether fp16 fits the
    device can only be told here, once the device is known.
    """
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA GPU (it uses a GradScaler); use bf16 or fp32")
    return precision


def autocast_context(precision: str, device: torch.device):
    """Mixed-precision autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads on CPU when ``threads`` is given (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far (MiB): allocated tensors on a CUDA device, else the process's peak RSS.

    The peak RSS is VmHWM from /proc on Linux (``ru_maxrss`` would include a parent's peak, which
    Linux carries over through fork and exec); other systems fall back to ``ru_maxrss``.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def rng_state() -> dict:
    """Every random state a training step may consume (dropout, Python's random)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch and Python's random (NumPy draws in lmlab use their own seeded generators)."""
    torch.manual_seed(seed)
    random.seed(seed)


_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation that failed (torch on CPU, CUDA or MPS, or Python's MemoryError), naming the
    size asked for where torch says it; None for any other error."""
    if not isinstance(error, MemoryError) and not (isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error))):
        return None
    asked = re.search(r"tried to allocate (\d+ bytes|[\d.]+ ?[KMGT]?i?B)", str(error), re.IGNORECASE)
    size = f" (tried to allocate {asked.group(1)})" if asked else ""
    return f"out of memory{size}; use a smaller model, batch size, context or input"
