"""The generation engine: prefill the prompt into the model's cache, then decode token by token.

Every decoder family makes its own cache (``model.make_cache``) and steps on it
(``model(idx, cache=cache)``), so the engine never asks which family it drives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.sampling import SamplingParams, next_token


def check_prompt(prompt_ids: list[int], block_size: int | None) -> None:
    """Refuse an empty prompt or one that fills the whole context (nothing could be generated)."""
    if not prompt_ids:
        raise LmlabError("the prompt is empty; give at least one token of text")
    if block_size is not None and len(prompt_ids) >= block_size:
        raise LmlabError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {block_size}; "
                         f"shorten the prompt")


@torch.inference_mode()  # like no_grad, and cheaper per operation (no autograd bookkeeping at all)
def generate_tokens(model: nn.Module, prompt_ids: list[int], params: SamplingParams,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token, max_new_tokens, or the context is full.

    ``use_cache=False`` recomputes the whole sequence at every step (slow; the reference the cache
    is tested against).
    """
    params.validate()
    block_size = getattr(model, "block_size", None)
    check_prompt(prompt_ids, block_size)
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    limit = params.max_new_tokens
    if block_size is not None:
        limit = min(limit, block_size - len(prompt_ids))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = model.make_cache(1, len(prompt_ids) + limit) if use_cache else None
    step_input = ids
    for _ in range(limit):
        logits, _ = model(step_input if use_cache else ids, cache=cache, only_last=True)
        token = next_token(logits[:, -1], params, generator)  # (1,)
        tid = int(token.item())
        yield tid
        if tid in params.stop_tokens:
            return
        step_input = token.view(1, 1)
        if not use_cache:  # only the recompute path needs the whole sequence so far
            ids = torch.cat([ids, step_input], dim=1)


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of ``prompt``; ``on_text`` receives the text as it is produced.

    The end-of-text token and ``params.stop_tokens`` stop generation and are not part of the text.
    """
    params.stop_tokens = list(dict.fromkeys([*params.stop_tokens, tokenizer.eot_id]))
    decoder = tokenizer.stream_decoder()
    pieces = []
    for tid in generate_tokens(model, tokenizer.encode(prompt), params):
        if tid in params.stop_tokens:
            break
        pieces.append(decoder.step(tid))
        if pieces[-1] and on_text is not None:
            on_text(pieces[-1])
    pieces.append(decoder.flush())  # text held back at the end (an incomplete character)
    if pieces[-1] and on_text is not None:
        on_text(pieces[-1])
    return "".join(pieces)


def print_stream(text: str) -> None:
    """An ``on_text`` callback that writes to stdout immediately."""
    sys.stdout.write(text)
    sys.stdout.flush()
