"""The ``lmlab`` command line: parses arguments and calls one library function per subcommand.

It holds no logic of its own, and states no default of its own: a flag left out is not passed on,
so the called function's (or config's) default applies, and ``--help`` shows that default, read
from the function when the help is printed (``Default``). Errors of the user's input
(``LmlabError``) are printed as one line ``error: ...`` with exit status 1; Ctrl-C exits with 130.
Results go to stdout; notes, status and progress lines are logged to stderr (``-q``: warnings and
errors only; ``-v``: also debug).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import inspect
import json
import logging
import math
import os
import sys
import typing
from pathlib import Path

from lmlab.errors import ConfigError, LmlabError, first_line
from lmlab.progress import ConsoleHandler

log = logging.getLogger("lmlab.cli")  # named, not __name__: also right under `python -m lmlab.cli`


class Default:
    """The default of a flag that the called function (or dataclass) declares: shown by ``--help``,
    never passed on. ``Default("lmlab.eval.perplexity:evaluate_perplexity", "batch_size")``; the module
    is imported only when the help is printed."""

    def __init__(self, target: str, name: str):
        self.target, self.name = target, name

    def __str__(self) -> str:
        module, attr = self.target.split(":")
        value = inspect.signature(getattr(importlib.import_module(module), attr)).parameters[self.name].default
        return "none" if value is None else str(value)


def given(args: argparse.Namespace, *names: str) -> dict:
    """The flags among ``names`` that the user gave (those left at a ``Default`` are left out)."""
    return {n: getattr(args, n) for n in names if not isinstance(getattr(args, n), Default)}


# ---------------------------------------------------------------------------------------------
# the commands: each reads its flags and calls the library


def cmd_demo(args: argparse.Namespace) -> None:
    from lmlab.demo import run_demo

    run_demo(force=args.force, **given(args, "out_dir", "minutes", "seed"))


TOKENIZER_OPTIONS = ("vocab_size", "min_freq", "field", "max_bytes")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmlab.data.tokenizer import train_tokenizer_from_files
    from lmlab.runs import check_output

    output = check_output(args.output, "tokenizer", args.inputs, force=args.force)
    tok = train_tokenizer_from_files(args.kind, args.inputs, special_tokens=args.special,
                                     **given(args, *TOKENIZER_OPTIONS))
    tok.save(output)
    print(f"wrote {output}: {args.kind} tokenizer, {tok.vocab_size} tokens, sha256 {tok.sha256()[:12]}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmlab.data.filter_report import write_filter_report
    from lmlab.data.filters import filter_table
    from lmlab.data.prepare import check_prepare_output, prepare
    from lmlab.data.tokenizer import tokenizer_for

    if args.tokenizer is not None and not os.path.exists(args.tokenizer):  # a pretrained model's (model.encoder_init)?
        from lmlab.interop.hf import PRETRAINED, resolve_source

        if args.tokenizer in PRETRAINED:
            args.tokenizer = str(resolve_source(args.tokenizer) / "tokenizer.json")
    if args.pairs:
        return cmd_data_prepare_pairs(args)
    if given(args, *PAIR_FLAGS):
        raise ConfigError(f"--{', --'.join(given(args, *PAIR_FLAGS)).replace('_', '-')}: only with --pairs")
    if args.val and given(args, "split", "val_fraction"):  # the val files are the val split
        raise ConfigError(f"--{', --'.join(given(args, 'split', 'val_fraction')).replace('_', '-')}: not used with "
                          f"--val (its files are the val split)")
    check_prepare_output(args.output, args.inputs, args.val, args.test, args.tokenizer, force=args.force)
    filters = filter_config(args)
    tok = tokenizer_for(args.tokenizer, args.kind, **given(args, "vocab_size", "min_freq", "max_bytes"))
    meta = prepare(args.inputs, tok, args.output, val_inputs=args.val, test_inputs=args.test, force=args.force,
                   filters=filters, **given(args, "val_fraction", "split", "dedupe", "field", "split_lines",
                                            "shard_tokens", "redact_pii", "workers"))
    sizes = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in meta["splits"].items())
    print(f"wrote {args.output}: {meta['documents']} documents, {sizes}, {meta['duplicates_removed']} duplicates removed")
    if "pii_redacted" in meta:
        print("PII redacted: " + ", ".join(f"{kind} {n:,}" for kind, n in meta["pii_redacted"].items()))
    if "filters" in meta:
        print(filter_table(meta["filters"]))
    if args.report is not None:
        print(f"wrote {write_filter_report(args.report, meta['filters'])}/report.md")


FILTER_FLAGS = ("min_words", "max_words", "min_chars", "max_chars", "lang", "lang_threshold", "near_dedupe", "jaccard",
                "num_perm", "shingle", "exclude", "exclude_ngram")


def filter_config(args: argparse.Namespace):
    """The FilterConfig of --filters, --filter and the filter flags (None when none is given); checks --report."""
    from lmlab.data.filters import load_filter_config
    from lmlab.runs import check_output

    flags = given(args, *FILTER_FLAGS)
    if args.filters is None and not flags and not args.filter:
        if args.report is not None:
            raise ConfigError("--report: no filter is on (give --filters, --filter or a filter flag)")
        return None
    cfg = load_filter_config(args.filters, flags, args.filter)
    for flag, owner, on in (("lang_threshold", "lang", bool(cfg.lang)), ("jaccard", "near_dedupe", cfg.near_dedupe),
                            ("num_perm", "near_dedupe", cfg.near_dedupe), ("shingle", "near_dedupe", cfg.near_dedupe),
                            ("exclude_ngram", "exclude", bool(cfg.exclude))):
        if flag in flags and not on:
            raise ConfigError(f"--{flag.replace('_', '-')} sets the --{owner.replace('_', '-')} filter, which is off; "
                              f"give --{owner.replace('_', '-')} too")
    if args.report is not None:
        report, output = Path(args.report).resolve(), Path(args.output).resolve()
        if report == output or output in report.parents or report in output.parents:
            raise ConfigError(f"--report {args.report}: the report needs a folder of its own, apart from the data "
                              f"folder -o {args.output}")
        check_output(args.report, "report", [*args.inputs, args.output], force=args.force)
    return cfg


PAIR_FLAGS = ("source_field", "target_field")
NOT_FOR_PAIRS = ("split", "dedupe", "split_lines", "shard_tokens", "field", "redact_pii", "workers", *FILTER_FLAGS)


def cmd_data_prepare_pairs(args: argparse.Namespace) -> None:
    from lmlab.data.pairs import pairs_tokenizer, prepare_pairs
    from lmlab.data.prepare import check_prepare_output

    if args.filters or args.filter or args.report:
        raise ConfigError("--filters, --filter, --report: not used with --pairs")
    if given(args, *NOT_FOR_PAIRS):
        raise ConfigError(f"--{', --'.join(given(args, *NOT_FOR_PAIRS)).replace('_', '-')}: not used with --pairs")
    check_prepare_output(args.output, args.inputs, args.val, args.test, args.tokenizer, force=args.force)
    tok = pairs_tokenizer(args.inputs, args.tokenizer, args.kind,
                          **given(args, *PAIR_FLAGS, "vocab_size", "min_freq", "max_bytes"))
    meta = prepare_pairs(args.inputs, tok, args.output, val_inputs=args.val, test_inputs=args.test, force=args.force,
                         **given(args, *PAIR_FLAGS, "val_fraction"))
    sizes = ", ".join(f"{name} {info['pairs']:,} pairs ({info['source']['tokens']:,} + {info['target']['tokens']:,} "
                      f"tokens)" for name, info in meta["splits"].items())
    print(f"wrote {args.output}: {sizes}, {sum(meta['skipped'].values())} pairs skipped (an empty side)")


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.config import SEQ2SEQ, load_config
    from lmlab.train.lm import pretrain

    cfg = load_config(args.config, args.overrides)
    scorer = init_model = None
    if cfg.model.family in SEQ2SEQ:  # greedy val BLEU: generation and metrics, which train/ sits below
        from lmlab.eval.seq2seq import greedy_scores as scorer
    if cfg.model.encoder_init:  # a pretrained encoder: Hugging Face folders are read by interop/, above train/
        from lmlab.interop.warmstart import encoder_warm_start

        cfg, init_model = encoder_warm_start(cfg, resume=args.resume)  # resumed: the checkpoint's encoder
    print_result(pretrain(cfg, resume=args.resume, stop_after=args.stop_after, force=args.force, scorer=scorer,
                          init_model=init_model))


def cmd_finetune_classify(args: argparse.Namespace) -> None:
    from lmlab.config import ClassifyConfig, load_config
    from lmlab.finetune.classify import finetune_classifier
    from lmlab.interop import load_model

    cfg = load_config(args.config, args.overrides, cls=ClassifyConfig)
    print_result(finetune_classifier(cfg, load_model, resume=args.resume, stop_after=args.stop_after,
                                     force=args.force))


def cmd_finetune_sft(args: argparse.Namespace) -> None:
    from lmlab.config import SftConfig, load_config
    from lmlab.finetune.sft import finetune_sft
    from lmlab.interop import load_model

    cfg = load_config(args.config, args.overrides, cls=SftConfig)
    print_result(finetune_sft(cfg, load_model, resume=args.resume, stop_after=args.stop_after, force=args.force))


def print_result(result) -> None:
    """One line about a finished (or stopped) training run: its step, last metrics, time, memory, checkpoint.
    A run stopped by Ctrl-C (after its checkpoint was saved) exits as interrupted."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    if not metrics and math.isnan(result.train_loss):  # no step ran: a finished run resumed
        metrics = "no step left to train"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every process
        print(f"step {result.step}: {metrics or f'train loss {result.train_loss:.4f}'}; {result.elapsed_s:.0f} s, "
              f"peak memory {result.peak_mem_mib:,.0f} MiB; checkpoint {result.checkpoint}")
    if result.interrupted:
        raise KeyboardInterrupt


