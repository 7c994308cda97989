"""The ``lmlab`` command line: parses arguments and calls one function per subcommand.

It holds no logic of its own. Errors of the user's input (``LmlabError``) are printed as one line
``error: ...`` with exit status 1; Ctrl-C exits with 130. Results go to stdout; notes, status and
progress lines are logged to stderr (``-q``: warnings and errors only; ``-v``: also debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.progress import ConsoleHandler

KINDS = ("bpe", "byte", "char", "word")  # tokenizer kinds (lmlab.data.tokenizer.KINDS; not imported, to start fast)
log = logging.getLogger("lmlab.cli")  # named, not __name__: also right under `python -m lmlab.cli`


def cmd_demo(args: argparse.Namespace) -> None:
    from lmlab.demo import run_demo

    run_demo(out_dir=args.out, minutes=args.minutes, seed=args.seed)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmlab.data.tokenizer import train_tokenizer_from_files

    tok = train_tokenizer_from_files(args.kind, args.inputs, vocab_size=args.vocab_size,
                                     special_tokens=args.special, field=args.field, max_bytes=args.max_bytes,
                                     min_freq=args.min_freq)
    tok.save(args.output)
    print(f"wrote {args.output}: {args.kind} tokenizer, {tok.vocab_size} tokens, sha256 {tok.sha256()[:12]}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmlab.data.prepare import prepare
    from lmlab.data.tokenizer import Tokenizer, train_tokenizer_from_files

    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        log.info(f"training a {args.kind} tokenizer on the (train) inputs (pass --tokenizer to reuse one)")
        tok = train_tokenizer_from_files(args.kind, args.inputs, vocab_size=args.vocab_size, field=args.field,
                                         max_bytes=args.max_bytes, min_freq=args.min_freq)
    meta = prepare(args.inputs, tok, args.output, val_fraction=args.val_fraction, split=args.split,
                   dedupe=args.dedupe, field=args.field, split_lines=args.split_lines, shard_tokens=args.shard_tokens,
                   val_inputs=args.val, test_inputs=args.test)
    sizes = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in meta["splits"].items())
    print(f"wrote {args.output}: {meta['documents']} documents, {sizes}, {meta['duplicates_removed']} duplicates removed")


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.config import load_config
    from lmlab.train.lm import pretrain

    result = pretrain(load_config(args.config, args.overrides), resume=args.resume, stop_after=args.stop_after)
    print_result(result)


def print_result(result) -> None:
    """One line about a finished (or stopped) training run: its step, last metrics, time, memory, checkpoint."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"step {result.step}: {metrics or f'train loss {result.train_loss:.4f}'}; {result.elapsed_s:.0f} s, "
          f"peak memory {result.peak_mem_mib:,.0f} MiB; checkpoint {result.checkpoint}")
    if result.interrupted:
        raise KeyboardInterrupt


def sampling_params(args: argparse.Namespace):
    """The SamplingParams that the sampling flags (see add_sampling_flags) ask for."""
    from lmlab.generate.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop or [])
    params.validate()
    return params


