"""Chat: a conversation with an instruction-tuned model, through the one generation engine.

``ChatSession`` keeps the history, renders it in lmlab's chat template (data/chat.py) with an open
assistant turn, generates until <|end|>, and appends the answer to the history. ``lmlab chat`` is
a terminal front end over it (``/reset`` clears the history, ``/exit`` or end of input quits).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, TextIO

import torch.nn as nn

from lmlab.data.chat import chat_prompt, has_chat_tokens
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError, LmlabError
from lmlab.generate.engine import generate_text
from lmlab.generate.sampling import SamplingParams

log = logging.getLogger(__name__)


class ChatSession:
    """A conversation: ``reply(text)`` answers a user message and remembers both turns."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None):
        self.model, self.tokenizer, self.params, self.system = model, tokenizer, params, system
        context = model.context_length
        if context is not None and params.max_new_tokens >= context:
            log.warning(f"max new tokens ({params.max_new_tokens}) is not below the model's context of {context} "
                        f"tokens: each answer stops when the context is full")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> tuple[list[int], list[int], list[str]]:
        """The history in the model's chat format ending in an open assistant turn, and what ends that turn."""
        return chat_prompt(self.tokenizer, self.messages)

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the assistant's answer to ``text`` (streamed to ``on_text``) and add both to the history."""
        if not text.strip():
            raise DataError("empty message")
        message = {"role": "user", "content": text}
        self.messages.append(message)
        try:
            ids, stop_tokens, stop = self._fitted_prompt()
        except LmlabError:  # a message that cannot be answered leaves the conversation as it was
            if self.messages and self.messages[-1] is message:
                self.messages.pop()
            raise
        params = dataclasses.replace(self.params, stop_tokens=[*self.params.stop_tokens, *stop_tokens],
                                     stop=[*self.params.stop, *stop])
        answer = generate_text(self.model, self.tokenizer, ids, params, on_text=on_text)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


    def _fitted_prompt(self) -> tuple[list[int], list[int], list[str]]:
        """``prompt()`` once the oldest turns that no longer fit the context are forgotten; a DataError (and
        the newest message dropped) when even that message alone leaves no room for an answer."""
        ids, stop_tokens, stop = self.prompt()
        context = self.model.context_length
        while context is not None and len(ids) >= context and len(self.messages) > 1 + bool(self.system):
            self.messages.pop(1 if self.system else 0)  # forget the oldest turns that no longer fit
            ids, stop_tokens, stop = self.prompt()
        if context is not None and len(ids) >= context:
            self.messages.pop()
            what = "the message and the system prompt take" if self.system else "the message takes"
            raise DataError(f"{what} {len(ids)} tokens in the chat format, but the model's context is {context}; "
                            f"shorten it")
        return ids, stop_tokens, stop


def run_repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Read user lines, stream answers; /reset clears the history, /exit (or end of input) quits. A message
    that cannot be answered (too long for the context, not valid text) is logged as an error and the
    chat goes on."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write("chat: type a message; /reset clears the conversation, /exit quits\n")
    while True:
        write("you> ")
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            write("\n" if not line else "")
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        write("assistant> ")
        try:
            session.reply(text, on_text=write)
        except LmlabError as e:  # one bad message (too long, not UTF-8) does not end the chat
            write("\n")
            log.error(str(e))
            continue
        write("\n")


def chat(model: nn.Module, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None,
         messages: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """``lmlab chat``: answer each of ``messages`` in turn (one conversation), or talk interactively.

    A model without chat tokens (not tuned with ``lmlab finetune sft``) chats in a plain transcript;
    a note says so.
    """
    if not has_chat_tokens(tokenizer):
        log.info("note: this model has no chat tokens (it was not tuned with lmlab finetune sft); chatting in a plain "
                 "'User: / Assistant:' transcript")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(model, tokenizer, params, system=system)
    if not messages:
        run_repl(session, stdin, stdout)
        return

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    for message in messages:
        session.reply(message, on_text=write)
        write("\n")
