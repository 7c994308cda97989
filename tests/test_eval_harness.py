"""lm-evaluation-harness parity: one tiny GPT scored on a local ARC-style task by the harness through the lmlab
adapter (its own command line), by the harness's ``hf`` backend on the exported Hugging Face folder, and by
lmlab's scorer agree example by example. No network: the task reads JSONL written here."""

import importlib
import json
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab.config import ModelConfig  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.errors import ConfigError  # noqa: E402
from lmlab.eval.harness import HARNESS_TASKS, LmlabLM, run_lm_eval  # noqa: E402
from lmlab.eval.loglik import score_continuations  # noqa: E402
from lmlab.eval.tasks import evaluate_task, load_spec  # noqa: E402
from lmlab.interop.hf import export_hf  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.train.checkpoint import save_checkpoint  # noqa: E402

QUESTIONS = [
    ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
    ("What melts ice fastest?", ["salt", "sand", "sawdust"], "A"),
    ("Where does the Sun rise?", ["in the west", "in the east", "in the north", "in the south"], "B"),
    ("Which is a mammal?", ["shark", "trout", "whale", "frog", "newt"], "C"),
    ("What do bees make?", ["milk", "silk", "wax and honey", "wool"], "C"),
    ("Which tool measures mass?", ["a balance", "a ruler", "a thermometer", "a clock"], "A"),
]
LABELS = ["A", "B", "C", "D", "E"]


