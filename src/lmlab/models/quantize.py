"""Weights laid out for decoding on a CPU: fp32 in blocks, bf16 and weight-only int8.

Decoding reads every weight once per token and does two flops with each: it is bound by memory
traffic, so fewer bytes per weight, and reading them on every core, mean more tokens per second.
Three forms, all for inference only:

- ``fp32``: the weights as they are, a few rows multiplied by each Linear's weight as one batched matmul
  over blocks of its output rows (``BlockedLinear``), which streams the weights several times faster
  than torch's one-row fp32 matmul.

- ``bf16``: the whole model in bfloat16, each Linear's weight pre-packed once into oneDNN's blocked
  layout (``PackedBf16Linear``). A plain bf16 ``F.linear`` of one row is slower than fp32 on a CPU
  (measured: docs/inference.md), the packed one is not.
- ``int8``: the same bf16 model with every Linear's weight stored as int8 and one scale per output
  channel (``Int8Linear``, weight-only: activations stay bf16), a quarter of fp32's bytes. The matmul
  dequantizes on the fly in ``torch._weight_int8pack_mm``, torch's CPU kernel for this (the one
  torchao calls; torchao itself is not needed). That kernel is fast with bf16 activations only, so
  int8 implies bf16 activations.

``for_decoding(model, dtype)`` converts a model in place; LoRA adapters are merged first.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.models.lora import has_lora, remove_lora

DECODE_DTYPES = ("fp32", "bf16", "int8")

log = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    """A Linear with weight-only int8: w ~= q * scale, q in [-127, 127], scale = max|w row| / 127 per output."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (out, in)
        # the kernel multiplies by the scale in the activations' dtype: round to it first, quantize against that
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(dtype)  # (out,)
        self.register_buffer("weight", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale)  # (N, out)
        if self.bias is not None:
            y.add_(self.bias)  # in place: y is new
        return y.view(*x.shape[:-1], self.out_features)


