"""The encoder-decoder commands end to end: ``generate --source/--source-file``, ``eval seq2seq`` and
``serve`` (/v1/completions), on a tiny Transformer trained here to copy its source (words of a six-word
vocabulary), and every bad input as a one-line error."""

import gzip
import json
import random
import urllib.request

import pytest
import torch
from fastapi.testclient import TestClient

from lmlab.cli import main
from lmlab.config import ModelConfig, ServeConfig
from lmlab.data.labeled import pad_rows
from lmlab.data.tokenizer import train_tokenizer
from lmlab.eval.text_metrics import text_scores
from lmlab.generate.sampling import SamplingParams
from lmlab.generate.seq2seq import encode_sources, generate_target_texts, seq2seq_beam_search, seq2seq_completions
from lmlab.models.registry import build_model
from lmlab.serve.app import create_app
from lmlab.train.checkpoint import load_checkpoint, save_checkpoint

from conftest import live_server
from test_cli import assert_one_line_error, run

WORDS = "red green blue black white pink".split()
BLOCK = 8


def phrases(n: int, seed: int) -> list[str]:
    """``n`` phrases of one to four colour words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def train_copy_model(tok, steps: int = 200) -> torch.nn.Module:
    """A one-layer encoder-decoder Transformer trained to write its source again (learnt in ~150 steps)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="seq2seq", n_layer=1, n_head=2, d_model=32, block_size=BLOCK,
                                    vocab_size=tok.vocab_size, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    eot = tok.eot_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train ~20x faster on one thread than on a busy machine's all
    try:
        for step in range(steps):
            ids = tok.encode_batch(phrases(32, step + 1))
            src, mask = pad_rows(ids, 0), pad_rows([[1] * len(i) for i in ids], 0).bool()
            tgt_in, targets = pad_rows([[eot, *i] for i in ids], 0), pad_rows([[*i, eot] for i in ids], -100)
            _, loss = model(src, tgt_in, mask, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def s2s(tmp_path_factory):
    """A copy model, an untrained one, a decoder-only LM (same word tokenizer), aligned files and a pairs folder."""
    root = tmp_path_factory.mktemp("s2s")
    tok = train_tokenizer("word", phrases(200, 0))
    tok.save(root / "tok.json")
    torch.manual_seed(1)
    untrained = build_model(ModelConfig(family="rnn_seq2seq", n_layer=1, d_model=16, block_size=BLOCK,
                                        vocab_size=tok.vocab_size))
    lm = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=BLOCK, vocab_size=tok.vocab_size))
    paths = {"copy": save_checkpoint(root / "copy", train_copy_model(tok), tok),
             "untrained": save_checkpoint(root / "untrained", untrained, tok),
             "lm": save_checkpoint(root / "lm", lm, tok)}
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        texts = phrases(12, 100 + seed)
        for side in ("src", "tgt"):
            (root / f"{split}.{side}").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    with gzip.open(root / "test.src.gz", "wt", encoding="utf-8") as f:
        f.write((root / "test.src").read_text(encoding="utf-8"))
    assert main(["data", "prepare", "--pairs", str(root / "train.src"), str(root / "train.tgt"),
                 "--val", str(root / "val.src"), str(root / "val.tgt"), "--test", str(root / "test.src"),
                 str(root / "test.tgt"), "--tokenizer", str(root / "tok.json"), "-o", str(root / "pairs")]) == 0
    return {**{k: str(v) for k, v in paths.items()}, "root": root}


def test_generate_writes_the_target_of_a_source(s2s, capsys):
    code, out, _ = run(["generate", s2s["copy"], "--source", "  blue pink white ", "--greedy"], capsys)
    assert code == 0 and out == "blue pink white\n"  # streamed; the source is read as the data path reads it
    code, again, _ = run(["generate", s2s["copy"], "--source", "blue pink white", "--greedy", "--no-stream"], capsys)
    assert code == 0 and again == out
    code, beams, _ = run(["generate", s2s["copy"], "--source", "blue pink white", "--num-beams", "3"], capsys)
    assert code == 0 and beams == out