def cmd_generate(args: argparse.Namespace) -> None:
    from lmlab.generate.text import check_input_flags, read_prompt, read_sources, write_generation, write_targets
    from lmlab.models.heads import is_encoder_decoder

    ckpt = load_for_decoding(args, encoder_decoder=True)
    seq2seq = is_encoder_decoder(ckpt.model)
    inputs = {"--prompt": args.prompt, "--prompt-file": args.prompt_file, "--truncate-prompt": args.truncate_prompt,
              "--source": args.source, "--source-file": args.source_file, "--truncate-source": args.truncate_source}
    check_input_flags(args.checkpoint, seq2seq, [flag for flag, value in inputs.items() if value])
    options = given(args, "num_beams", "length_penalty", "num_samples")
    if "length_penalty" in options and options.get("num_beams", 1) == 1:
        log.warning("--length-penalty ranks finished beams: without --num-beams 2 or more it is not used")
    if seq2seq:
        write_targets(ckpt.model, ckpt.tokenizer, read_sources(args.source, args.source_file), sampling_params(args),
                      stream=not args.no_stream, truncate=args.truncate_source, **options)
        return
    prompt = read_prompt(args.prompt, args.prompt_file)
    write_generation(ckpt.model, ckpt.tokenizer, prompt, sampling_params(args), stream=not args.no_stream,
                     truncate=args.truncate_prompt, **options)


def cmd_chat(args: argparse.Namespace) -> None:
    from lmlab.generate.chat import chat

    ckpt = load_for_decoding(args)
    chat(ckpt.model, ckpt.tokenizer, sampling_params(args), system=args.system, messages=args.message)


def cmd_serve(args: argparse.Namespace) -> None:
    from lmlab.config import ServeConfig
    from lmlab.serve.app import check_can_listen, run_server, serve_config

    cfg = serve_config(given(args, *(f.name for f in dataclasses.fields(ServeConfig))), args.checkpoint)
    check_can_listen(cfg.host, cfg.port)  # before the model loads: fail fast
    ckpt = load_for_decoding(args, encoder_decoder=True)
    run_server(ckpt.model, ckpt.tokenizer, cfg, args.log_level)


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.eval.report import check_report_output, write_metrics_report
    from lmlab.runs import atomic_dir

    out = args.out and check_report_output(args.out, args.checkpoint, args.data, force=args.force)
    ckpt = load(args, language_model=True, masked=True)
    report = evaluate_perplexity(ckpt.model, ckpt.tokenizer, args.data,
                                 **given(args, "stride", "split", "field", "batch_size", "precision"))
    report = {"checkpoint": str(ckpt.path), "data": args.data, **report}
    if out:
        with atomic_dir(out) as folder:
            write_metrics_report(report, folder, "Perplexity")
    print(json.dumps(report, indent=2))


