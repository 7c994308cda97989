"""Instruction tuning: the chat template, loss only on assistant tokens, packing, and chat end to end."""

import io
import json
import logging

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.chat import END, ROLE_TOKENS, add_chat_tokens, conversation_of, read_conversations, render
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import DataError
from lmlab.finetune.sft import training_rows
from lmlab.models.interface import IGNORE_INDEX as IGNORE
from lmlab.generate.chat import ChatSession, run_repl
from lmlab.generate.sampling import SamplingParams
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import load_checkpoint, save_checkpoint

ANSWERS = {"say hi": "hi there", "say bye": "bye now"}


@pytest.fixture()
def chat_tokenizer():
    tok = train_tokenizer("char", ["some text to learn characters from: hi there, bye now, say"])
    tok.add_special_tokens([*ROLE_TOKENS.values(), END])
    return tok


def test_render_counts_only_assistant_tokens(chat_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi"},
                {"role": "assistant", "content": "hi there"}]
    ids, learn = render(chat_tokenizer, messages)
    assert chat_tokenizer.decode(ids) == ("<|system|>\nbe brief<|end|>\n<|user|>\nsay hi<|end|>\n"
                                          "<|assistant|>\nhi there<|end|>\n")
    counted = chat_tokenizer.decode([t for t, c in zip(ids, learn) if c])
    assert counted == "hi there<|end|>"
    prompt, _ = render(chat_tokenizer, messages[:2], add_generation_prompt=True)
    assert chat_tokenizer.decode(prompt).endswith("<|user|>\nsay hi<|end|>\n<|assistant|>\n")


def test_training_rows_pack_and_mask(chat_tokenizer):
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in list(ANSWERS.items()) * 10]
    rows = training_rows(chat_tokenizer, conversations, block_size=32, pack=True)
    assert all(len(x) == len(y) <= 32 for x, y in rows) and len(rows) < len(conversations)
    learned = "".join(chat_tokenizer.decode([t for t in y if t != IGNORE]) for _, y in rows)
    assert "say" not in learned and learned.count("hi there<|end|>") == 10
    unpacked = training_rows(chat_tokenizer, conversations, block_size=32, pack=False)
    assert len(unpacked) == len(conversations)