def test_generate_from_a_source_file_writes_a_line_per_source_in_order(s2s, capsys):
    sources = (s2s["root"] / "test.src").read_text(encoding="utf-8").splitlines()
    for extra in (["--greedy"], ["--num-beams", "2"]):
        code, out, _ = run(["generate", s2s["copy"], "--source-file", s2s["root"] / "test.src.gz", *extra], capsys)
        assert code == 0 and out.splitlines() == sources
    ckpt = load_checkpoint(s2s["untrained"])
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=7)
    code, out, _ = run(["generate", s2s["untrained"], "--source-file", s2s["root"] / "test.src", "--num-samples", "2",
                        "--max-new-tokens", "5", "--temperature", "1", "--seed", "7"], capsys)
    rows = [ids for ids in encode_sources(ckpt.tokenizer, sources) for _ in range(2)]
    seeded = [params, SamplingParams(max_new_tokens=5, temperature=1.0, seed=8)] * len(sources)
    done = seq2seq_completions(ckpt.model, ckpt.tokenizer, rows, seeded, batch_size=len(rows))
    expected = [" ".join(c.text.splitlines()) for c in done]  # a line per target: its line breaks as spaces
    assert code == 0 and out.splitlines() == expected  # sample i of each source seeded seed + i; in any batch
    assert len(set(expected)) > 1


def test_targets_come_back_in_order_whatever_the_batch_size(s2s):
    """Sources run shortest first, a few at a time (continuous batching, or beam batches): each target
    is still the one its source gets alone, in input order."""
    ckpt = load_checkpoint(s2s["untrained"])
    model, tok = ckpt.model, ckpt.tokenizer
    sources = encode_sources(tok, phrases(10, 5))
    params = [SamplingParams(max_new_tokens=3 + i % 4, temperature=1.0, seed=i) for i in range(10)]
    alone = [generate_target_texts(model, tok, [s], [p])[0].text for s, p in zip(sources, params)]
    assert [c.text for c in seq2seq_completions(model, tok, sources, params, batch_size=3)] == alone
    assert len(set(alone)) > 5  # different targets: a row out of place would show
    model = load_checkpoint(s2s["copy"]).model  # the untrained model's best beam is the same for every source
    beams = [seq2seq_beam_search(model, [s], 3, 6, tok.eot_id, tok.eot_id)[0] for s in sources]
    alone = [tok.decode([t for t in b if t != tok.eot_id]) for b in beams]
    same = [SamplingParams(max_new_tokens=6)] * len(sources)
    assert len(set(alone)) > 2
    assert [c.text for c in seq2seq_completions(model, tok, sources, same, num_beams=3, batch_size=4)] == alone


def test_eval_seq2seq_scores_the_targets_against_the_references(s2s, capsys):
    out_dir = s2s["root"] / "eval"
    code, out, _ = run(["eval", "seq2seq", s2s["copy"], "--data", s2s["root"] / "pairs", "--out", out_dir], capsys)
    report = json.loads(out)
    assert code == 0 and report["bleu"] == pytest.approx(100) and report["chrf"] == pytest.approx(100)
    assert report["rougeL"] == pytest.approx(100) and report["examples"] == 12
    assert report["bleu_signature"].startswith("nrefs:1|") and report["chrf_signature"].startswith("nrefs:1|")
    assert json.loads((out_dir / "results.json").read_text()) == report
    markdown = (out_dir / "results.md").read_text()
    assert "| bleu | 100.0000 |" in markdown and "| bleu_signature | nrefs:1\\|case:" in markdown  # "|" kept in its cell
    references = (s2s["root"] / "test.tgt").read_text(encoding="utf-8").splitlines()
    assert (out_dir / "hypotheses.txt").read_text(encoding="utf-8").splitlines() == references

    code, out, _ = run(["eval", "seq2seq", s2s["untrained"], "--data", s2s["root"] / "val.src", s2s["root"] / "val.tgt",
                        "--limit", "5", "--num-beams", "2", "--metrics", "bleu,rouge", "--out", s2s["root"] / "e2"], capsys)
    report = json.loads(out)
    hypotheses = (s2s["root"] / "e2" / "hypotheses.txt").read_text(encoding="utf-8").splitlines()
    references = (s2s["root"] / "val.tgt").read_text(encoding="utf-8").splitlines()[:5]
    scores = text_scores(hypotheses, references, ["bleu", "rouge"])
    assert code == 0 and report["examples"] == 5 and "chrf" not in report and report["num_beams"] == 2
    assert {k: report[k] for k in scores} == scores and report["bleu"] < 100

    code, out, err = run(["eval", "seq2seq", s2s["untrained"], "--data", s2s["root"] / "val.src", s2s["root"] / "val.tgt",
                          "--limit", "2", "--max-new-tokens", "100000", "--out", s2s["root"] / "e3"], capsys)
    context = load_checkpoint(s2s["untrained"]).model.context_length
    assert code == 0 and f"leaves room for at most {context - 1} new tokens after the start token" in err
    assert json.loads(out)["max_new_tokens"] == context - 1  # what decoding could give, not what was asked


