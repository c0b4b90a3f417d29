"""``ondevice chat`` in a real pseudo-terminal (the CLI as a child process on the tiny model):
a bracketed paste of several lines is one message, \"\"\" blocks, history across restarts,
the /stats table; Ctrl-C and Ctrl-D keep their meaning."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "ondevice"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


class Terminal:
    """The parent side of the pseudo-terminal: write keys, read what is shown (escape
    sequences removed) up to a pattern, keeping the rest for the next read."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, pattern: bytes, timeout: float = 60.0) -> bytes:
        regex = re.compile(pattern, re.S)
        end = time.monotonic() + timeout
        while True:
            text = ANSI.sub(b"", self.buffer)
            m = regex.search(text)
            if m:
                # Keep what follows the match (in raw form: drop what was consumed).
                self.buffer = text[m.end():]
                return text[:m.end()]
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {text[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat ended; waiting for {pattern!r}: "
                                         f"{text[-800:]!r}")
                self.buffer += chunk


@contextlib.contextmanager
def _chat(model_dir: Path, home: Path, *extra: str):
    """The real CLI on a pseudo-terminal with its own ondevice home; yields (pid, fd)."""
    env = dict(os.environ, ONDEVICE_HOME=str(home), TERM="xterm",
               # Nobody answers prompt_toolkit's cursor-position queries on this terminal.
               PROMPT_TOOLKIT_NO_CPR="1")
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(sys.executable, CLI + ["chat", "-m", str(model_dir), "-b", "numpy", "-n", "3",
                                         "--temperature", "0", *extra], env)
    term = Terminal(fd)
    try:
        term.expect(rb"\r?\n>>>")
        yield pid, term
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def _stats(term: Terminal) -> dict[str, str]:
    """Send /stats at the prompt and parse the table into {"section/label": value}."""
    term.write(b"/stats\r")
    out = term.expect(rb"\n  requests [^\n]*waiting\r?\n>>>").decode("utf-8", "replace")
    out = out[out.rindex("this reply"):]
    rows = {}
    section = ""
    for line in out.splitlines():
        line = line.rstrip("\r")
        if line and not line.startswith(" "):
            section = line.split(" (")[0].strip()
        m = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if m:
            rows[f"{section}/{m.group(1)}"] = m.group(2)
    return rows


def _send(term: Terminal, data: bytes) -> bytes:
    """Type ``data`` (ending with Enter) and wait for the reply and the next prompt."""
    term.write(data)
    return term.expect(rb"\r?\n>>>")


def _quit(pid: int, term: Terminal) -> None:
    term.write(b"/quit\r")
    _exited(pid, term)


def _exited(pid: int, term: Terminal, timeout: float = 30.0) -> None:
    """Wait for the chat to end by itself, with exit code 0."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        if time.monotonic() > end:
            raise AssertionError(f"the chat did not exit; it shows {term.buffer[-500:]!r}")
        # Keep reading: a child blocked on a full terminal buffer would never exit.
        ready, _, _ = select.select([term.fd], [], [], 0.05)
        if ready:
            with contextlib.suppress(OSError):
                term.buffer += os.read(term.fd, 4096)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def test_bracketed_paste_of_four_lines_is_one_message(tiny_model_dir, home):
    block = b"Summarize this list:\r- apples\r- pears\r- plums"
    with _chat(tiny_model_dir, home) as (pid, term):
        _send(term, b"\x1b[200~" + block + b"\x1b[201~" + b"\r")
        stats = _stats(term)
        assert stats["session/replies"] == "1", stats
        assert stats["session/conversation"].startswith("2 messages"), stats
        _quit(pid, term)
    # The history keeps it as one entry of four lines.
    entries = _history(home)
    assert entries == ["Summarize this list:\n- apples\n- pears\n- plums", "/stats", "/quit"]


def test_triple_quote_block_is_one_message(tiny_model_dir, home):
    with _chat(tiny_model_dir, home) as (pid, term):
        term.write(b'"""\rfirst line\rsecond line\r')
        term.expect(b"second line")  # still composing: Enter inside the block is a newline
        _send(term, b'"""\r')
        stats = _stats(term)
        assert stats["session/replies"] == "1", stats
        assert stats["session/conversation"].startswith("2 messages"), stats
        with_quotes = int(stats["this reply/prompt"].split()[0])
        _send(term, b"/reset\r")
        # The same two lines pasted: the same prompt (the quotes are not part of the message).
        _send(term, b"\x1b[200~first line\rsecond line\x1b[201~\r")
        stats = _stats(term)
        assert stats["session/replies"] == "2", stats
        assert int(stats["this reply/prompt"].split()[0]) == with_quotes
        _quit(pid, term)
    assert _history(home)[0] == '"""\nfirst line\nsecond line\n"""'


def _history(home: Path) -> list[str]:
    """prompt_toolkit's FileHistory: '# timestamp' then '+'-prefixed lines per entry."""
    entries: list[list[str]] = []
    for line in (home / "chat_history").read_text().splitlines():
        if line.startswith("#"):
            entries.append([])
        elif line.startswith("+") and entries:
            entries[-1].append(line[1:])
    return ["\n".join(e) for e in entries]


def test_history_survives_a_restart(tiny_model_dir, home):
    with _chat(tiny_model_dir, home) as (pid, term):
        _send(term, b"remember this question\r")
        _quit(pid, term)
    assert "remember this question" in _history(home)
    with _chat(tiny_model_dir, home) as (pid, term):
        term.write(b"\x1b[A\x1b[A")  # Up twice: /quit, then the question
        term.expect(b"remember this question")
        _send(term, b"\r")
        assert _stats(term)["session/replies"] == "1"
        _quit(pid, term)


def test_stats_table_is_labelled(tiny_model_dir, home):
    with _chat(tiny_model_dir, home) as (pid, term):
        _send(term, b"Hello\r")
        stats = _stats(term)
        for key in ("this reply/prompt", "this reply/prefill speed",
                    "this reply/time to first token", "this reply/generated",
                    "this reply/decode speed", "session/replies", "session/prompt",
                    "session/generated", "KV cache/blocks used", "KV cache/blocks free",
                    "KV cache/prefix cache hits"):
            assert key in stats, (key, stats)
        assert stats["this reply/decode speed"].endswith("(tokens per second after the first)")
        assert re.fullmatch(r"\d+\.\d\d s", stats["this reply/time to first token"])
        assert re.fullmatch(r"0 of [\d,]+", stats["KV cache/blocks used"])
        _quit(pid, term)


def test_ctrl_c_at_the_prompt_and_ctrl_d(tiny_model_dir, home):
    with _chat(tiny_model_dir, home) as (pid, term):
        term.write(b"half a message\x03")
        term.expect(rb"/quit or Ctrl-D[^\n]*\r?\n>>>")
        term.write(b"\x04")  # Ctrl-D on an empty line leaves
        _exited(pid, term)


def test_help_stats_reset_and_system_prompt(tiny_model_dir, home):
    with _chat(tiny_model_dir, home, "--system", "be brief") as (pid, term):
        out = _send(term, b"/help\r")
        assert b"/reset" in out and b'"""' in out and b"Alt+Enter" in out
        _send(term, b"Hello\r")
        stats = _stats(term)
        assert stats["session/conversation"].startswith("2 messages")
        assert b"cleared" in _send(term, b"/reset\r")
        _quit(pid, term)


def test_ctrl_c_stops_the_reply_not_the_program(tiny_model_dir, home):
    with _chat(tiny_model_dir, home, "-n", "900") as (pid, term):
        term.write(b"Tell me a long story\r")
        term.expect(rb"story\r*\n.")  # the reply has started streaming
        term.write(b"\x03")  # Ctrl-C
        term.expect(rb"\(stopped\)\r?\n>>>")
        stats = _stats(term)
        assert re.fullmatch(r"0 of [\d,]+", stats["KV cache/blocks used"]), stats
        assert stats["KV cache/requests"].startswith("0 running"), stats
        assert stats["session/replies"] == "1"
        _quit(pid, term)


def test_replies_to_a_file_from_a_terminal_use_plain_input(tiny_model_dir, home, tmp_path):
    """stdin a terminal, stdout a file: no line editor drawing into the file, and a \"\"\" block
    still works with plain input()."""
    out_path = tmp_path / "replies.txt"
    env = dict(os.environ, ONDEVICE_HOME=str(home), TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:  # child
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.execve(sys.executable, CLI + ["chat", "-m", str(tiny_model_dir), "-b", "numpy",
                                         "-n", "3", "--temperature", "0"], env)
    term = Terminal(fd)
    try:
        term.expect(b"/help for commands")
        term.write(b'"""\rtwo\rlines\r"""\r/stats\r/quit\r')
        _exited(pid, term)
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out_path.read_text()
    assert "\x1b[" not in text  # no terminal drawing in the file
    assert re.search(r"  replies\s+1\n", text), text