def test_conversation_shapes_and_errors():
    alpaca = conversation_of({"instruction": "Add", "input": "2 and 3", "output": "5"}, "x", system_prompt="sys")
    assert alpaca == [{"role": "system", "content": "sys"}, {"role": "user", "content": "Add\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]
    messages = conversation_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "x")
    assert messages[1]["content"] == "a"
    with pytest.raises(DataError, match="no assistant answer"):
        conversation_of({"messages": [{"role": "user", "content": "q"}]}, "f.jsonl:3")
    with pytest.raises(DataError, match="role"):
        conversation_of({"messages": [{"role": "robot", "content": "q"}]}, "f.jsonl:3")
    with pytest.raises(DataError, match="expected"):
        conversation_of({"question": "q"}, "f.jsonl:3")


def test_records_without_an_answer_are_skipped_and_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.data.chat")
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": ""},
            {"instruction": "d", "input": "", "output": "e"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert [c[1]["content"] for c in read_conversations(path)] == ["b", "e"]
    assert "skipped 1 conversation" in caplog.text
    path.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no conversations"):
        read_conversations(path)


def test_adding_chat_tokens_grows_the_model(trained_run):
    ckpt = load_checkpoint(trained_run)
    before = ckpt.model.config.vocab_size
    assert add_chat_tokens(ckpt.tokenizer, ckpt.model) == 4
    assert ckpt.model.config.vocab_size == ckpt.tokenizer.vocab_size == before + 4
    assert ckpt.model.tok_emb.weight.shape[0] == before + 4
    assert add_chat_tokens(ckpt.tokenizer, ckpt.model) == 0


def test_sft_then_chat_answers_in_the_trained_format(trained_run, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    records = [{"instruction": q, "input": "", "output": a} for q, a in ANSWERS.items()] * 100
    records.append({"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "sft.yaml"
    config.write_text(f"""
model: {{path: {trained_run}}}
data: {{train: {data}, val_fraction: 0.05}}
train: {{out_dir: {tmp_path / 'sft'}, batch_size: 8, max_steps: 150, lr: 3.0e-3, warmup_steps: 10,
         eval_interval: 75, log_interval: 25, progress: false}}
""")
    assert main(["finetune", "sft", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_loss"] for m in metrics if "val_loss" in m][-1] < 0.1
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "sft"), "--greedy", "--message", "say hi", "--message", "say bye"]) == 0
    assert capsys.readouterr().out.splitlines() == ["hi there", "bye now"]

    ckpt = load_checkpoint(tmp_path / "sft")
    session = ChatSession(ckpt.model, ckpt.tokenizer, SamplingParams(max_new_tokens=20, temperature=0.0))
    out = io.StringIO()
    run_repl(session, io.StringIO("say hi\n/reset\nsay bye\n/exit\n"), out)
    text = out.getvalue()
    assert "assistant> hi there" in text and "(conversation cleared)" in text and "assistant> bye now" in text
    assert len(session.messages) == 2  # only the turns after /reset


def test_chat_with_a_base_model_uses_a_plain_transcript_and_says_so(trained_run, capsys):
    assert main(["chat", str(trained_run), "--message", "hello", "--max-new-tokens", "5"]) == 0
    assert "lmlab finetune sft" in capsys.readouterr().err


def sft_config(trained_run, tmp_path, **train):
    data = tmp_path / "chat.jsonl"
    records = [{"instruction": q, "input": "", "output": a} for q, a in ANSWERS.items()] * 20
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    train_yaml = ", ".join(f"{k}: {v}" for k, v in train.items())
    config = tmp_path / "sft.yaml"
    config.write_text(f"""
model: {{path: {trained_run}}}
data: {{train: {data}, val_fraction: 0.1, pack: false}}
train: {{batch_size: 8, lr: 3.0e-3, warmup_steps: 2, eval_interval: 5, log_interval: 1, progress: false,
         checkpoint_interval: 100, {train_yaml}}}
""")
    return config


def test_a_base_that_is_not_a_decoder_is_refused_by_name(trained_run, tmp_path, capsys):
    ckpt = load_checkpoint(trained_run)
    w2v = build_model(ModelConfig(family="word2vec", vocab_size=ckpt.tokenizer.vocab_size, d_model=8))
    save_checkpoint(tmp_path / "w2v", w2v, ckpt.tokenizer)
    config = sft_config(tmp_path / "w2v", tmp_path, max_steps=4)
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: the base model is word vectors (word2vec): instruction tuning needs a decoder (a gpt or "
                   "recurrent language model)")


def sft_losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line]


def test_sft_resumes_exactly(trained_run, tmp_path):
    config = sft_config(trained_run, tmp_path, max_steps=8, ema_decay=0.8)
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'full'}"]) == 0
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'part'}", "--stop-after", "3"]) == 0
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'part'}", "--resume"]) == 0
    full, part = sft_losses(tmp_path / "full"), sft_losses(tmp_path / "part")
    assert len(full) == 8 and full == part


def test_sft_grad_accumulation_equals_one_big_batch(trained_run, tmp_path):
    """Rows hold different numbers of answer tokens: each micro-batch's loss counts by its tokens."""
    config = sft_config(trained_run, tmp_path, max_steps=3)
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'big'}", "train.batch_size=16"]) == 0
    assert main(["finetune", "sft", str(config), f"train.out_dir={tmp_path / 'accum'}", "train.batch_size=4",
                 "train.grad_accum=4"]) == 0
    big, accum = (load_checkpoint(tmp_path / n).model.state_dict() for n in ("big", "accum"))
    # atol 1e-4: the key bias has a zero gradient in exact arithmetic (softmax ignores a constant shift),
    # so its gradient is rounding noise, which Adam scales up to steps of ~1e-5 either way
    assert all(torch.allclose(big[k], accum[k], atol=1e-4) for k in big)
    assert max((big[k] - accum[k]).abs().max() for k in big if "qkv.bias" not in k) < 1e-5