def test_serve_answers_completions_for_an_encoder_decoder(s2s):
    ckpt = load_checkpoint(s2s["copy"])
    app = create_app(ckpt.model, ckpt.tokenizer, ServeConfig(model_name="copy", max_new_tokens=16))
    body = {"model": "copy", "prompt": "green red blue", "max_tokens": 8, "temperature": 0}
    with TestClient(app) as client:
        full = client.post("/v1/completions", json=body).json()
        assert full["choices"][0]["text"] == "green red blue" and full["choices"][0]["finish_reason"] == "stop"
        assert full["usage"]["prompt_tokens"] == 3
        stream = client.post("/v1/completions", json={**body, "stream": True})
        chunks = [json.loads(x[6:]) for x in stream.text.split("\n\n") if x.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "green red blue"
        several = client.post("/v1/completions", json={**body, "prompt": ["pink", "white black"], "n": 2}).json()
        assert [c["text"] for c in several["choices"]] == ["pink", "pink", "white black", "white black"]
        cut = client.post("/v1/completions", json={**body, "stop": " blue"}).json()["choices"][0]
        assert cut["text"] == "green red" and cut["finish_reason"] == "stop"
        chat = client.post("/v1/chat/completions", json={"model": "copy", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "encoder-decoder" in chat.json()["error"]["message"]
        long = client.post("/v1/completions", json={**body, "prompt": "red " * (BLOCK + 1)})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        blank = client.post("/v1/completions", json={**body, "prompt": "   "})
        assert blank.status_code == 400 and "empty" in blank.json()["error"]["message"]
        assert "/v1/completions" in client.get("/").text
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == "green red blue"


def test_bad_inputs_are_one_line_errors(s2s, capsys):
    root = s2s["root"]
    (root / "blank.txt").write_text("red\n\nblue\n", encoding="utf-8")
    too_long = " ".join(["red"] * (BLOCK + 2))
    cases = [
        (["generate", s2s["copy"], "--prompt", "red"], "is an encoder-decoder: give its source with --source"),
        (["generate", s2s["copy"], "--source", "red", "--truncate-prompt"], "--truncate-prompt is for decoder-only"),
        (["generate", s2s["lm"], "--source", "red"], "is a decoder-only language model: give a prompt with --prompt"),
        (["generate", s2s["copy"]], "give a source with --source TEXT or --source-file FILE"),
        (["generate", s2s["copy"], "--source", "red", "--source-file", root / "test.src"], "(one of them)"),
        (["generate", s2s["copy"], "--source", "   "], "the source is empty"),
        (["generate", s2s["copy"], "--source-file", root / "blank.txt"], "blank.txt:2: the source is empty"),
        (["generate", s2s["copy"], "--source", too_long], "shorten it or keep its first 8 tokens with --truncate-source"),
        (["generate", s2s["copy"], "--source", "red", "--num-beams", "2", "--num-samples", "2"], "do not combine"),
        (["chat", s2s["copy"], "--message", "hi"], "is an encoder-decoder"),
        (["eval", "ppl", s2s["copy"], "--data", root / "test.src"], "is an encoder-decoder"),
        (["eval", "seq2seq", s2s["lm"], "--data", root / "pairs"], "is not an encoder-decoder"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "pairs", "--split", "train"], "keeps no texts"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "pairs", "--metrics", "bleu,meteor"], "unknown metric meteor"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "val.src", root / "val.tgt", "--split", "val"], "--split picks"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "val.src", root / "test.tgt", root / "x"], "one table or two"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "pairs", "--limit", "0"], "limit must be >= 1"),
        (["eval", "seq2seq", s2s["copy"], "--data", root / "pairs", "--batch-size", "0"], "batch_size must be >= 1"),
    ]
    for argv, fragment in cases:
        code, _, err = run(argv + ["--out", root / "bad"] if argv[0] == "eval" else argv, capsys)
        assert_one_line_error(code, err, fragment)
    assert not (root / "bad").exists()  # nothing half-written
    code, out, _ = run(["generate", s2s["copy"], "--source", too_long, "--truncate-source", "--greedy"], capsys)
    assert code == 0 and len(out.split()) <= BLOCK


def test_lmlab_serve_command_serves_an_encoder_decoder(s2s):
    with live_server(s2s["copy"], "--model-name", "copy") as url:
        body = json.dumps({"model": "copy", "prompt": "white pink", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["choices"][0]["text"] == "white pink"
