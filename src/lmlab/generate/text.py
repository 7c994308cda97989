"""Text for a person at a terminal: a prompt from an argument or a file, and its continuation written
to a stream as it is produced, as several seeded samples, or by beam search (``lmlab generate``)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Annotated, TextIO

import torch.nn as nn
from pydantic import Field

from lmlab.config import Finite, check_argument
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, LmlabError
from lmlab.generate.engine import beam_search, fit_prompt, generate_text, generate_texts
from lmlab.generate.sampling import SamplingParams
from lmlab.runs import read_text_file

log = logging.getLogger(__name__)


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text: ``prompt``, or the UTF-8 text of ``prompt_file`` (exactly one of them)."""
    if (prompt is None) == (prompt_file is None):
        raise LmlabError("give a prompt with --prompt TEXT or --prompt-file FILE (one of them)")
    if prompt is not None:
        return prompt
    return read_text_file(prompt_file, "prompt")


def seeded_samples(params: SamplingParams, count: int) -> list[SamplingParams]:
    """``count`` copies of ``params``, the i-th seeded with seed + i, so that a batch of samples differs
    from row to row yet reproduces as a whole (no seed: each row draws its own)."""
    if count < 1:
        raise LmlabError(f"--num-samples must be at least 1, got {count}")
    return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(count)]


MAX_BEAMS = MAX_SAMPLES = 1000


def check_generation_options(num_beams: int, length_penalty: float, num_samples: int) -> None:
    """Refuse a beam count or sample count outside [1, 1000], a non-finite length penalty, and beams
    together with several samples (beam search returns one best continuation)."""
    check_argument("num_beams", num_beams, Annotated[int, Field(ge=1, le=MAX_BEAMS)])
    check_argument("num_samples", num_samples, Annotated[int, Field(ge=1, le=MAX_SAMPLES)])
    check_argument("length_penalty", length_penalty, Finite)
    if num_beams > 1 and num_samples > 1:
        raise ConfigError("num_beams and num_samples do not combine: beam search gives one best continuation")


def warn_if_context_fills(context: int | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """Log a warning when the model's context leaves room for fewer than ``max_new_tokens`` new tokens
    after the prompt: generation stops when the context is full."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        log.warning(f"the model's context of {context} tokens leaves room for at most {context - prompt_tokens} "
                    f"new tokens after the {prompt_tokens}-token prompt, not {max_new_tokens}")


BEAM_IGNORES = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
                "stop")


def warn_ignored_by_beam_search(params: SamplingParams) -> None:
    """Say which sampling settings beam search (deterministic, ends at end-of-text) does not use, rather
    than ignore them without a word."""
    defaults = SamplingParams()
    ignored = ["--" + name.replace("_", "-") for name in BEAM_IGNORES if getattr(params, name) != getattr(defaults, name)]
    if ignored:
        log.warning(f"beam search keeps the most likely beams and ignores {', '.join(ignored)}")


def write_generation(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                     out: TextIO | None = None, num_beams: int = 1, length_penalty: float = 1.0,
                     num_samples: int = 1, truncate: bool = False, stream: bool = True) -> None:
    """Write the prompt and its continuation to ``out`` (default: stdout): streamed as produced (one sample), each sample
    when all are done (``num_samples`` > 1, one batch), or the best beam (``num_beams`` > 1)."""
    check_generation_options(num_beams, length_penalty, num_samples)
    out = out or sys.stdout
    ids = tokenizer.encode(prompt)
    fitted = fit_prompt(ids, model.context_length, params.max_new_tokens, truncate)
    if len(fitted) < len(ids):
        log.info(f"note: prompt truncated from the left to its last {len(fitted)} of {len(ids)} tokens")
        prompt = tokenizer.decode(fitted)
    warn_if_context_fills(model.context_length, len(fitted), params.max_new_tokens)
    if num_beams > 1:
        warn_ignored_by_beam_search(params)
        new = beam_search(model, fitted, num_beams, params.max_new_tokens, [tokenizer.eot_id], length_penalty)
        out.write(prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id]) + "\n")
    elif num_samples > 1:
        samples = seeded_samples(params, num_samples)
        for i, done in enumerate(generate_texts(model, tokenizer, [fitted] * num_samples, samples)):
            out.write(f"--- sample {i + 1} ---\n{prompt}{done.text}\n")
    elif not stream:
        out.write(prompt + generate_text(model, tokenizer, fitted, params) + "\n")
    else:
        def write(piece: str) -> None:
            out.write(piece)
            out.flush()

        write(prompt)
        generate_text(model, tokenizer, fitted, params, on_text=write)
        out.write("\n")
    out.flush()
