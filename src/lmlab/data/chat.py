"""lmlab's chat template, and conversations read from JSONL/JSON files.

One template for every lmlab chat model; each turn is marked by a special token:

    <|system|>
    You are a helpful assistant.<|end|>
    <|user|>
    Name three primary colours.<|end|>
    <|assistant|>
    Red, yellow and blue.<|end|>

Files are JSONL or JSON (optionally .gz) of ``{"instruction", "input", "output"}`` records (Alpaca)
or ``{"messages": [{"role": "user" | "assistant" | "system", "content": ...}, ...]}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from lmlab.data.sources import iter_records
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END]


class NoAnswer(DataError):
    """A conversation with nothing for the assistant to learn (read_conversations skips these)."""


def conversation_of(record: object, where: str, system_prompt: str | None = None) -> list[dict]:
    """The messages of one record (Alpaca or messages shape), checked; a DataError says what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs a role (system, user, assistant) and a string content")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "instruction" in record and "output" in record:
        prompt = str(record["instruction"]).strip()
        if str(record.get("input") or "").strip():
            prompt += "\n\n" + str(record["input"]).strip()
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"]).strip()}]
    else:
        raise DataError(f"{where}: expected {{'instruction', 'input', 'output'}} or {{'messages': [...]}}, "
                        f"got keys {', '.join(list(record)[:5])}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise NoAnswer(f"{where}: the conversation has no assistant answer to learn from")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def read_conversations(path: str | Path, max_examples: int | None = None,
                       system_prompt: str | None = None) -> list[list[dict]]:
    """The conversations of a JSONL/JSON(.gz) file, in file order.

    Records with an empty answer (real datasets have a few: Alpaca 28 of 52,002) are skipped and
    counted in a log note; a record of the wrong shape is an error.
    """
    conversations, skipped = [], []
    for where, record in iter_records(path):
        try:
            conversations.append(conversation_of(record, where, system_prompt))
        except NoAnswer:
            skipped.append(where)
        if max_examples is not None and len(conversations) >= max_examples:
            break
    if skipped:
        logger.info(f"note: skipped {len(skipped)} conversation(s) with no assistant answer (first: {skipped[0]})")
    if not conversations:
        raise DataError(f"{path}: no conversations with an assistant answer")
    return conversations


def add_chat_tokens(tokenizer: Tokenizer, model: nn.Module) -> int:
    """Make sure the tokenizer has the chat tokens and the model rows for them; return how many were added."""
    missing = [t for t in CHAT_TOKENS if tokenizer.tk.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    if tokenizer.vocab_size > model.config.vocab_size:
        if not hasattr(model, "resize_vocab"):
            raise ConfigError(f"a {model.config.family} model cannot grow its vocabulary for the chat tokens")
        model.resize_vocab(tokenizer.vocab_size)
    return len(missing)


def render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the chat template, and for each id whether the loss counts it.

    With ``add_generation_prompt`` the ids end with an open assistant turn, ready for generation.
    """
    ids, learn = [], []

    def add(piece_ids: list[int], counted: bool) -> None:
        ids.extend(piece_ids)
        learn.extend([counted] * len(piece_ids))

    special = {name: tokenizer.tk.token_to_id(tok) for name, tok in {**ROLE_TOKENS, "end": END}.items()}
    if None in special.values():
        raise ConfigError("the tokenizer has no chat tokens; this model was not instruction-tuned with lmlab")
    for m in messages:
        add([special[m["role"]]], False)
        add(tokenizer.encode("\n", allow_special=False), False)
        assistant = m["role"] == "assistant"
        add(tokenizer.encode(m["content"], allow_special=False), assistant)
        add([special["end"]], assistant)  # learning to close its turn is how the model learns to stop
        add(tokenizer.encode("\n", allow_special=False), False)
    if add_generation_prompt:
        add([special["assistant"]], False)
        add(tokenizer.encode("\n", allow_special=False), False)
    return ids, learn


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """Id of <|end|>, where an assistant's turn (and generation) stops."""
    i = tokenizer.tk.token_to_id(END)
    if i is None:
        raise ConfigError("the tokenizer has no chat tokens; instruction-tune the model first (lmlab finetune sft)")
    return i


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    """True if the tokenizer has lmlab's chat tokens (the model was instruction-tuned with lmlab)."""
    return all(tokenizer.tk.token_to_id(t) is not None for t in CHAT_TOKENS)


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[str]]:
    """What to generate the assistant's next turn from: (prompt ids, stop token ids, stop strings).

    An instruction-tuned model gets its chat template and stops at <|end|>. A base model, which has
    no chat tokens, gets a plain transcript ("User: ...", "Assistant:") and stops where it would
    start the user's next line, so chat front ends work with any checkpoint.
    """
    if has_chat_tokens(tokenizer):
        ids, _ = render(tokenizer, messages, add_generation_prompt=True)
        return ids, [end_of_turn_id(tokenizer)], []
    text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return tokenizer.encode(text, allow_special=False), [], ["\nUser:", "\nSystem:"]
