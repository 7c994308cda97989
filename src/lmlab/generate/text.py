"""Text for a person at a terminal: a prompt from an argument or a file, and its continuation written
to a stream as it is produced, as several seeded samples, or by beam search (``lmlab generate``); for
an encoder-decoder, sources (an argument, or a file of one per line) and their targets, a line each."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Annotated, TextIO

import torch.nn as nn
from pydantic import Field

from lmlab.config import Finite, check_argument
from lmlab.data.sources import iter_lines
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError, LmlabError
from lmlab.generate.engine import beam_search, fit_prompt, generate_text, generate_texts
from lmlab.generate.sampling import SamplingParams
from lmlab.generate.seq2seq import encode_sources, fit_source, seq2seq_completions
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


def check_input_flags(checkpoint: str, encoder_decoder: bool, given: list[str]) -> None:
    """Refuse the prompt flags for an encoder-decoder and the source flags for a decoder, naming the right
    ones (``given``: the input flags the user gave, as spelled on the command line)."""
    wrong = [f for f in given if f in (PROMPT_FLAGS if encoder_decoder else SOURCE_FLAGS)]
    if wrong and encoder_decoder:
        raise ConfigError(f"{checkpoint} is an encoder-decoder: give its source with --source TEXT or --source-file "
                          f"FILE ({', '.join(wrong)} is for decoder-only language models)")
    if wrong:
        raise ConfigError(f"{checkpoint} is a decoder-only language model: give a prompt with --prompt TEXT or "
                          f"--prompt-file FILE ({', '.join(wrong)} is for encoder-decoders)")


PROMPT_FLAGS = ("--prompt", "--prompt-file", "--truncate-prompt")
SOURCE_FLAGS = ("--source", "--source-file", "--truncate-source")


def read_sources(source: str | None, source_file: str | None) -> list[str]:
    """The sources to write targets for: [``source``], or the lines of ``source_file`` (UTF-8, .gz too, one
    source per line, as an aligned pairs file holds them; exactly one of the two). A blank line is refused
    with its line number rather than skipped, so that output line i stays the target of input line i."""
    if (source is None) == (source_file is None):
        raise LmlabError("give a source with --source TEXT or --source-file FILE (one of them)")
    if source is not None:
        return [source]
    sources = list(iter_lines(source_file))
    blank = next((n for n, line in enumerate(sources, 1) if not line.strip()), None)
    if blank is not None:
        raise DataError(f"{source_file}:{blank}: the source is empty (one source per line, none blank)")
    if not sources:
        raise DataError(f"{source_file}: no sources (one source per line)")
    return sources


def one_line(text: str) -> str:
    """``text`` on one line (its line breaks as spaces): one output line per source, whatever the model wrote."""
    return " ".join(text.splitlines())


def write_targets(model: nn.Module, tokenizer: Tokenizer, sources: list[str], params: SamplingParams,
                  out: TextIO | None = None, num_beams: int = 1, length_penalty: float = 1.0, num_samples: int = 1,
                  truncate: bool = False, stream: bool = True, batch_size: int = 32) -> None:
    """Write the target an encoder-decoder generates for each source to ``out`` (default: stdout).

    One source and one sample: its target streams as produced (``stream``). Otherwise one line per source
    (a target's own line breaks as spaces), in input order, ``num_samples`` lines per source (seeded seed,
    seed + 1, ...); at most ``batch_size`` sources decode at once; ``num_beams`` > 1: the best beam.
    A source longer than the model reads is refused, or with ``truncate`` cut to its first tokens.
    """
    check_generation_options(num_beams, length_penalty, num_samples)
    out = out or sys.stdout
    ids = []
    for n, source_ids in enumerate(encode_sources(tokenizer, sources), 1):
        try:
            fitted = fit_source(source_ids, model.context_length, truncate)
        except LmlabError as e:
            raise type(e)(f"source {n}: {e}" if len(sources) > 1 else str(e)) from None
        if len(fitted) < len(source_ids):
            log.info(f"note: source {n} cut to its first {len(fitted)} of {len(source_ids)} tokens")
        ids.append(fitted)
    if model.context_length is not None and params.max_new_tokens > model.context_length:
        log.info(f"note: targets stop at {model.context_length} tokens, the model's block_size")
    if num_beams > 1:
        warn_ignored_by_beam_search(params)
    rows = [source for source in ids for _ in range(num_samples)]
    row_params = seeded_samples(params, num_samples) * len(ids)

    if stream and len(rows) == 1 and num_beams == 1:
        def write(_row: int, piece: str) -> None:
            out.write(piece)
            out.flush()

        seq2seq_completions(model, tokenizer, rows, row_params, on_text=write)
        out.write("\n")
        out.flush()
        return
    finished: dict[int, str] = {}
    written = 0

    def write_ready(row: int, completion) -> None:
        """Write the targets whose turn has come: each row as soon as every earlier row is done."""
        nonlocal written
        finished[row] = one_line(completion.text)
        while written in finished:
            out.write(finished.pop(written) + "\n")
            written += 1
        out.flush()

    seq2seq_completions(model, tokenizer, rows, row_params, num_beams, length_penalty, batch_size, on_done=write_ready)
