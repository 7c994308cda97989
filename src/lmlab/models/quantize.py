"""Weights laid out for decoding on a CPU: fp32 split in two, bf16 and weight-only int8.

Decoding reads every weight once per token and does two flops with each: it is bound by memory
traffic, so fewer bytes per weight, and reading them on every core, mean more tokens per second.
Three forms, all for inference only:

- ``fp32``: the weights as they are, each Linear's stored transposed and a few rows multiplied as two
  half-products on two threads (``SplitKLinear``): torch's one-row fp32 matmul reads the weights on
  one thread.

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

import torch
import torch.nn as nn

from lmlab.errors import ConfigError
from lmlab.models.lora import has_lora, remove_lora

DECODE_DTYPES = ("fp32", "bf16", "int8")


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


class SplitKLinear(nn.Module):
    """An fp32 Linear for decoding on a CPU: the weight stored transposed, (in, out), and a few rows
    multiplied as two half-products over the two halves of ``in``, one per thread (one bmm), then added.

    torch's one-row fp32 matmul (a GEMV) streams the weights on one thread: 10 GB/s on a 2-core AMD EPYC
    where reading them runs at 43 GB/s; the two halves run at ~24 GB/s (docs/inference.md). Up to
    SPLIT_ROWS rows (decoding: a row per sequence) take that way; more (a prompt) a plain matmul.
    """

    SPLIT_ROWS = 32

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())  # (in, out)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (R, in)
        if len(rows) <= self.SPLIT_ROWS and self.in_features % 2 == 0:
            halves = rows.view(len(rows), 2, -1).transpose(0, 1)  # (2, R, in / 2)
            y = torch.bmm(halves, self.weight_t.view(2, self.in_features // 2, -1)).sum(0)  # (R, out)
        else:
            y = rows @ self.weight_t
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def for_decoding(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` converted in place for decoding in ``dtype`` (one of DECODE_DTYPES); returns it.

    fp32 keeps the weights in fp32 and, on a CPU, replaces every nn.Linear by a ``SplitKLinear``. bf16
    and int8 cast the model to bfloat16 and replace every nn.Linear by a ``PackedBf16Linear`` or an
    ``Int8Linear``. A tied output layer gets its own copy (the embedding it shares stays as it is). The
    split, packed and int8 kernels are torch's CPU ones: on another device fp32 and bf16 are plain casts
    and int8 is refused.
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
    if dtype == "fp32":
        swap = SplitKLinear
    elif dtype == "int8":
        swap = Int8Linear
    else:
        swap = PackedBf16Linear if on_cpu and torch.backends.mkldnn.is_available() else None
    # made from the fp32 weights, before the cast
    swaps = [] if swap is None else [(name, swap(m)) for name, m in model.named_modules() if type(m) is nn.Linear]
    model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model