def cmd_eval_seq2seq(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output
    from lmlab.eval.seq2seq import evaluate_seq2seq, read_eval_pairs, write_seq2seq_report
    from lmlab.models.heads import require_encoder_decoder
    from lmlab.runs import atomic_dir

    out = args.out and check_report_output(args.out, args.checkpoint, args.data, force=args.force)
    pairs = read_eval_pairs(args.data, **given(args, "split", "source_field", "target_field", "limit"))
    ckpt = require_encoder_decoder(load(args))
    report, hypotheses = evaluate_seq2seq(ckpt.model, ckpt.tokenizer, pairs, **given(
        args, "metrics", "num_beams", "length_penalty", "batch_size", "max_new_tokens"))
    report = {"checkpoint": str(ckpt.path), "data": args.data, **report}
    if out:
        with atomic_dir(out) as folder:
            write_seq2seq_report(report, hypotheses, folder)
    print(json.dumps(report, indent=2, ensure_ascii=False))


def cmd_eval_classify(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output, write_classification_report
    from lmlab.finetune.classify import evaluate_file, require_classifier
    from lmlab.runs import atomic_dir

    out = args.out and check_report_output(args.out, args.checkpoint, [args.data], force=args.force)
    ckpt = require_classifier(load(args))
    report = evaluate_file(ckpt, args.data, **given(args, "text_field", "label_field", "max_length", "batch_size"))
    if out:
        with atomic_dir(out) as folder:
            write_classification_report(report, folder, f"{args.data}")
    print(json.dumps({k: v for k, v in report.items() if k != "per_label"}, indent=2))


def cmd_eval_task(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output, write_task_report
    from lmlab.eval.tasks import evaluate_task, load_spec
    from lmlab.finetune.classify import evaluate_classification_task
    from lmlab.models.heads import SequenceClassifier, require_language_model
    from lmlab.runs import atomic_dir

    spec = load_spec(args.task, given(args, "data", "limit", "num_fewshot"))
    out = check_report_output(args.out, args.checkpoint, [spec.data] if spec.data else [], force=args.force)
    ckpt = load(args)
    if isinstance(ckpt.model, SequenceClassifier):
        result = evaluate_classification_task(ckpt, spec, **given(args, "batch_size"))
    else:
        ckpt = require_language_model(ckpt)
        result = evaluate_task(ckpt.model, ckpt.tokenizer, spec, **given(args, "batch_size", "precision"))
    result = {"checkpoint": str(ckpt.path), **result}
    with atomic_dir(out) as folder:
        write_task_report(result, folder)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from lmlab.eval.report import read_task_results, write_comparison
    from lmlab.runs import atomic_dir, check_output

    results = read_task_results(args.results)
    out = check_output(args.out, "report", args.results, force=args.force)
    with atomic_dir(out) as folder:
        print(write_comparison(results, folder), end="")


def cmd_eval_canaries(args: argparse.Namespace) -> None:
    from lmlab.eval.canaries import canaries_markdown, evaluate_canaries, read_canaries
    from lmlab.eval.report import check_report_output, write_results
    from lmlab.runs import atomic_dir

    out = args.out and check_report_output(args.out, args.checkpoint, [args.canaries], force=args.force)
    canaries = read_canaries(args.canaries)
    ckpt = load(args, language_model=True)
    report = evaluate_canaries(ckpt.model, ckpt.tokenizer, canaries,
                               **given(args, "enumerate_up_to", "samples", "batch_size"))
    report = {"checkpoint": str(ckpt.path), "canaries_file": args.canaries, **report}
    if out:
        with atomic_dir(out) as folder:
            write_results(folder, report, canaries_markdown(report))
    print(json.dumps(report, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from lmlab.finetune.classify import predict_texts, require_classifier

    ckpt = require_classifier(load(args))
    if args.explain or args.html or args.png:
        return explain_predictions(args, ckpt)
    for row in predict_texts(ckpt, args.texts, args.file, **given(args, "text_field", "max_length")):
        print(json.dumps(row, ensure_ascii=False))


def explain_predictions(args: argparse.Namespace, ckpt) -> None:
    """``lmlab predict --explain``: each row with its tokens' attributions, coloured on stderr (when it is a
    terminal and not --no-color), as JSON lines on stdout, and as an HTML page with --html."""
    from lmlab.inspect.attribution import ansi_line, checked_page_path, explain_texts, plot_attributions, write_html

    for path, suffix in ((args.html, ".html"), (args.png, ".png")):
        if path:
            checked_page_path(path, suffix)  # before the work
    rows = explain_texts(ckpt, args.texts, args.file, **given(args, "text_field", "max_length"))
    color = sys.stderr.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    for row in rows:
        print(ansi_line(row, ckpt.tokenizer, color), file=sys.stderr)
        print(json.dumps(row, ensure_ascii=False))
    if args.html:
        log.info("wrote %s", write_html(rows, ckpt.tokenizer, args.html))
    if args.png:
        log.info("wrote %s", plot_attributions(rows, ckpt.tokenizer, args.png))


def cmd_inspect_attention(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output
    from lmlab.inspect.attention import inspect_attention
    from lmlab.runs import atomic_dir

    out = check_report_output(args.out, args.checkpoint, [], force=args.force)
    ckpt = load(args)
    with atomic_dir(out) as folder:
        page = inspect_attention(ckpt.model, ckpt.tokenizer, args.prompt, folder, args.layers, args.heads, args.target)
    print(out / page.name)


def cmd_inspect_lens(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output
    from lmlab.inspect.lens import inspect_lens
    from lmlab.runs import atomic_dir

    out = check_report_output(args.out, args.checkpoint, [], force=args.force)
    ckpt = load(args, language_model=True)
    with atomic_dir(out) as folder:
        table = inspect_lens(ckpt.model, ckpt.tokenizer, args.prompt, folder, **given(args, "top_k"))
    print(table)


def cmd_eval_harness(args: argparse.Namespace) -> None:
    from lmlab.eval.harness import run_lm_eval

    run_lm_eval(args.args)


def cmd_convert(args: argparse.Namespace) -> None:
    from lmlab.interop import convert

    print(convert(args.source, args.output, to=args.to, merge=args.merge, force=args.force, dtype=args.dtype))


def cmd_inspect_embeddings(args: argparse.Namespace) -> None:
    from lmlab.eval.report import check_report_output, write_results
    from lmlab.inspect.embeddings import EmbeddingSpace, inspect_embeddings, report_markdown
    from lmlab.runs import atomic_dir

    files = [f for f in (args.eval_analogies, args.eval_similarity) if f]
    out = args.out and check_report_output(args.out, args.checkpoint, files, force=args.force)
    ckpt = load(args)
    space = EmbeddingSpace.from_model(ckpt.model, ckpt.tokenizer, getattr(ckpt, "manifest", None))
    report = inspect_embeddings(space, args.neighbors or [], args.analogy, args.similarity, args.plot or [],
                                args.plot_out, args.eval_analogies, args.eval_similarity,
                                **given(args, "top_k", "restrict"))
    report = {"checkpoint": str(getattr(ckpt, "path", args.checkpoint)), **report}
    if out:
        with atomic_dir(out) as folder:
            write_results(folder, report, report_markdown(report))
    print(json.dumps(report, indent=2, ensure_ascii=False))


def load(args: argparse.Namespace, language_model: bool = False, masked: bool = False):
    """The model of ``args.checkpoint`` (lmlab checkpoint or run, Hugging Face folder, pretrained name)
    on ``args.device``; with ``language_model``, one that predicts tokens (not a classifier), a masked
    language model too with ``masked``."""
    from lmlab.interop import load_model
    from lmlab.models.heads import require_language_model
    from lmlab.runtime import resolve_device

    ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
    return require_language_model(ckpt, masked) if language_model else ckpt


def load_for_decoding(args: argparse.Namespace, encoder_decoder: bool = False):
    """``load``'s language model (or, with ``encoder_decoder``, an encoder-decoder too: generate, serve),
    converted for decoding in ``args.dtype``; encoder-decoders decode in fp32 only."""
    from lmlab.generate.precision import for_decoding_as
    from lmlab.models.heads import is_encoder_decoder, require_generator

    ckpt = require_generator(load(args)) if encoder_decoder else load(args, language_model=True)
    if is_encoder_decoder(ckpt.model):
        if args.dtype not in ("auto", "fp32"):
            raise ConfigError(f"--dtype {args.dtype} is for decoder-only models; an encoder-decoder decodes in fp32")
        return ckpt
    ckpt.model, _ = for_decoding_as(ckpt.model, args.dtype)
    return ckpt


def sampling_params(args: argparse.Namespace):
    """The validated SamplingParams that the sampling flags (see add_sampling_flags) ask for."""
    from lmlab.generate.sampling import SamplingParams

    values = given(args, *SAMPLING_FLAGS)
    defaults = getattr(args, "command_sampling_defaults", {})
    asked = {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}  # on the command line
    if args.greedy and "temperature" in asked:
        log.warning(f"--greedy takes the most likely token: --temperature {values['temperature']} is not used")
    if args.greedy:
        values["temperature"] = 0.0
    params = SamplingParams(**values, stop=args.stop or [])
    params.validate()
    unused = [name for name in ("top_k", "top_p", "min_p", "seed") if name in asked]
    if params.temperature == 0 and unused:
        log.warning(f"greedy decoding (temperature 0) draws nothing at random: "
                    f"{', '.join('--' + n.replace('_', '-') for n in unused)} not used")
    return params


# ---------------------------------------------------------------------------------------------
# flags shared by several commands


SAMPLING = "lmlab.generate.sampling:SamplingParams"
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed")


def add_sampling_flags(p: argparse.ArgumentParser, **command_defaults) -> None:
    """The flags that choose how tokens are picked (one set for generate and chat). A command's own
    defaults (``temperature=0.8``) are declared in ``command_defaults``; the rest are SamplingParams'."""

    def default(name: str):
        return command_defaults.get(name, Default(SAMPLING, name))

    p.set_defaults(command_sampling_defaults=command_defaults)  # to tell them from values given on the command line

    p.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"),
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=default("temperature"),
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=default("top_k"),
                   help="sample among the k most likely tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=default("top_p"),
                   help="nucleus sampling: smallest set of tokens with probability >= p (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=default("min_p"),
                   help="drop tokens less likely than min-p times the most likely one (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=default("repetition_penalty"),
                   help="> 1 makes tokens already in the prompt or output less likely (default: %(default)s = off)")
    p.add_argument("--presence-penalty", type=float, default=default("presence_penalty"),
                   help="subtract this from the logit of every token already generated (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=default("frequency_penalty"),
                   help="subtract this times the count of each token already generated (default: %(default)s)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=default("seed"),
                   help="random seed for reproducible samples (default: %(default)s)")


def add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of config dataclass ``cls`` (``max_queue`` -> ``--max-queue``), with the
    field's type, its ``help`` metadata and its default (shown, not passed: the config applies it)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        text = f.metadata["help"]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_scalar_type(hints[f.name]),
                       default=_FieldDefault(f), help=text if "(default:" in text else text + " (default: %(default)s)")


class _FieldDefault(Default):
    """The default of a config dataclass field, as ``Default`` shows it."""

    def __init__(self, f: dataclasses.Field):
        self.value = f.default

    def __str__(self) -> str:
        return "none" if self.value is None else str(self.value)


def _scalar_type(ftype) -> type:
    """int, float or str: the type a flag's text is read as, from a field's (Annotated, optional) type."""
    while typing.get_args(ftype):
        ftype = next(a for a in typing.get_args(ftype) if a is not type(None))
    return ftype if ftype in (int, float) else str


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """--dtype, for the commands that decode (generate, chat, serve)."""
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "int8"], default="fp32",
                   help="weights to decode with: bf16, or int8 (weight-only, bf16 activations; CPU), or auto: "
                        "the fastest of the three measured on this machine's CPU (default: %(default)s)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """--device, for every command that runs a model."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s: "
                                                    "a GPU when there is one)")


def add_force_flag(p: argparse.ArgumentParser, output: str, kind: str, more: str = "") -> None:
    """--force, for every command that writes: it may replace a previous output of its own kind only."""
    p.add_argument("--force", action="store_true",
                   help=f"replace {output} if it holds a previous {kind} (never anything else){more}")


def add_report_flags(p: argparse.ArgumentParser, files: str, kind: str = "evaluation report",
                     required: bool = False, device: bool = True) -> None:
    """--out (a new or empty folder for ``files``), its --force, and --device: the flags of every command
    that writes a report."""
    p.add_argument("--out", required=required, help=f"folder for {files} (new or empty; see --force)")
    add_force_flag(p, "--out", kind)
    if device:
        add_device_flag(p)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """--resume, --force and --stop-after: the flags of every command that runs the training loop."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    add_force_flag(p, "train.out_dir", "run", "; the old run is deleted once the new one saves its first checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop this invocation after N steps (schedule unchanged; continue with --resume)")


def add_tokenizer_flags(p: argparse.ArgumentParser, target: str) -> None:
    """The flags of tokenizer training (``target`` is the function whose defaults they have)."""
    from lmlab.data.tokenizer import KINDS

    p.add_argument("--kind", choices=KINDS, default="bpe", help="tokenizer kind to train (default: %(default)s); "
                   "word: whitespace-split words, <eos> per line, <unk>")
    p.add_argument("--vocab-size", type=int, default=Default(target, "vocab_size"),
                   help="vocabulary size, special tokens included (default: %(default)s = bpe 8192; char, word: "
                        "every token seen, else the most frequent)")
    p.add_argument("--min-freq", type=int, default=Default(target, "min_freq"),
                   help="char, word: drop tokens seen fewer times; bpe: min pair count to merge (default: %(default)s)")
    p.add_argument("--field", default=Default(target, "field"), help="JSONL field holding the text (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=Default(target, "max_bytes"),
                   help="train the tokenizer on at most this many bytes of text (default: %(default)s = all)")


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    """The document filters of ``lmlab data prepare`` (data/filters.py's FilterConfig; all off unless given)."""
    cfg = "lmlab.data.filters:FilterConfig"
    f = p.add_argument_group("document filters (train inputs only; all off unless given)")
    f.add_argument("--filters", metavar="default|FILE.yaml",
                   help="a filters block: 'default' = Gopher's web-text rules, or a YAML file of data.filters fields")
    f.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                   help="set one data.filters field, e.g. max_symbol_ratio=0.1 or repetition=true (repeatable)")
    for name, kind, text in (("min_words", int, "fewer words"), ("max_words", int, "more words"),
                             ("min_chars", int, "fewer characters"), ("max_chars", int, "more characters")):
        f.add_argument(f"--{name.replace('_', '-')}", type=kind, default=Default(cfg, name), metavar="N",
                       help=f"drop documents with {text}")
    f.add_argument("--lang", nargs="+", default=Default(cfg, "lang"), metavar="CODE",
                   help="keep documents py3langid puts in these languages (en, de, ...)")
    f.add_argument("--lang-threshold", type=float, default=Default(cfg, "lang_threshold"), metavar="P",
                   help="... with at least this probability (default: %(default)s)")
    f.add_argument("--near-dedupe", action="store_true", default=Default(cfg, "near_dedupe"),
                   help="drop near-duplicates (MinHash LSH; the first of each cluster stays)")
    f.add_argument("--jaccard", type=float, default=Default(cfg, "jaccard"),
                   help="near-duplicate threshold (default: %(default)s)")
    f.add_argument("--num-perm", type=int, default=Default(cfg, "num_perm"),
                   help="MinHash permutations (default: %(default)s)")
    f.add_argument("--shingle", type=int, default=Default(cfg, "shingle"),
                   help="words per shingle (default: %(default)s)")
    f.add_argument("--exclude", nargs="+", default=Default(cfg, "exclude"), metavar="FILE",
                   help="evaluation files (text, JSONL, ARC JSONL, CSV/TSV): drop training documents sharing an n-gram")
    f.add_argument("--exclude-ngram", type=int, default=Default(cfg, "exclude_ngram"), metavar="N",
                   help="tokens (lowercased words) in a shared n-gram (default: %(default)s)")
    f.add_argument("--report", metavar="DIR", help="write the filters' report.md, report.json and lengths.png here")


def config_command(sub, name: str, cls: type, func, recipe: str, **parser_args) -> argparse.ArgumentParser:
    """A command that runs the training loop from a YAML config with KEY=VALUE overrides; its --help
    lists every config key with its default, type and choices."""
    from lmlab.config import describe_config

    p = sub.add_parser(name, epilog="config keys (default, type, choices or range; where they apply):\n"
                       + describe_config(cls), formatter_class=argparse.RawDescriptionHelpFormatter, **parser_args)
    p.add_argument("config", help=f"YAML config (e.g. {recipe})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
    add_run_flags(p)
    p.set_defaults(func=func)
    return p


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``lmlab <command> --help`` documents each flag)."""
    from lmlab import __version__
    from lmlab.config import ClassifyConfig, RunConfig, ServeConfig, SftConfig

    p = argparse.ArgumentParser(prog="lmlab", description="Language models from theory to practice.",
                                epilog="-q/-v may come before or after the command.")
    p.add_argument("--version", action="version", version=f"lmlab {__version__}", help="print the version and exit")
    add_verbosity_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)

    d = sub.add_parser("demo", help="train a small code model on Python's standard library, end to end")
    d.add_argument("--out", dest="out_dir", default=Default("lmlab.demo:run_demo", "out_dir"),
                   help="folder for the demo's data/ and run/, new or empty (default: %(default)s)")
    d.add_argument("--minutes", type=float, default=Default("lmlab.demo:run_demo", "minutes"),
                   help="training time budget in minutes (default: %(default)s)")
    d.add_argument("--seed", type=int, default=Default("lmlab.demo:run_demo", "seed"),
                   help="random seed (default: %(default)s)")
    add_force_flag(d, "--out", "demo")
    d.set_defaults(func=cmd_demo)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="action", required=True,
                                                                              metavar="ACTION")
    t = tok.add_parser("train", help="train a byte-level BPE, byte, char or word tokenizer and save tokenizer.json")
    t.add_argument("inputs", nargs="+", help="text files, directories or globs (.txt, .jsonl, .gz, ...)")
    t.add_argument("-o", "--output", required=True,
                   help="where to write tokenizer.json (a new file; in an existing folder: FOLDER/tokenizer.json)")
    add_tokenizer_flags(t, "lmlab.data.tokenizer:train_tokenizer_from_files")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN", help="extra special token (repeatable)")
    add_force_flag(t, "OUTPUT", "tokenizer file")
    t.set_defaults(func=cmd_tokenizer_train)

    prepare = "lmlab.data.prepare:prepare"
    data = sub.add_parser("data", help="prepare token shards").add_subparsers(dest="action", required=True,
                                                                              metavar="ACTION")
    dp = data.add_parser("prepare", help="tokenize text into train/val(/test) token shards + meta.json")
    dp.add_argument("inputs", nargs="+", help="text files, directories or globs (.txt, .jsonl, .gz, ...); with "
                    "--pairs: SOURCE TARGET aligned files, or one table")
    dp.add_argument("-o", "--output", required=True, help="output folder (new or empty; see --force)")
    dp.add_argument("--tokenizer", help="tokenizer.json to use, or a pretrained model's name (all-MiniLM-L6-v2: its "
                    "WordPiece, for model.encoder_init) (default: train one with --kind/--vocab-size)")
    dp.add_argument("--val", nargs="+", metavar="INPUT", help="validation inputs: all inputs go to train, these to val")
    dp.add_argument("--test", nargs="+", metavar="INPUT", help="test inputs: a test split of their own")
    add_tokenizer_flags(dp, "lmlab.data.tokenizer:train_tokenizer_from_files")
    dp.add_argument("--val-fraction", type=float, default=Default(prepare, "val_fraction"),
                    help="fraction held out for validation when no --val (default: %(default)s)")
    dp.add_argument("--split", choices=["hash", "tail"], default=Default(prepare, "split"),
                    help="hash: documents by content hash (deterministic); tail: the last tokens (default: %(default)s)")
    dp.add_argument("--dedupe", action="store_true", default=Default(prepare, "dedupe"),
                    help="drop exact duplicate documents")
    dp.add_argument("--split-lines", action="store_true", default=Default(prepare, "split_lines"),
                    help="treat every non-empty line as a document")
    dp.add_argument("--shard-tokens", type=int, default=Default(prepare, "shard_tokens"),
                    help="tokens per shard file (default: %(default)s)")
    dp.add_argument("--redact-pii", action="store_true", default=Default(prepare, "redact_pii"),
                    help="replace e-mails, phone numbers, IPs, card numbers, IBANs and secrets by <|email|>, ... in "
                         "every split (and in the text a new tokenizer learns from); counts in meta.json")
    dp.add_argument("--workers", type=int, default=Default(prepare, "workers"),
                    help="processes that redact, filter and tokenize (default: the cores available); the same "
                         "output for any number")
    pairs = "lmlab.data.pairs:prepare_pairs"
    dp.add_argument("--pairs", action="store_true",
                    help="parallel text (translation, summarization): the inputs, and likewise --val and --test, are "
                         "two aligned text files SOURCE TARGET (one example per line, .gz too; line counts must "
                         "agree) or one TSV/CSV (with a header) or JSONL table; one tokenizer is trained on both "
                         "sides; val is a hash split of the source texts when no --val (--field, --split, --dedupe, "
                         "--split-lines and --shard-tokens do not apply)")
    dp.add_argument("--source-field", default=Default(pairs, "source_field"),
                    help="--pairs: column/key of the source text in a table (default: %(default)s)")
    dp.add_argument("--target-field", default=Default(pairs, "target_field"),
                    help="--pairs: column/key of the target text in a table (default: %(default)s)")
    add_filter_flags(dp)
    add_force_flag(dp, "OUTPUT", "prepared data folder (and --report)")
    dp.set_defaults(func=cmd_data_prepare)

    config_command(sub, "train", RunConfig, cmd_train, "configs/shakespeare_char.yaml",
                   help="pretrain a model from a YAML config",
                   description="Train a language model. Any config field can be overridden as section.key=value, "
                               "e.g. model.n_layer=6 train.lr=3e-4; configs/ has recipes.")

    ft = sub.add_parser("finetune", help="adapt a pretrained model").add_subparsers(dest="action", required=True,
                                                                                  metavar="ACTION")
    config_command(ft, "classify", ClassifyConfig, cmd_finetune_classify, "configs/sst2_minilm.yaml",
                   help="fine-tune a sequence classifier (fully, or with LoRA: lora.r=8)",
                   description="Fine-tune a classifier on labelled text (TSV/CSV with a header, or JSONL). The base "
                               "(model.path) is an lmlab checkpoint, a Hugging Face folder, or a pretrained name "
                               "such as all-MiniLM-L6-v2.")
    config_command(ft, "sft", SftConfig, cmd_finetune_sft, "configs/alpaca_sft.yaml",
                   help="instruction-tune a decoder on conversations (chat template, loss on answers)",
                   description="Supervised fine-tuning on JSONL/JSON(.gz) conversations: Alpaca records "
                               "{instruction, input, output} or {messages: [{role, content}, ...]}. Adds the chat "
                               "tokens to the tokenizer, computes the loss on assistant tokens only, packs short "
                               "examples.")

    engine = "lmlab.generate.text:write_generation"
    g = sub.add_parser("generate", help="generate text from a checkpoint (streams to stdout)")
    g.add_argument("checkpoint", help="checkpoint or run folder (its newest checkpoint), HF folder or pretrained name")
    g.add_argument("--prompt", help="prompt text (decoder-only models)")
    g.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (decoder-only models)")
    g.add_argument("--source", help="encoder-decoders: the source text to write a target for (a translation, a summary)")
    g.add_argument("--source-file", help="encoder-decoders: one source per line (UTF-8, .gz too); writes one target "
                                         "line per source, in order")
    add_sampling_flags(g, max_new_tokens=200, temperature=0.8)
    g.add_argument("--truncate-prompt", action="store_true",
                   help="drop the oldest prompt tokens so that prompt + max new tokens fit the context "
                        "(default: refuse a prompt that does not fit)")
    g.add_argument("--truncate-source", action="store_true",
                   help="encoder-decoders: keep the first block_size tokens of a longer source, as training does "
                        "(default: refuse it)")
    g.add_argument("--num-beams", type=int, default=Default(engine, "num_beams"),
                   help="beam search with this many beams (default: %(default)s = off)")
    g.add_argument("--length-penalty", type=float, default=Default(engine, "length_penalty"),
                   help="beam search: score = log-prob / length ** this; > 0 favours longer output "
                        "(default: %(default)s)")
    g.add_argument("--num-samples", type=int, default=Default(engine, "num_samples"),
                   help="how many samples to draw, as one batch, sample i seeded with seed + i (default: %(default)s)")
    g.add_argument("--no-stream", action="store_true", help="print each sample when complete")
    add_dtype_flag(g)
    add_device_flag(g)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (streams answers)",
                        description="Chat with a model: one tuned with lmlab finetune sft answers in its chat "
                                    "template; any other checkpoint chats in a plain 'User: / Assistant:' transcript.")
    ch.add_argument("checkpoint", help="checkpoint or run folder (ideally one tuned with lmlab finetune sft)")
    ch.add_argument("--system", default=None, help="system prompt (kept across /reset)")
    ch.add_argument("--message", action="append", default=None, metavar="TEXT",
                    help="send this message and print the answer instead of starting the interactive chat (repeatable)")
    add_sampling_flags(ch, max_new_tokens=256, temperature=0.7, top_p=0.9)
    add_dtype_flag(ch)
    add_device_flag(ch)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible HTTP API and a web chat page")
    sv.add_argument("checkpoint", help="checkpoint or run folder, HF folder or pretrained name")
    add_config_flags(sv, ServeConfig)
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default: %(default)s)")
    add_dtype_flag(sv)
    add_device_flag(sv)
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="action", required=True,
                                                                           metavar="ACTION")
    ppl = "lmlab.eval.perplexity:evaluate_perplexity"
    pp = ev.add_parser("ppl", help="sliding-window perplexity and bits per byte")
    pp.add_argument("checkpoint", help="checkpoint or run folder, HF folder or pretrained name")
    pp.add_argument("--data", required=True, nargs="+", help="text files/dirs/globs, or a prepared data folder")
    pp.add_argument("--split", default=Default(ppl, "split"),
                    help="split of a prepared data folder (default: val); text is scored whole")
    pp.add_argument("--stride", type=int, default=Default(ppl, "stride"),
                    help="tokens between window starts (default: %(default)s = the context)")
    pp.add_argument("--field", default=Default(ppl, "field"), help="JSONL field holding the text (default: %(default)s)")
    pp.add_argument("--batch-size", type=int, default=Default(ppl, "batch_size"),
                    help="windows per forward pass (default: %(default)s)")
    pp.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=Default(ppl, "precision"),
                    help="autocast precision of the forward passes (default: %(default)s: as training chooses)")
    add_report_flags(pp, "results.json and results.md")
    pp.set_defaults(func=cmd_eval_ppl)

    seq = "lmlab.eval.seq2seq:evaluate_seq2seq"
    pairs_of = "lmlab.eval.seq2seq:read_eval_pairs"
    es = ev.add_parser("seq2seq", help="BLEU, chrF and ROUGE of an encoder-decoder's targets against references",
                       description="Decode every source of a test set (greedy, or beam search with --num-beams), "
                                   "detokenize, and score the targets against the reference texts: BLEU and chrF "
                                   "with sacrebleu (signature printed), ROUGE-1/2/L/Lsum with rouge-score (stemmed).")
    es.add_argument("checkpoint", help="encoder-decoder checkpoint or run folder (model.family seq2seq, rnn_seq2seq)")
    es.add_argument("--data", required=True, nargs="+",
                    help="a prepared pairs folder (lmlab data prepare --pairs), or SOURCE TARGET aligned files, "
                         "or one TSV/CSV/JSONL table")
    es.add_argument("--split", default=Default(pairs_of, "split"),
                    help="split of a pairs folder: val or test (default: %(default)s)")
    es.add_argument("--source-field", default=Default(pairs_of, "source_field"),
                    help="column/key of the source in a table (default: %(default)s)")
    es.add_argument("--target-field", default=Default(pairs_of, "target_field"),
                    help="column/key of the reference in a table (default: %(default)s)")
    es.add_argument("--limit", type=int, default=Default(pairs_of, "limit"),
                    help="score only the first K pairs (default: %(default)s = all)")
    es.add_argument("--metrics", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                    default=Default(seq, "metrics"), help="comma-separated, of bleu, chrf, rouge (default: all)")
    es.add_argument("--num-beams", type=int, default=Default(seq, "num_beams"),
                    help="beam search with this many beams (default: %(default)s = greedy)")
    es.add_argument("--length-penalty", type=float, default=Default(seq, "length_penalty"),
                    help="beam search: score = log-prob / length ** this (default: %(default)s)")
    es.add_argument("--batch-size", type=int, default=Default(seq, "batch_size"),
                    help="sources decoded at once (default: %(default)s)")
    es.add_argument("--max-new-tokens", type=int, default=Default(seq, "max_new_tokens"),
                    help="longest target in tokens (default: %(default)s = the model's block_size)")
    add_report_flags(es, "results.json, results.md and hypotheses.txt")
    es.set_defaults(func=cmd_eval_seq2seq)

    evaluate = "lmlab.finetune.classify:evaluate_file"
    ec = ev.add_parser("classify", help="accuracy, macro precision/recall/F1 and confusion matrix of a classifier")
    ec.add_argument("checkpoint", help="classifier checkpoint or run folder")
    ec.add_argument("--data", required=True, help="labelled TSV/CSV (with a header) or JSONL file")
    ec.add_argument("--text-field", default=Default(evaluate, "text_field"),
                    help="column/key of the text (default: %(default)s)")
    ec.add_argument("--label-field", default=Default(evaluate, "label_field"),
                    help="column/key of the label (default: %(default)s)")
    ec.add_argument("--max-length", type=int, default=Default(evaluate, "max_length"),
                    help="tokens per text (default: as trained)")
    ec.add_argument("--batch-size", type=int, default=Default(evaluate, "batch_size"),
                    help="texts per forward pass (default: %(default)s)")
    add_report_flags(ec, "results.json, results.md and confusion.png")
    ec.set_defaults(func=cmd_eval_classify)

    task = "lmlab.eval.tasks:evaluate_task"
    et = ev.add_parser("task", help="a task from a YAML spec: multiple choice, last word, generation, classification",
                       description="Score a decoder language model on a task described by a YAML spec (built-in: "
                                   "arc_easy, arc_challenge, hellaswag, lambada; or your own file, see "
                                   "docs/evaluation.md): log-likelihoods of choices as lm-evaluation-harness scores "
                                   "them, or greedy generations. Writes results.json, results.md, samples.jsonl and "
                                   "metrics.png to --out.")
    et.add_argument("checkpoint", help="checkpoint or run folder, HF folder or pretrained name: a decoder LM, or a "
                                       "classifier for a classification task")
    et.add_argument("--task", required=True, help="a built-in task name or a spec file (.yaml)")
    et.add_argument("--data", help="the task's data: a file, or a folder of split files (ARC-Easy-Test.jsonl...) "
                                   "(default: the spec's data)")
    et.add_argument("--limit", type=int, help="score only the first N examples (default: the spec's, else all)")
    et.add_argument("--num-fewshot", type=int,
                    help="solved examples put before each prompt, drawn with the spec's seed (default: the spec's)")
    et.add_argument("--batch-size", type=int, default=Default(task, "batch_size"),
                    help="sequences per forward pass, or prompts generated at once (default: %(default)s)")
    et.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=Default(task, "precision"),
                    help="autocast precision of the forward passes (default: %(default)s, comparable with other "
                         "tools; auto: as training chooses)")
    add_report_flags(et, "the report", required=True)
    et.set_defaults(func=cmd_eval_task)

    cp = ev.add_parser("compare", help="several lmlab eval task results side by side (Markdown table + plot)")
    cp.add_argument("results", nargs="+", metavar="RUN_OR_RESULTS_DIR",
                    help="a folder written by lmlab eval task, or a folder (a run) with such folders below it")
    add_report_flags(cp, "results.md, results.json and comparison.png", "comparison report", required=True,
                     device=False)
    cp.set_defaults(func=cmd_eval_compare)

    eh = ev.add_parser("harness", add_help=False, prefix_chars="+",  # every argument, -h too, is lm_eval's
                       help="run EleutherAI's lm-evaluation-harness (lm_eval's own arguments) with --model lmlab "
                            "and lmlab's local tasks (arc_easy_local) available")
    eh.add_argument("args", nargs=argparse.REMAINDER, help="lm_eval arguments, e.g. --model lmlab --model_args "
                    "path=CKPT --tasks arc_easy_local --metadata '{\"data_dir\": DIR}'")
    eh.set_defaults(func=cmd_eval_harness)

    canary = "lmlab.eval.canaries:exposure"
    ek = ev.add_parser("canaries", help="exposure of planted secrets: how much a language model memorised them",
                       description="For each canary (a prefix and a secret of random digits) the rank of the "
                                   "secret's log-perplexity among every secret of its format; exposure = "
                                   "log2(candidates) - log2(rank) (Carlini et al., 2019; docs/privacy.md).")
    ek.add_argument("checkpoint", help="language-model checkpoint or run folder")
    ek.add_argument("--canaries", required=True, help="JSONL of {prefix, secret, repeats} (benchmarks/canaries.py "
                                                      "writes one)")
    ek.add_argument("--enumerate-up-to", type=int, default=Default(canary, "enumerate_up_to"),
                    help="score every candidate secret when there are at most this many (default: %(default)s)")
    ek.add_argument("--samples", type=int, default=Default(canary, "samples"),
                    help="else estimate the rank from this many random candidates (default: %(default)s)")
    ek.add_argument("--batch-size", type=int, default=Default(canary, "batch_size"),
                    help="candidates per forward pass (default: %(default)s)")
    add_report_flags(ek, "results.json and results.md")
    ek.set_defaults(func=cmd_eval_canaries)

    predict = "lmlab.finetune.classify:predict_texts"
    pr = sub.add_parser("predict", help="classify texts with a trained classifier (one JSON line per text)")
    pr.add_argument("checkpoint", help="classifier checkpoint or run folder")
    pr.add_argument("texts", nargs="*", help="texts to classify")
    pr.add_argument("--file", help="also classify the texts of this TSV/CSV/JSONL file")
    pr.add_argument("--text-field", default=Default(predict, "text_field"),
                    help="column/key of the text in --file (default: %(default)s)")
    pr.add_argument("--max-length", type=int, default=Default(predict, "max_length"),
                    help="tokens per text (default: as trained)")
    pr.add_argument("--explain", action="store_true",
                    help="also say which tokens drove each decision (integrated gradients): coloured on stderr, "
                         "'attributions' [[token, score], ...] in the JSON lines")
    pr.add_argument("--html", default=None,
                    help="also write the explained texts as an HTML page here (implies --explain)")
    pr.add_argument("--png", default=None, help="also draw the explained texts as a PNG here (implies --explain)")
    pr.add_argument("--no-color", action="store_true", help="no ANSI colours in --explain's lines (off anyway when "
                                                            "stderr is not a terminal)")
    add_device_flag(pr)
    pr.set_defaults(func=cmd_predict)

    ins = sub.add_parser("inspect", help="look inside a model").add_subparsers(dest="action", required=True,
                                                                               metavar="ACTION")
    ia = ins.add_parser("attention", help="per-layer, per-head attention maps of a prompt (PNGs + index.html); "
                                          "hidden-state norms for a recurrent model")
    ia.add_argument("checkpoint", help="checkpoint or run folder (decoder, encoder, classifier or encoder-decoder)")
    ia.add_argument("--prompt", required=True, help="text to read (an encoder-decoder's source)")
    ia.add_argument("--target", default=None, help="an encoder-decoder's target text: also draws the decoder's "
                                                   "self- and cross-attention (default: the encoder's only)")
    ia.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices to draw (default: all)")
    ia.add_argument("--heads", type=int, nargs="+", default=None, help="head indices to draw (default: all)")
    add_report_flags(ia, "the maps", "report", required=True)
    ia.set_defaults(func=cmd_inspect_attention)

    lens = "lmlab.inspect.lens:inspect_lens"
    il = ins.add_parser("lens", help="logit lens: the top tokens each layer of a decoder would predict")
    il.add_argument("checkpoint", help="decoder (gpt2/llama preset) checkpoint or run folder")
    il.add_argument("--prompt", required=True, help="text to read")
    il.add_argument("--top-k", type=int, default=Default(lens, "top_k"),
                    help="tokens shown per layer and position (default: %(default)s)")
    add_report_flags(il, "lens.png and results.json/.md", "report", required=True)
    il.set_defaults(func=cmd_inspect_lens)

    inspect_of = "lmlab.inspect.embeddings:inspect_embeddings"
    ie = ins.add_parser("embeddings", help="word vectors: neighbours, analogies, similarity, a PCA plot, benchmarks",
                        description="The input vectors of a word2vec checkpoint, or the input (token) embedding of any "
                                    "model (for subword tokenizers the words are its tokens), by cosine similarity.")
    ie.add_argument("checkpoint", help="checkpoint or run folder, HF folder or pretrained name")
    ie.add_argument("--neighbors", nargs="+", metavar="WORD", help="the nearest words of each WORD")
    ie.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), help="A : B :: C : ?, answered by B - A + C")
    ie.add_argument("--similarity", nargs=2, metavar=("W1", "W2"), help="the cosine similarity of two words")
    ie.add_argument("--plot", nargs="+", metavar="WORD", help="a 2-D PCA picture of these words (with -o)")
    ie.add_argument("-o", "--plot-out", metavar="OUT.png", help="where --plot writes its PNG")
    ie.add_argument("--eval-analogies", metavar="FILE", help="accuracy on a Google analogy file (questions-words.txt)")
    ie.add_argument("--eval-similarity", metavar="FILE", help="Spearman on a word-pair TSV (WordSim-353)")
    ie.add_argument("--top-k", type=int, default=Default(inspect_of, "top_k"),
                    help="neighbours and answers shown (default: %(default)s)")
    ie.add_argument("--restrict-vocab", dest="restrict", type=int, default=Default(inspect_of, "restrict"),
                    help="--eval-analogies counts only the N most frequent words (default: %(default)s, as gensim)")
    add_report_flags(ie, "results.json and results.md", "report")
    ie.set_defaults(func=cmd_inspect_embeddings)

    cv = sub.add_parser("convert", help="convert between lmlab checkpoints and Hugging Face folders, or to GGUF",
                        description="An lmlab checkpoint (or run folder) becomes a Hugging Face folder (config.json, "
                                    "model.safetensors, tokenizer.json) that transformers loads; a Hugging Face folder "
                                    "(GPT-2, Llama, BERT) or a pretrained name (all-MiniLM-L6-v2) becomes an lmlab "
                                    "checkpoint; an OUTPUT ending in .gguf is one file that llama.cpp runs (GPT-2 and "
                                    "Llama presets, tokenizer included). The direction follows from OUTPUT and SOURCE "
                                    "unless --to says.")
    cv.add_argument("source", help="lmlab checkpoint/run folder, Hugging Face folder, or pretrained name")
    cv.add_argument("output", help="folder (or .gguf file) to write: new or empty (see --force); never SOURCE, nor "
                                   "inside it")
    cv.add_argument("--to", choices=["hf", "lmlab", "gguf"], default=None,
                    help="output format (default: gguf for a .gguf OUTPUT, else the other one)")
    cv.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default=None,
                    help="GGUF weights: f32, f16, or q8_0 (8-bit blocks) (default: f32)")
    cv.add_argument("--merge", action="store_true",
                    help="fold LoRA adapters into the weights (default: write them as a PEFT adapter beside the base)")
    add_force_flag(cv, "OUTPUT", "Hugging Face folder, lmlab checkpoint or GGUF file, whichever it writes")
    cv.set_defaults(func=cmd_convert)
    return p


# ---------------------------------------------------------------------------------------------
# logging and the entry point


def add_verbosity_flags(p: argparse.ArgumentParser, default=False) -> None:
    """-q and -v, which say how much is logged to stderr (see ``log_level``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="log only warnings and errors (no notes, status or progress lines)")
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="also log debug messages")


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it takes -q/-v too (``lmlab train -q ...``), and leaves them unset when
    not given so that flags given before the subcommand hold. A command's positionals may come before,
    between or after its flags (``lmlab predict CKPT --max-length 8 'some text'``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "-" in self.prefix_chars:  # not `eval harness`, which passes every argument on to lm_eval
            add_verbosity_flags(self, default=argparse.SUPPRESS)
        self._intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        """Parse flags and positionals intermixed, unless this parser only picks the next subcommand or passes
        the rest on (argparse.REMAINDER)."""
        if self._intermixing or any(a.nargs in (argparse.PARSER, argparse.REMAINDER)
                                    for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def log_level(args: argparse.Namespace) -> int:
    """INFO by default (notes and status lines show), WARNING with -q, DEBUG with -v (-v wins)."""
    if args.verbose:
        return logging.DEBUG
    return logging.WARNING if args.quiet else logging.INFO


class PlainFormatter(logging.Formatter):
    """An INFO record as its bare message; any other as ``warning: message``, ``debug: message``..."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's line (with its traceback, if it carries one)."""
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def configure_logging(level: int) -> None:
    """Send the records of lmlab's loggers at ``level`` and above to stderr, formatted plainly.

    Only the ``lmlab`` logger is set up, so other libraries' INFO chatter stays off. Calling it again
    (``main`` in tests) replaces the handler rather than adding a second.
    """
    root = logging.getLogger("lmlab")
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(PlainFormatter())
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmlab`` command."""
    args = build_parser().parse_args(argv)
    try:  # from here on: Ctrl-C while the first log line is written is as much an interrupt as one mid-work
        configure_logging(log_level(args))
        log.debug("arguments: %s", {k: v for k, v in vars(args).items() if k != "func"})
        args.func(args)
    except LmlabError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)  # one line, whatever a library put in the message
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (MemoryError, RuntimeError) as e:
        return report_out_of_memory(e)
    except OSError as e:
        return report_storage_error(e)
    return 0


STORAGE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def report_storage_error(error: OSError) -> int:
    """Exit status 1 after one ``error:`` line for a file system that refuses a write (full, read-only, no
    permission: the machine's state, not a bug); any other OSError is raised again, with its traceback."""
    if error.errno not in STORAGE_ERRORS:
        raise error
    where = f": {error.filename}" if error.filename else ""
    print(f"error: {STORAGE_ERRORS[error.errno]}{where} (free space or choose another output, then run again; "
          f"training continues with --resume)", file=sys.stderr)
    return 1


def report_out_of_memory(error: BaseException) -> int:
    """Exit status 1 after one ``error:`` line for a failed allocation (a model or batch too large for the
    machine); any other error is raised again, with its traceback (a bug)."""
    from lmlab.runtime import out_of_memory_message

    message = out_of_memory_message(error)
    if message is None:
        raise error
    print(f"error: {message}", file=sys.stderr)
    return 1


def run() -> None:
    """The ``lmlab`` command: ``main`` with the process's exit status. After Ctrl-C (status 130, every
    ``finally`` already run) the process ends at once: an interrupt that lands while a library is being
    imported (torch takes seconds) leaves the interpreter to die by SIGINT on its way out otherwise,
    with no exit status of 130."""
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(status)


if __name__ == "__main__":
    run()
