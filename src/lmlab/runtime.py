"""Where and how tensors compute: the device, the precision, threads, random state and memory.

Every part of lmlab that runs a model (training, evaluation, generation, serving) asks this module,
so that ``--device auto`` and ``precision: auto`` mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import sys
import time

import torch

from lmlab.errors import ConfigError

log = logging.getLogger(__name__)


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


def resolve_precision(precision: str, device: torch.device, width: int | None = None) -> str:
    """The precision to compute in. ``auto`` means bf16 on GPUs that support it; on a CPU, bf16 when it has
    bf16 matrix units (AMX, AVX512-BF16), the model's width (``width``: d_model) is at least
    ``BF16_MIN_WIDTH`` and a timing probe at that width finds bf16 matmuls at least ``BF16_MIN_GAIN``
    times faster than fp32; fp32 elsewhere (and on a CPU when ``width`` is not known yet). See
    docs/performance.md.

    ``precision`` is one of train.precision's choices (the config checks that); whether fp16 fits the
    device can only be told here, once the device is known.
    """
    if precision == "auto":
        return _auto_precision(device, width)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA GPU (training uses a GradScaler); use bf16 or fp32")
    return precision


# bf16 autocast must beat fp32 by this much on the probe's matmul: casts, norms and the optimizer stay in fp32,
# so a smaller matmul gain is eaten up; and below BF16_MIN_WIDTH it never paid in training (docs/performance.md).
BF16_MIN_GAIN = 1.3
BF16_MIN_WIDTH = 256


def _auto_precision(device: torch.device, width: int | None) -> str:
    """``resolve_precision("auto", ...)``: the choice, logged once with its reason when it is made for a model."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu" or width is None:
        return "fp32"
    units = cpu_bf16_units()
    if not units:
        log.info("precision auto: fp32 (CPU has no bf16 matrix units)")
        return "fp32"
    if width < BF16_MIN_WIDTH:
        log.info("precision auto: fp32 (CPU has %s, but d_model %d < %d is too narrow for bf16 to pay)",
                 units, width, BF16_MIN_WIDTH)
        return "fp32"
    gain = matmul_tflops(torch.bfloat16, width, device) / matmul_tflops(torch.float32, width, device)
    choice = "bf16" if gain >= BF16_MIN_GAIN else "fp32"
    log.info("precision auto: %s (CPU has %s; bf16 matmul %.1fx fp32 at %dx%d, bf16 needs %.1fx)",
             choice, units, gain, width, 4 * width, BF16_MIN_GAIN)
    return choice


def cpu_bf16_units() -> str:
    """The CPU's native bf16 matrix units ("AMX", "AVX512-BF16", "AMX and AVX512-BF16"), or "" if none.

    Asks torch (``torch._C._cpu._get_cpu_capability``, torch 2.x on x86) and else /proc/cpuinfo's flags.
    """
    flags = _cpu_flags()
    names = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " and ".join(names)


def _cpu_flags() -> set[str]:
    """The CPU feature flags torch reports as present, else those of /proc/cpuinfo (empty when neither says)."""
    capability = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if capability is not None:
        try:
            return {k for k, v in capability().items() if v is True}
        except (RuntimeError, AttributeError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_MATMUL_TFLOPS: dict[tuple, float] = {}
PROBE_ROWS = 2048  # rows of the probe's activations: a micro-batch's tokens (e.g. 16 x 128)


def matmul_tflops(dtype: torch.dtype, n: int, device: torch.device) -> float:
    """Measured TFLOP/s of a (PROBE_ROWS x n) @ (n x 4n) matmul in ``dtype`` on ``device`` (an MLP's first
    layer at width n): the best of 5 repeats of about 2 ms each after 20 ms of warm-up, measured once per process."""
    key = (dtype, n, str(device))
    if key not in _MATMUL_TFLOPS:
        _MATMUL_TFLOPS[key] = _time_matmul(dtype, n, device)
    return _MATMUL_TFLOPS[key]


def _time_matmul(dtype: torch.dtype, n: int, device: torch.device) -> float:
    """TFLOP/s of ``matmul_tflops``'s matmul, uncached."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, n, generator=gen).to(device, dtype)
    w = torch.randn(n, 4 * n, generator=gen).to(device, dtype)
    flop = 2 * PROBE_ROWS * n * 4 * n
    warm_up = time.perf_counter() + 0.02  # the first calls compile kernels and wake threads: ~20 ms of them
    while time.perf_counter() < warm_up:
        seconds = _timed(x, w, 1, device)
    reps = max(1, min(100, int(2e-3 / seconds)))  # ~2 ms a repeat
    best = min(_timed(x, w, reps, device) for _ in range(5))
    return flop / max(best, 1e-12) / 1e12


def _timed(x: torch.Tensor, w: torch.Tensor, reps: int, device: torch.device) -> float:
    """Seconds per ``x @ w``, over ``reps`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        x @ w
    _sync(device)
    return (time.perf_counter() - start) / reps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense peak TFLOP/s by GPU (vendor datasheets, without sparsity); fp32 is plain FP32 (torch's default matmul
# precision does not use TF32). The first name contained in torch.cuda.get_device_name wins, so the
# more specific names come first. docs/performance.md lists the sources.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},  # SXM
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {},  # no datasheet figures at hand; "A10" below would be wrong for it
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_PEAK_WIDTH = 512  # the CPU's peak is the probe's matmul at least this wide


def peak_tflops(device: torch.device, precision: str, width: int | None = None) -> float | None:
    """The peak TFLOP/s that MFU divides by: a GPU's datasheet figure at ``precision`` (None for a GPU not in
    GPU_PEAK_TFLOPS), a CPU's measured ``matmul_tflops`` at max(width, CPU_PEAK_WIDTH); None elsewhere."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((p for key, p in GPU_PEAK_TFLOPS.items() if key in name), {})
        return peaks.get(precision)
    if device.type == "cpu":
        return matmul_tflops(PRECISION_DTYPES[precision], max(width or 0, CPU_PEAK_WIDTH), device)
    return None


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
