"""`lmlab chat` as a user meets it: an interactive session in a pseudo-terminal."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from lmlab.generate.chat import ChatSession
from lmlab.generate.sampling import SamplingParams
from lmlab.train.checkpoint import load_checkpoint


class Terminal:
    """A child process on a pseudo-terminal: ``expect`` reads until a text shows up, ``send`` types a line."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Everything printed up to and including the next ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"waited {timeout} s for {text!r}; the terminal shows:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    chunk = ""
                if not chunk and self.proc.poll() is not None:
                    pytest.fail(f"the program exited ({self.proc.returncode}) before {text!r}:\n{self.seen}")
                self.seen += chunk
        upto = self.seen.index(text) + len(text)
        out, self.seen = self.seen[:upto], self.seen[upto:]
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_interactive_chat_in_a_pseudo_terminal(trained_run):
    ckpt = load_checkpoint(trained_run)
    expected = ChatSession(ckpt.model, ckpt.tokenizer, SamplingParams(max_new_tokens=6, temperature=0)).reply("hi")
    term = Terminal([sys.executable, "-m", "lmlab.cli", "chat", str(trained_run), "--greedy", "--max-new-tokens", "6"])
    try:
        assert "/reset" in term.expect("you> ")
        term.send("hi")
        answer = term.expect("you> ")
        assert "assistant> " in answer
        shown = answer.split("assistant> ", 1)[1].rsplit("you> ", 1)[0]
        assert shown.replace("\r\n", "\n").rstrip("\n") == expected.rstrip("\n")
        term.send("/reset")
        assert "(conversation cleared)" in term.expect("you> ")
        term.send("/exit")
    finally:
        code = term.close()
    assert code == 0


def test_more_new_tokens_than_the_context_holds_is_a_warning(trained_run, caplog):
    ckpt = load_checkpoint(trained_run)
    with caplog.at_level("WARNING", logger="lmlab"):
        ChatSession(ckpt.model, ckpt.tokenizer, SamplingParams(max_new_tokens=1000))
    assert any("max new tokens (1000) is not below the model's context of 32" in r.getMessage() for r in caplog.records)


def test_a_message_that_cannot_be_answered_does_not_end_the_chat(trained_run, caplog):
    import io

    from lmlab.generate.chat import run_repl

    ckpt = load_checkpoint(trained_run)
    session = ChatSession(ckpt.model, ckpt.tokenizer, SamplingParams(max_new_tokens=3, temperature=0.0))
    out = io.StringIO()
    too_long = "the quick brown fox " * 50  # far beyond the context of 32
    with caplog.at_level("ERROR", logger="lmlab"):
        run_repl(session, io.StringIO(f"{too_long}\nbad \udcff text\nthe fox\n/exit\n"), out)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "the model's context is 32" in errors[0] and "not valid UTF-8" in errors[1]
    assert out.getvalue().count("assistant> ") == 3  # the third message is answered
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["the fox"]
