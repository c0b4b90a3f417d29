"""Terminal pieces of ``ondevice chat``: the line editor and the ``/stats`` table.

The line editor is prompt_toolkit's: a paste arrives as one bracketed-paste event (terminals
wrap pasted text in ``ESC[200~ ... ESC[201~``), so a pasted block of several lines is one
message, sent by the Enter that follows it. Typed multi-line messages go between ``\"\"\"``
lines (as in Ollama), or use Alt+Enter / Esc Enter for a new line. History is kept in the
ondevice home (``chat_history``), so Up recalls messages from earlier sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ondevice.chat")

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'
HISTORY_FILE = "chat_history"


def in_open_block(text: str) -> bool:
    """True while a \"\"\" block is open: the text starts one and has not closed it."""
    return text.lstrip().startswith(BLOCK) and text.count(BLOCK) % 2 == 1


def unwrap_block(text: str) -> str:
    """The message inside a \"\"\" block (``\"\"\"a\\nb\"\"\"`` -> ``a\\nb``); other text as it is."""
    stripped = text.strip()
    if stripped.startswith(BLOCK):
        stripped = stripped[len(BLOCK):]
        if stripped.rstrip().endswith(BLOCK):
            stripped = stripped.rstrip()[:-len(BLOCK)]
        return stripped.strip("\n").strip()
    return text


def history_path() -> Path:
    from ..settings import home_dir

    return home_dir() / HISTORY_FILE


def make_reader() -> Callable[[], str]:
    """A function that reads one message (raises EOFError on Ctrl-D, KeyboardInterrupt on
    Ctrl-C, like ``input()``). prompt_toolkit when it can drive this terminal, else
    ``input()`` with readline (also when the replies go to a file or a pipe: the editor
    draws on stdout)."""
    import sys

    if sys.stdout.isatty():
        try:
            return _prompt_toolkit_reader()
        except Exception as err:  # no usable terminal for prompt_toolkit (e.g. an odd TERM)
            log.info("line editor unavailable (%s); using plain input()", err)
    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass

    def read_plain() -> str:
        lines = [input(PROMPT)]
        while in_open_block("\n".join(lines)):
            lines.append(input(CONTINUATION))
        return "\n".join(lines)

    return read_plain


def _prompt_toolkit_reader() -> Callable[[], str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        history = FileHistory(str(path))
    except OSError as err:  # a read-only home: chat still works, without saved history
        log.warning("chat history not saved (%s: %s)", path, err.strerror)
        history = InMemoryHistory()

    bindings = KeyBindings()
    session: PromptSession[str] | None = None

    @Condition
    def block_open() -> bool:
        return session is not None and in_open_block(session.default_buffer.text)

    @bindings.add("enter", filter=block_open)
    def _(event) -> None:  # inside a """ block Enter starts a new line
        event.current_buffer.insert_text("\n")

    @bindings.add("escape", "enter")
    def _(event) -> None:  # Alt+Enter / Esc Enter: a new line without sending
        event.current_buffer.insert_text("\n")

    session = PromptSession(
        history=history, key_bindings=bindings, multiline=False, enable_history_search=False,
        prompt_continuation=lambda width, line, wrap: CONTINUATION.rjust(width))

    def read() -> str:
        return session.prompt(PROMPT)

    return read


# --------------------------------------------------------------------------------------------
# /stats


def _n(value: float) -> str:
    return f"{int(value):,}"


def stats_table(stats: dict) -> str:
    """``/stats`` as a short table: this reply, the session, the KV cache, each figure with
    what it counts. ``stats`` is :meth:`ondevice.chat.ChatSession.stats`."""
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append((title, ""))

    def row(label: str, value: str) -> None:
        rows.append(("  " + label, value))

    section("this reply")
    if stats.get("last_reply_ran_on"):
        row("ran on", str(stats["last_reply_ran_on"]))
    cached = stats.get("last_cached_prompt_tokens", 0)
    row("prompt", f"{_n(stats.get('last_prompt_tokens', 0))} tokens"
        + (f" ({_n(cached)} reused from the prefix cache)" if cached else ""))
    row("prefill speed", f"{stats.get('prefill_tok_per_s', 0):.1f} tok/s (prompt tokens "
                         "computed per second)")
    row("time to first token", f"{stats.get('last_ttft_s', 0):.2f} s")
    row("generated", f"{_n(stats.get('last_generated_tokens', 0))} tokens")
    row("decode speed", f"{stats.get('decode_tok_per_s', 0):.1f} tok/s (tokens per second "
                        "after the first)")

    section("session")
    row("replies", _n(stats.get("replies", 0)))
    total_cached = stats.get("total_cached_prompt_tokens", 0)
    row("prompt", f"{_n(stats.get('total_prompt_tokens', 0))} tokens"
        + (f" ({_n(total_cached)} reused)" if total_cached else ""))
    row("generated", f"{_n(stats.get('total_generated_tokens', 0))} tokens")
    row("conversation", f"{_n(stats.get('messages', 0))} messages, "
                        f"{_n(stats.get('context_tokens', 0))} of "
                        f"{_n(stats.get('context_limit', 0))} context tokens")

    if "kv_blocks_total" in stats:
        section(f"KV cache ({stats.get('backend', '')}, "
                f"{_n(stats.get('kv_block_size', 0))} tokens per block)")
        row("blocks used", f"{_n(stats['kv_blocks_used'])} of {_n(stats['kv_blocks_total'])}")
        row("blocks free", f"{_n(stats['kv_blocks_free'])} ({_n(stats.get('kv_blocks_cached_free', 0))}"
                           " of them still hold cached prefixes)")
        queries = stats.get("prefix_cache_queries", 0)
        hits = stats.get("prefix_cache_hits", 0)
        share = f" ({hits / queries:.0%})" if queries else ""
        row("prefix cache hits", f"{_n(hits)} of {_n(queries)} prompt tokens{share}")
        row("requests", f"{_n(stats.get('running', 0))} running, "
                        f"{_n(stats.get('waiting', 0))} waiting")
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}".rstrip() for label, value in rows)