class PackedBf16Linear(nn.Module):
    """A bf16 Linear whose weight is packed once into oneDNN's blocked layout (what torch.compile's
    freezing does for a CPU), so a one-row matmul runs at bf16 speed instead of a slow fallback."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        # an opaque oneDNN tensor: an attribute, not a buffer (it cannot be saved or moved, only run)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class BlockedLinear(nn.Module):
    """An fp32 Linear for decoding on a CPU: the weight's output rows taken as ``blocks`` equal blocks, and
    a few input rows multiplied by all of them in one batched matmul (bmm) with the input as a transposed
    column, each output still one dot product over the whole input, as in ``F.linear``.

    torch's one-row fp32 ``F.linear`` (MKL's GEMV) reads the weights at ~10 GB/s on a 2-core AMD EPYC; the
    blocked bmm takes another kernel and reads them at ~37 GB/s there, and is faster even at one thread
    (docs/inference.md). The weight is the Linear's own, viewed (no copy) unless the output width needs
    padding to a multiple of ``blocks``. Up to SPLIT_ROWS rows (decoding: a row per sequence) take the bmm;
    more (a prompt) a plain ``F.linear``.
    """

    SPLIT_ROWS = 32

    def __init__(self, linear: nn.Linear, blocks: int | None = None):
        """``blocks``: the number of output-row blocks, by default torch's thread count (at least 2)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocks = blocks or max(2, torch.get_num_threads())
        self.pad = -self.out_features % self.blocks  # zero rows that make the width a multiple of blocks
        weight, bias = linear.weight.detach().float(), linear.bias
        bias = None if bias is None else bias.detach().float()
        if self.pad:
            weight = torch.cat([weight, weight.new_zeros(self.pad, self.in_features)])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(self.pad)])
        self.register_buffer("weight", weight.view(self.blocks, -1, self.in_features))  # (blocks, out / blocks, in)
        self.register_buffer("bias", None if bias is None else bias.view(self.blocks, -1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decoding runs this ~25 times a token: few ops, each one costs more in dispatch than in work
        rows, width = x.numel() // self.in_features, self.out_features + self.pad
        if rows > self.SPLIT_ROWS:
            weight, bias = self.weight.view(width, -1), None if self.bias is None else self.bias.view(-1)
            y = F.linear(x, weight, bias)
            return y[..., :self.out_features].contiguous() if self.pad else y
        # (blocks, in, R), no copy; these transposed strides are what picks torch's fast kernel (the same
        # column with stride 1 is ~4x slower)
        columns = x.reshape(rows, self.in_features).t().expand(self.blocks, -1, -1)
        if self.bias is None:
            y = torch.bmm(self.weight, columns)
        else:
            y = torch.baddbmm(self.bias, self.weight, columns)  # (blocks, width / blocks, R)
        if rows > 1 or self.pad:
            y = y.view(width, rows).t()[:, :self.out_features].contiguous()  # (R, out)
        return y.reshape(*x.shape[:-1], self.out_features)


_blocked_verdicts: dict[tuple, bool] = {}  # (threads, weight shapes) -> BlockedLinear is faster: probed once


def blocked_pays(linears: list[nn.Linear]) -> bool:
    """Whether ``BlockedLinear`` multiplies one row by these fp32 linears faster than ``F.linear`` on this
    machine: both timed over all of them (so the weights stream from memory, as in decoding), best of 3
    interleaved rounds, once per process, thread count and set of shapes. The kernels torch picks differ
    between CPUs and builds, so this is measured, not assumed."""
    key = (torch.get_num_threads(), tuple(tuple(m.weight.shape) for m in linears))
    if key not in _blocked_verdicts:
        blocked = [BlockedLinear(m) for m in linears]
        inputs = [torch.randn(1, m.in_features) for m in linears]
        times = {"blocked": float("inf"), "plain": float("inf")}
        with torch.inference_mode():
            for _ in range(3):
                for kind, layers in (("plain", linears), ("blocked", blocked)):
                    start = time.perf_counter()
                    for layer, x in zip(layers, inputs):
                        layer(x)
                    times[kind] = min(times[kind], time.perf_counter() - start)
        _blocked_verdicts[key] = times["blocked"] < times["plain"]
        log.info("fp32 decoding: %s matmuls (one row through the model's %d linears: blocked %.2f ms, plain "
                 "F.linear %.2f ms)", "blocked" if _blocked_verdicts[key] else "plain", len(linears),
                 1000 * times["blocked"], 1000 * times["plain"])
    return _blocked_verdicts[key]


def for_decoding(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` converted in place for decoding in ``dtype`` (one of DECODE_DTYPES); returns it.

    fp32 keeps the weights in fp32 and, on a CPU, replaces every nn.Linear by a ``BlockedLinear`` where that
    is faster here (``blocked_pays``). bf16 and int8 cast the model to bfloat16 and replace every nn.Linear
    by a ``PackedBf16Linear`` or an ``Int8Linear``; there a tied output layer gets its own copy (the
    embedding it shares stays as it is). The blocked, packed and int8 kernels are torch's CPU ones: on
    another device fp32 and bf16 are plain casts and int8 is refused.
    """
    if dtype not in DECODE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype == "fp32" and not on_cpu:
        return model.float()
    if dtype == "int8" and not on_cpu:
        raise ConfigError("int8 weights are for decoding on a CPU (--device cpu); use bf16 on a GPU")
    if has_lora(model):
        remove_lora(model)
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if dtype == "fp32":
        model.float()  # the probe and the blocks read fp32 weights
        swap = BlockedLinear if linears and blocked_pays([m for _, m in linears]) else None
    elif dtype == "int8":
        swap = Int8Linear
    else:
        swap = PackedBf16Linear if on_cpu and torch.backends.mkldnn.is_available() else None
    # made from the fp32 weights, before the cast
    swaps = [] if swap is None else [(name, swap(m)) for name, m in linears]
    model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model

