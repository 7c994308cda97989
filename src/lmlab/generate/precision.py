"""The dtype a model decodes in: ``--dtype auto|fp32|bf16|int8`` of generate, chat and serve.

``auto`` probes, never assumes: on a CPU with bf16 matrix units (runtime.cpu_bf16_units) it times a
few one-token decoding steps of the model itself in each dtype and keeps the fastest, logging the
times (docs/inference.md has what it chooses on the benchmark machine and why). Elsewhere it keeps
fp32 on a CPU (bf16 and int8 kernels without bf16 units are slower) and takes bf16 on a GPU that has it.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn as nn

from lmlab.generate.engine import BatchGeneration
from lmlab.generate.sampling import SamplingParams
from lmlab.models.quantize import DECODE_DTYPES, for_decoding
from lmlab.runtime import cpu_bf16_units

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", *DECODE_DTYPES)
PROBE_PROMPT, PROBE_STEPS, PROBE_ROUNDS = 8, 8, 5
AUTO_MIN_GAIN = 1.1  # bf16 must be this much faster than fp32, int8 than the faster of those, to be chosen


def for_decoding_as(model: nn.Module, dtype: str) -> tuple[nn.Module, str]:
    """``model`` (fp32 or as loaded) converted for decoding in ``dtype`` (``DTYPE_CHOICES``); returns it and
    the dtype it decodes in (what ``auto`` chose)."""
    if dtype == "auto":
        dtype = choose_dtype(model)
    return for_decoding(model, dtype), dtype


def choose_dtype(model: nn.Module) -> str:
    """What ``auto`` means for ``model`` where it is: on a CPU with bf16 units, the dtype whose decoding step
    was fastest in PROBE_ROUNDS rounds that time each in turn (copies of the model in each are held meanwhile),
    where one that rounds the weights more must be AUTO_MIN_GAIN times faster to win (a tie keeps precision)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        log.info("dtype auto: %s (%s GPU)", choice, "a bf16" if choice == "bf16" else "no bf16 on this")
        return choice
    units = cpu_bf16_units() if device.type == "cpu" else ""
    if not units:
        log.info("dtype auto: fp32 (%s)", "CPU has no bf16 matrix units" if device.type == "cpu" else device.type)
        return "fp32"
    candidates = {dtype: for_decoding(copy.deepcopy(model), dtype) for dtype in DECODE_DTYPES}
    times = dict.fromkeys(candidates, float("inf"))
    for _ in range(PROBE_ROUNDS):  # round-robin, so that a burst of load from elsewhere falls on all alike
        for dtype, candidate in candidates.items():
            times[dtype] = min(times[dtype], step_seconds(candidate))
    choice = "fp32"  # a dtype that rounds more must be clearly faster than the best that rounds less
    for dtype in DECODE_DTYPES[1:]:
        if times[dtype] * AUTO_MIN_GAIN <= times[choice]:
            choice = dtype
    log.info("dtype auto: %s (CPU has %s; one-token decoding step %s)", choice, units,
             ", ".join(f"{d} {1000 * s:.2f} ms" for d, s in times.items()))
    return choice


def step_seconds(model: nn.Module) -> float:
    """Seconds per one-token greedy decoding step of ``model`` at batch 1: PROBE_STEPS steps after a prefill
    of PROBE_PROMPT tokens, through the generation engine, the better of two runs (the first warms up)."""
    params = SamplingParams(max_new_tokens=PROBE_STEPS + 1, temperature=0)
    best = float("inf")
    for _ in range(2):
        generation = BatchGeneration(model, [[0] * PROBE_PROMPT], [params])
        generation.step()  # the prefill, not timed
        start = time.perf_counter()
        for _ in range(PROBE_STEPS):
            generation.step()
        best = min(best, (time.perf_counter() - start) / PROBE_STEPS)
    return best