def arc_record(i: int, stem: str, choices: list[str], answer: str) -> dict:
    labels = LABELS if i % 2 else ["1", "2", "3", "4", "5"]  # ARC has both kinds of labels
    return {"id": f"q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": labels[j]}
                                                                   for j, t in enumerate(choices)]},
            "answerKey": labels[LABELS.index(answer)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(lmlab checkpoint, exported HF folder, ARC folder) of a tiny random GPT with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("harness")
    texts = [f"Question: {q}\nAnswer: {' '.join(c)}" for q, c, _ in QUESTIONS]
    tokenizer = train_tokenizer("bpe", texts * 4, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gpt2", n_layer=2, n_head=2, d_model=32, block_size=64,
                                    vocab_size=tokenizer.vocab_size)).eval()
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer)
    hf = export_hf(model, tokenizer, root / "hf")
    arc = root / "arc"
    arc.mkdir()
    lines = [json.dumps(arc_record(i, *q)) for i, q in enumerate(QUESTIONS)]
    for split in ("Train", "Dev", "Test"):  # the task's three splits; test is the one scored
        (arc / f"ARC-Easy-{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ckpt, hf, arc, tokenizer, model


def samples_of(results: dict) -> list[dict]:
    return sorted(results["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])


def loglikelihoods(sample: dict) -> list[float]:
    """Each choice's log-likelihood (the samples file holds them as strings)."""
    return [float(resp[0][0]) for resp in sample["resps"]]


class LocalTasksOnly(TaskManager):
    """lm-eval's task manager without its own few thousand task YAMLs, whose indexing alone takes ~5 s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, include_defaults=False, **kwargs)


def test_harness_through_the_adapter_matches_hf_backend_and_lmlab_scorer(setup, tmp_path, monkeypatch, capsys):
    """lm-eval's command line with --model lmlab (run_lm_eval: the registration and the local task folder),
    lm_eval.simple_evaluate with the hf backend on the exported folder, lmlab's own arc_easy task (what `lmlab
    eval task` runs) and score_continuations give the same log-likelihood for every choice and the same
    acc / acc_norm for every question."""
    ckpt, hf, arc, tokenizer, model = setup
    out = tmp_path / "out"
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    run_lm_eval(["--model", "lmlab", "--model_args", f"path={ckpt},batch_size=4", "--tasks", "arc_easy_local",
                 "--metadata", json.dumps({"data_dir": str(arc)}), "--device", "cpu", "--output_path", str(out),
                 "--log_samples"])
    ours = [json.loads(line) for f in out.rglob("samples_arc_easy_local_*.jsonl") for line in f.open()]
    ours.sort(key=lambda s: s["doc_id"])
    summary = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["arc_easy_local"]

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=["arc_easy_local"], device="cpu",
        batch_size=4, log_samples=True,
        task_manager=LocalTasksOnly(include_path=str(HARNESS_TASKS), metadata={"data_dir": str(arc)}))
    hf_samples = samples_of(theirs)

    task = evaluate_task(model, tokenizer, load_spec("arc_easy", {"data": str(arc)}), batch_size=4)

    assert len(ours) == len(hf_samples) == len(task["samples"]) == len(QUESTIONS)
    for mine, other, lmlab_task, (stem, choices, _) in zip(ours, hf_samples, task["samples"], QUESTIONS):
        assert loglikelihoods(mine) == pytest.approx(loglikelihoods(other), abs=1e-4)
        assert (mine["acc"], mine["acc_norm"]) == (other["acc"], other["acc_norm"])
        assert lmlab_task["logprobs"] == pytest.approx(loglikelihoods(mine), abs=1e-4)
        assert (lmlab_task["pred"] == lmlab_task["gold"], lmlab_task["pred_norm"] == lmlab_task["gold"]) == (
            mine["acc"] == 1.0, mine["acc_norm"] == 1.0)
        direct = score_continuations(model, tokenizer, [(f"Question: {stem}\nAnswer:", f" {c}") for c in choices])
        assert [lp for lp, _ in direct] == pytest.approx(loglikelihoods(mine), abs=1e-4)
    for metric in ("acc", "acc_norm"):
        assert summary[f"{metric},none"] == pytest.approx(theirs["results"]["arc_easy_local"][f"{metric},none"])
        assert task["metrics"][metric] == pytest.approx(summary[f"{metric},none"])


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_rolling_loglikelihood_and_generation_match_hf_backend(setup):
    """Texts longer than the context (64 tokens) are scored in the same windows; greedy generation stops at
    the same ``until`` strings and ``max_gen_toks``."""
    ckpt, hf, _, _, _ = setup
    ours = LmlabLM(path=str(ckpt), batch_size=3, device="cpu")
    theirs = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=3)
    texts = [" ".join(q for q, _, _ in QUESTIONS) * 3, "Answer: salt", "Which is a mammal? a whale " * 9]
    rolling = requests("loglikelihood_rolling", [(t,) for t in texts])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=1e-4)

    prompts = [(f"Question: {q}\nAnswer:", {"until": ["\n", "Question"], "max_gen_toks": 12, "do_sample": False})
               for q, _, _ in QUESTIONS]
    generate = requests("generate_until", prompts)
    generated = ours.generate_until(generate)
    assert generated == theirs.generate_until(generate)
    assert any(generated) and not any("\n" in g or "Question" in g for g in generated)


def test_lm_eval_flags_and_model_args_combine(setup):
    """lm-eval's CLI passes batch_size (1 by default) and device (cuda:0) itself: model_args win, and a missing
    GPU falls back to the CPU as the hf backend does; a bad value is a one-line ConfigError."""
    ckpt = setup[0]
    lm = LmlabLM.create_from_arg_string(f"path={ckpt},batch_size=5", {"batch_size": 1, "device": "cuda:0"})
    assert lm.batch_size == 5
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert LmlabLM.create_from_arg_string(f"path={ckpt},batch_size=auto").batch_size == 32
    for bad, name in (("batch_size=0", "batch_size"), ("precision=fp8", "precision")):
        with pytest.raises(ConfigError, match=name):
            LmlabLM.create_from_arg_string(f"path={ckpt},{bad}")


def test_missing_lm_eval_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "lmlab.eval.harness")
    with pytest.raises(ConfigError, match=r"pip install 'lmlab\[lm-eval\]'"):
        importlib.import_module("lmlab.eval.harness")


def test_lmlab_eval_harness_passes_every_argument_to_lm_eval(monkeypatch):
    """`lmlab eval harness ...` hands lm_eval its arguments untouched (-h and -v are lm_eval's there, not lmlab's)."""
    import lmlab.eval.harness as harness
    from lmlab.cli import main

    seen = []
    monkeypatch.setattr(harness, "run_lm_eval", seen.append)
    args = ["--model", "lmlab", "--model_args", "path=ckpt,batch_size=16", "--tasks", "arc_easy_local", "-v", "-h"]
    assert main(["eval", "harness", *args]) == 0
    assert seen == [args]
    assert harness.with_local_tasks(["--tasks", "x"]) == ["--tasks", "x", "--include_path", str(HARNESS_TASKS)]
    assert harness.with_local_tasks(["--include_path=mine"]) == ["--include_path=mine"]