def cmd_generate(args: argparse.Namespace) -> None:
    import dataclasses

    from lmlab.generate.engine import beam_search, fit_prompt, generate_text, generate_texts, print_stream
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    if prompt is None:
        raise LmlabError("give a prompt with --prompt TEXT or --prompt-file FILE")
    ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
    model, tok = ckpt.model, ckpt.tokenizer
    params = sampling_params(args)
    ids = tok.encode(prompt)
    fitted = fit_prompt(ids, model.context_length, params.max_new_tokens, args.truncate_prompt)
    if len(fitted) < len(ids):
        log.info(f"note: prompt truncated from the left to its last {len(fitted)} of {len(ids)} tokens")
        prompt = tok.decode(fitted)
    if args.num_beams > 1:
        new = beam_search(model, fitted, args.num_beams, params.max_new_tokens, [tok.eot_id], args.length_penalty)
        print(prompt + tok.decode([t for t in new if t != tok.eot_id]))
        return
    if args.num_samples > 1:  # one batch, each sample with its own seed; printed when all are done
        samples = [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
                   for i in range(args.num_samples)]
        for i, done in enumerate(generate_texts(model, tok, [fitted] * args.num_samples, samples)):
            print(f"--- sample {i + 1} ---")
            print(prompt + done.text)
        return
    if args.no_stream:
        print(prompt + generate_text(model, tok, fitted, params))
    else:
        print_stream(prompt)
        generate_text(model, tok, fitted, params, on_text=print_stream)
        print()


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.eval.report import write_metrics_report
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
    report = evaluate_perplexity(ckpt.model, ckpt.tokenizer, args.data, stride=args.stride, split=args.split,
                                 field=args.field, batch_size=args.batch_size)
    report = {"checkpoint": str(ckpt.path), "data": args.data, **report}
    if args.out:
        write_metrics_report(report, args.out, "Perplexity")
    print(json.dumps(report, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    from lmlab.interop.hf import describe, export_hf, import_hf
    from lmlab.interop import load_model
    from lmlab.train.checkpoint import is_lmlab_checkpoint, save_checkpoint

    to = args.to or ("hf" if is_lmlab_checkpoint(args.source) else "lmlab")
    if to == "hf":
        ckpt = load_model(args.source)
        out = export_hf(ckpt.model, ckpt.tokenizer, args.output, merge=args.merge)
        adapter = " + PEFT adapter in adapter/" if (out / "adapter").is_dir() else ""
        print(f"wrote {out}: Hugging Face folder{adapter} ({describe(ckpt.model)})")
    else:
        model, tokenizer = import_hf(args.source)
        out = save_checkpoint(args.output, model, tokenizer, info={"kind": "import", "source": str(args.source)})
        print(f"wrote {out}: lmlab checkpoint ({describe(model)})")


def cmd_finetune_classify(args: argparse.Namespace) -> None:
    from lmlab.config import ClassifyConfig, load_config
    from lmlab.finetune.classify import finetune_classifier

    from lmlab.interop import load_model

    cfg = load_config(args.config, args.overrides, cls=ClassifyConfig)
    print_result(finetune_classifier(cfg, load_model, resume=args.resume, stop_after=args.stop_after))


def cmd_eval_classify(args: argparse.Namespace) -> None:
    from lmlab.data.labeled import read_examples
    from lmlab.eval.report import write_classification_report
    from lmlab.finetune.classify import evaluate_classifier, max_length_of, require_classifier
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    ckpt = require_classifier(load_model(args.checkpoint, resolve_device(args.device)))
    examples = read_examples(args.data, args.text_field, args.label_field)
    report = evaluate_classifier(ckpt.model, ckpt.tokenizer, examples, args.max_length or max_length_of(ckpt),
                                 args.batch_size)
    report = {"checkpoint": str(ckpt.path), "data": args.data, **report}
    if args.out:
        write_classification_report(report, args.out, f"{args.data}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("per_label",)}, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from lmlab.data.labeled import read_examples
    from lmlab.finetune.classify import max_length_of, predict_proba, require_classifier
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    texts = list(args.texts)
    if args.file:
        texts += [ex.text for ex in read_examples(args.file, args.text_field, None)]
    if not texts:
        raise LmlabError("give texts to classify as arguments or with --file")
    if any(not t.strip() for t in texts):
        raise LmlabError("cannot classify an empty text")
    ckpt = require_classifier(load_model(args.checkpoint, resolve_device(args.device)))
    probs = predict_proba(ckpt.model, ckpt.tokenizer, texts, args.max_length or max_length_of(ckpt))
    labels = ckpt.model.head_config.labels
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        print(json.dumps({"label": labels[best], "probability": round(float(p[best]), 4), "text": text},
                         ensure_ascii=False))


def cmd_finetune_sft(args: argparse.Namespace) -> None:
    from lmlab.config import SftConfig, load_config
    from lmlab.finetune.sft import finetune_sft

    from lmlab.interop import load_model

    cfg = load_config(args.config, args.overrides, cls=SftConfig)
    print_result(finetune_sft(cfg, load_model, resume=args.resume, stop_after=args.stop_after))


def cmd_chat(args: argparse.Namespace) -> None:
    from lmlab.data.chat import has_chat_tokens
    from lmlab.generate.chat import ChatSession, run_repl
    from lmlab.generate.engine import print_stream
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
    params = sampling_params(args)
    if not has_chat_tokens(ckpt.tokenizer):
        log.info("note: this model has no chat tokens (it was not tuned with lmlab finetune sft); chatting in a plain "
                 "'User: / Assistant:' transcript")
    session = ChatSession(ckpt.model, ckpt.tokenizer, params, system=args.system)
    if args.message:
        for message in args.message:
            session.reply(message, on_text=print_stream)
            print()
        return
    run_repl(session)


def cmd_serve(args: argparse.Namespace) -> None:
    import dataclasses
    import os

    import uvicorn

    from lmlab.config import ServeConfig
    from lmlab.serve.app import check_can_listen, create_app
    from lmlab.interop import load_model
    from lmlab.runtime import resolve_device

    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    cfg.api_key = args.api_key or os.environ.get("LMLAB_API_KEY") or None
    for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_new_tokens", "default_max_tokens",
                 "request_timeout"):
        if getattr(cfg, name) <= 0:
            raise LmlabError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    check_can_listen(cfg.host, cfg.port)  # before the model loads: fail fast
    ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
    cfg.model_name = cfg.model_name or Path(args.checkpoint).resolve().name
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning(f"serving on {cfg.host} without an API key: anyone who can reach it can use it "
                    f"(set --api-key or LMLAB_API_KEY)")
    app = create_app(ckpt.model, ckpt.tokenizer, cfg)
    log.info(f"serving '{cfg.model_name}' on http://{cfg.host}:{cfg.port}  (chat page: /, API: /v1, docs: /docs)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """--resume and --stop-after: the flags of every command that runs the training loop."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop this invocation after N steps (schedule unchanged; continue with --resume)")


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float,
                       top_p: float | None) -> None:
    """The flags that choose how tokens are picked (one set for generate and chat)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate at most (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 = greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling: smallest set of tokens with probability >= p (default: {top_p})")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min-p times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the prompt or output less likely (default: 1.0, off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token already generated (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times the count of each token already generated (default: 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")


def add_verbosity_flags(p: argparse.ArgumentParser, default=False) -> None:
    """-q and -v, which say how much is logged to stderr (see ``log_level``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="log only warnings and errors (no notes, status or progress lines)")
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="also log debug messages")


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it takes -q/-v too (``lmlab train -q ...``), and leaves them unset when
    not given so that flags given before the subcommand hold."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_verbosity_flags(self, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``lmlab <command> --help`` documents each flag)."""
    p = argparse.ArgumentParser(prog="lmlab", description="Language models from theory to practice.",
                                epilog="-q/-v may come before or after the command.")
    add_verbosity_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)

    d = sub.add_parser("demo", help="train a small code model on Python's standard library, end to end")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--minutes", type=float, default=4.0, help="training time budget in minutes (default: 4)")
    d.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    d.set_defaults(func=cmd_demo)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tok.add_parser("train", help="train a byte-level BPE, byte, char or word tokenizer and save tokenizer.json")
    t.add_argument("inputs", nargs="+", help="text files, directories or globs (.txt, .jsonl, .gz, ...)")
    t.add_argument("-o", "--output", required=True, help="where to write tokenizer.json")
    t.add_argument("--kind", choices=KINDS, default="bpe",
                   help="tokenizer kind (default: bpe); word: whitespace-split words, <eos> per line, <unk>")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size, special tokens included (bpe default 8192; char, word: keep the most frequent)")
    t.add_argument("--min-freq", type=int, default=1, help="char, word: drop tokens seen fewer times; bpe: min pair count to merge (default: 1)")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN", help="extra special token (repeatable)")
    t.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    t.add_argument("--max-bytes", type=int, default=None, help="train on at most this many bytes of text")
    t.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare token shards").add_subparsers(dest="action", required=True, metavar="ACTION")
    dp = data.add_parser("prepare", help="tokenize text into train/val(/test) token shards + meta.json")
    dp.add_argument("inputs", nargs="+", help="text files, directories or globs (.txt, .jsonl, .gz, ...)")
    dp.add_argument("-o", "--output", required=True, help="output folder")
    dp.add_argument("--tokenizer", help="tokenizer.json to use (default: train one with --kind/--vocab-size)")
    dp.add_argument("--val", nargs="+", metavar="INPUT", help="validation inputs: all inputs go to train, these to val")
    dp.add_argument("--test", nargs="+", metavar="INPUT", help="test inputs: a test split of their own")
    dp.add_argument("--kind", choices=KINDS, default="bpe", help="tokenizer kind to train when no --tokenizer")
    dp.add_argument("--vocab-size", type=int, default=None, help="vocabulary size of the trained tokenizer")
    dp.add_argument("--min-freq", type=int, default=1, help="char, word: drop tokens seen fewer times; bpe: min pair count to merge (default: 1)")
    dp.add_argument("--max-bytes", type=int, default=None, help="train the tokenizer on at most this many bytes")
    dp.add_argument("--val-fraction", type=float, default=0.1,
                    help="fraction held out for validation when no --val (default: 0.1)")
    dp.add_argument("--split", choices=["hash", "tail"], default="hash",
                    help="hash: documents by content hash (deterministic); tail: the last tokens (default: hash)")
    dp.add_argument("--dedupe", action="store_true", help="drop exact duplicate documents")
    dp.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    dp.add_argument("--split-lines", action="store_true", help="treat every non-empty line as a document")
    dp.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: 1e8)")
    dp.set_defaults(func=cmd_data_prepare)

    from lmlab.config import describe_config

    tr = sub.add_parser("train", help="pretrain a model from a YAML config",
                        description="Train a model. Any config field can be overridden as section.key=value, "
                                    "e.g. model.n_layer=6 train.lr=3e-4. Comments in src/lmlab/config.py "
                                    "explain each field; configs/ has recipes.",
                        epilog="config keys (default, type):\n" + describe_config(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("config", help="YAML config (see configs/)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=500")
    add_run_flags(tr)
    tr.set_defaults(func=cmd_train)

    cv = sub.add_parser("convert", help="convert between lmlab checkpoints and Hugging Face folders",
                        description="An lmlab checkpoint (or run folder) becomes a Hugging Face folder (config.json, "
                                    "model.safetensors, tokenizer.json) that transformers loads; a Hugging Face folder "
                                    "(GPT-2, Llama, BERT) or a pretrained name (all-MiniLM-L6-v2) becomes an lmlab "
                                    "checkpoint. The direction follows from SOURCE unless --to says.")
    cv.add_argument("source", help="lmlab checkpoint/run folder, Hugging Face folder, or pretrained name")
    cv.add_argument("output", help="folder to write (replaced if it exists)")
    cv.add_argument("--to", choices=["hf", "lmlab"], default=None, help="output format (default: the other one)")
    cv.add_argument("--merge", action="store_true",
                    help="fold LoRA adapters into the weights (default: write them as a PEFT adapter beside the base)")
    cv.set_defaults(func=cmd_convert)

    from lmlab.config import ClassifyConfig

    ft = sub.add_parser("finetune", help="adapt a pretrained model").add_subparsers(dest="action", required=True,
                                                                                  metavar="ACTION")
    fc = ft.add_parser("classify", help="fine-tune a sequence classifier (fully, or with LoRA: lora.r=8)",
                       description="Fine-tune a classifier on labelled text (TSV/CSV with a header, or JSONL). "
                                   "The base (model.path) is an lmlab checkpoint, a Hugging Face folder, or a "
                                   "pretrained name such as all-MiniLM-L6-v2. Any config field can be overridden "
                                   "as section.key=value; configs/sst2_minilm.yaml is a recipe.",
                       epilog="config keys (default, type):\n" + describe_config(ClassifyConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fc.add_argument("config", help="YAML config (see configs/sst2_minilm.yaml)")
    fc.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lora.r=8 train.lr=5e-4")
    add_run_flags(fc)
    fc.set_defaults(func=cmd_finetune_classify)

    from lmlab.config import SftConfig

    fs = ft.add_parser("sft", help="instruction-tune a decoder on conversations (chat template, loss on answers)",
                       description="Supervised fine-tuning on JSONL/JSON(.gz) conversations: Alpaca records "
                                   "{instruction, input, output} or {messages: [{role, content}, ...]}. Adds the "
                                   "chat tokens to the tokenizer, computes the loss on assistant tokens only, packs "
                                   "short examples. configs/alpaca_sft.yaml is a recipe.",
                       epilog="config keys (default, type):\n" + describe_config(SftConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fs.add_argument("config", help="YAML config (see configs/alpaca_sft.yaml)")
    fs.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.max_examples=2000")
    add_run_flags(fs)
    fs.set_defaults(func=cmd_finetune_sft)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (streams answers)",
                        description="Chat with a model: one tuned with lmlab finetune sft answers in its chat "
                                    "template; any other checkpoint chats in a plain 'User: / Assistant:' transcript.")
    ch.add_argument("checkpoint", help="checkpoint or run folder (ideally one tuned with lmlab finetune sft)")
    ch.add_argument("--system", default=None, help="system prompt (kept across /reset)")
    ch.add_argument("--message", action="append", default=None, metavar="TEXT",
                    help="send this message and print the answer instead of starting the interactive chat (repeatable)")
    add_sampling_flags(ch, max_new_tokens=256, temperature=0.7, top_p=0.9)
    ch.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible HTTP API and a web chat page")
    sv.add_argument("checkpoint", help="checkpoint folder or run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--model-name", default=None, help="model id clients use (default: the checkpoint folder's name)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMLAB_API_KEY, else none)")
    sv.add_argument("--max-batch-size", type=int, default=8, help="sequences generated together (default: 8)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="sequences allowed to wait; more are refused with 429 (default: 64)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default: 1000000)")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the model's context)")
    sv.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default: 1024)")
    sv.add_argument("--default-max-tokens", type=int, default=256,
                    help="max_tokens of chat requests that do not say (default: 256)")
    sv.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request fails with 504 (default: 300)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default: info)")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    sv.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text from a checkpoint (streams to stdout)")
    g.add_argument("checkpoint", help="checkpoint folder or run folder (uses its newest checkpoint)")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    add_sampling_flags(g, max_new_tokens=200, temperature=0.8, top_p=None)
    g.add_argument("--truncate-prompt", action="store_true",
                   help="drop the oldest prompt tokens so that prompt + max new tokens fit the context "
                        "(default: refuse a prompt that does not fit)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: 1, off)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score = log-prob / length ** this; > 0 favours longer output (default: 1.0)")
    g.add_argument("--num-samples", type=int, default=1, help="how many samples to draw (default: 1)")
    g.add_argument("--no-stream", action="store_true", help="print each sample when complete")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    g.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="action", required=True, metavar="ACTION")
    pp = ev.add_parser("ppl", help="sliding-window perplexity and bits per byte")
    pp.add_argument("checkpoint", help="checkpoint folder or run folder")
    pp.add_argument("--data", required=True, nargs="+", help="text files/dirs/globs, or a prepared data folder")
    pp.add_argument("--split", default="val", help="split of a prepared data folder (default: val)")
    pp.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the context)")
    pp.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    pp.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    pp.add_argument("--out", help="folder for results.json and results.md")
    pp.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    pp.set_defaults(func=cmd_eval_ppl)
    ec = ev.add_parser("classify", help="accuracy, macro precision/recall/F1 and confusion matrix of a classifier")
    ec.add_argument("checkpoint", help="classifier checkpoint or run folder")
    ec.add_argument("--data", required=True, help="labelled TSV/CSV (with a header) or JSONL file")
    ec.add_argument("--text-field", default="sentence", help="column/key of the text (default: sentence)")
    ec.add_argument("--label-field", default="label", help="column/key of the label (default: label)")
    ec.add_argument("--max-length", type=int, default=None, help="tokens per text (default: as trained)")
    ec.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    ec.add_argument("--out", help="folder for results.json, results.md and confusion.png")
    ec.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    ec.set_defaults(func=cmd_eval_classify)

    pr = sub.add_parser("predict", help="classify texts with a trained classifier (one JSON line per text)")
    pr.add_argument("checkpoint", help="classifier checkpoint or run folder")
    pr.add_argument("texts", nargs="*", help="texts to classify")
    pr.add_argument("--file", help="also classify the texts of this TSV/CSV/JSONL file")
    pr.add_argument("--text-field", default="sentence", help="column/key of the text in --file (default: sentence)")
    pr.add_argument("--max-length", type=int, default=None, help="tokens per text (default: as trained)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    pr.set_defaults(func=cmd_predict)
    return p


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
    configure_logging(log_level(args))
    log.debug("arguments: %s", {k: v for k, v in vars(args).items() if k != "func"})
    try:
        args.func(args)
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
