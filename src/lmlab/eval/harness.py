"""lmlab checkpoints in EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``, the ``lm-eval`` extra).

``LmlabLM`` is the harness's model interface (``lm_eval.api.model.LM``) for an lmlab checkpoint: it scores
log-likelihoods with lmlab's own scorer (eval/loglik.py) and generates with lmlab's generation engine, so
the harness's numbers for a checkpoint are lmlab's. It is registered under the name ``lmlab``.

The ``lm_eval`` command (0.4.13) finds models only in its own table and in classes registered in the same
process; it reads no entry points. So ``run_lm_eval`` (``lmlab eval harness ...``, ``python -m
lmlab.eval.harness ...``) registers ``lmlab`` and then runs lm-eval's own command line with the same
arguments, adding this package's local task folder (``harness_tasks/``: ``arc_easy_local``) as
``--include_path`` unless one is given.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch

from lmlab.errors import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # the optional extra is missing
    raise ConfigError(f"lm-evaluation-harness is not installed ({e.name}); pip install 'lmlab[lm-eval]'") from None

from lmlab.config import Count, Precision, check_argument
from lmlab.eval.loglik import score_continuations, score_rolling
from lmlab.generate.engine import generate_texts
from lmlab.generate.sampling import SamplingParams
from lmlab.models.heads import require_language_model
from lmlab.models.interface import width_of
from lmlab.runtime import autocast_context, resolve_device, resolve_precision
from lmlab.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

MODEL_NAME = "lmlab"
HARNESS_TASKS = Path(__file__).parent / "harness_tasks"  # lm-eval task YAMLs that read local files
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default when a task sets no max_gen_toks


class LmlabLM(LM):
    """An lmlab checkpoint as an lm-eval model: ``--model lmlab --model_args path=CKPT[,batch_size=N]
    [,device=cpu][,precision=fp32]``.

    ``path``: an lmlab checkpoint or run folder (a language model). ``batch_size``: sequences per forward pass
    ("auto" means 32). ``max_length``: the longest input (default: the model's context). ``precision``: autocast of the forward passes (fp32 by default, so that scores match
    the ``hf`` backend's fp32 ones). ``device``: lm-eval's CLI passes cuda:0 by default; like its ``hf`` backend,
    the adapter falls back to the CPU when no GPU is there.
    """

    def __init__(self, path: str, batch_size: int | str = DEFAULT_BATCH_SIZE, device: str | None = None,
                 precision: str = "fp32", max_length: int | None = None, **ignored):
        super().__init__()
        if ignored:
            log.warning("lmlab model: ignoring %s", ", ".join(f"{k}={v}" for k, v in sorted(ignored.items())))
        auto = str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH_SIZE if auto else check_argument("batch_size", batch_size, Count)
        check_argument("max_length", max_length, Count | None)
        check_argument("precision", precision, Precision)
        self._device = _available_device(device)
        ckpt = require_language_model(load_checkpoint(path, device=self._device))
        self.model, self.tokenizer, self.path = ckpt.model, ckpt.tokenizer, str(ckpt.path)
        self.max_length = max_length or self.model.context_length
        self.precision = resolve_precision(precision, self._device, width_of(self.model))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "LmlabLM":
        """lm-eval's constructor from ``--model_args``; a value given there wins over the same one from lm-eval's
        own flags (its CLI always passes ``--batch_size``, 1 by default, and ``--device``)."""
        defaults = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**defaults, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LmlabLM":
        """``create_from_arg_obj`` of ``key=value,...`` (lm_eval.simple_evaluate's string form)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache keys on: the checkpoint folder."""
        return self.path

    def _compute(self):
        """The autocast (or none, fp32) that every forward pass runs in."""
        return autocast_context(self.precision, self._device)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, is greedy) of each request's continuation after its context."""
        pairs = [tuple(req.args) for req in requests]
        with self._compute():
            results = score_continuations(self.model, self.tokenizer, pairs, self.batch_size, self.max_length)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each request's whole text (after end-of-text), in windows of the model's context."""
        texts = [req.args[0] for req in requests]
        with self._compute():
            results = score_rolling(self.model, self.tokenizer, texts, self.batch_size)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, greedy unless it asks to sample, cut before the first of its ``until``
        strings and at most ``max_gen_toks`` tokens; prompts too long are cut from the left. ``batch_size``
        requests decode at once."""
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [req.args for req in requests[start:start + self.batch_size]]
            params = [self.sampling_params(dict(gen_kwargs)) for _, gen_kwargs in chunk]
            with self._compute():
                done = generate_texts(self.model, self.tokenizer, [context for context, _ in chunk], params,
                                      truncate=True)
            for (context, gen_kwargs), completion in zip(chunk, done):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), completion.text)
                outputs.append(completion.text)
        return outputs

    def sampling_params(self, gen_kwargs: dict) -> SamplingParams:
        """lm-eval's generation arguments (until, max_gen_toks, do_sample, temperature, top_p, top_k, seed) as
        lmlab's SamplingParams; end-of-text always stops (the engine's rule, and the ``hf`` backend's)."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if self.model.context_length is not None:
            max_new = min(max_new, self.model.context_length - 1)  # room for at least one prompt token
        sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if sample else 0.0))
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature if sample else 0.0,
                                top_p=gen_kwargs.pop("top_p", None), top_k=gen_kwargs.pop("top_k", None),
                                seed=gen_kwargs.pop("seed", None), stop=[s for s in until if s])
        if gen_kwargs:
            log.warning("lmlab model: generation arguments not used: %s", ", ".join(sorted(gen_kwargs)))
        params.validate()
        return params


def _available_device(name: str | None) -> torch.device:
    """The device to run on: ``name``, or the best one there is when it is None or names a CUDA GPU this
    machine lacks (lm-eval's CLI asks for cuda:0 unless told otherwise)."""
    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        if name is not None:
            log.warning("lmlab model: %s is not available; using what is", name)
        return resolve_device("auto")
    return resolve_device(name)


def register() -> None:
    """Make ``--model lmlab`` known to lm-eval in this process (a lazy entry: the class loads when asked for)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="lmlab.eval.harness:LmlabLM")


@contextlib.contextmanager
def _argv(args: list[str]):
    """``sys.argv`` set to ``args`` for the duration (lm-eval's command line parses sys.argv)."""
    saved, sys.argv = sys.argv, args
    try:
        yield
    finally:
        sys.argv = saved


def with_local_tasks(args: list[str]) -> list[str]:
    """lm-eval arguments with lmlab's local task folder as ``--include_path`` when they give none."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return list(args)
    return [*args, "--include_path", str(HARNESS_TASKS)]


def run_lm_eval(args: list[str]) -> None:
    """Run lm-eval's own command line with ``args`` (what ``lm_eval`` takes: ``--model lmlab --model_args
    path=CKPT --tasks arc_easy_local --metadata '{"data_dir": DIR}'``, or ``--model hf ...``), with the
    ``lmlab`` model registered and lmlab's local tasks included."""
    from lm_eval.__main__ import cli_evaluate

    register()
    with _argv(["lm_eval", *with_local_tasks(args)]):
        cli_evaluate()


register()  # importing this module is what makes ``--model lmlab`` known (lm_eval.simple_evaluate too)

if __name__ == "__main__":
    run_lm_eval(sys.argv[1:])
