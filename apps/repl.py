"""The interactive side of ``ondevice chat``: prompt, slash commands, streaming, Ctrl-C."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import click

from ..api import Chunk
from ..chat import ChatSession
from ..constraints import Constraint, ConstraintError, constraint_from_options
from ..errors import OndeviceError
from .chat_ui import make_reader, stats_table, unwrap_block

HELP = """commands:
  /help          this help
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (and reset)
  /stats         this reply's speed and time to first token, session totals, KV cache
  /json [@FILE] TEXT
                 one reply as JSON: any object, or matching the JSON schema in FILE
  /quit          leave (Ctrl-D works too)
Ctrl-C stops the current reply. A pasted block of lines is one message; to type several
lines, put them between \"\"\" lines (or press Alt+Enter for a new line). Up/Down recall
earlier messages, from this and earlier sessions."""


def _json_turn(text: str) -> tuple[Constraint, str]:
    """``/json [@SCHEMA_FILE] MESSAGE`` -> (the constraint, the message)."""
    arg = text[len("/json"):].strip()
    schema = None
    if arg.startswith("@"):
        schema, _, arg = arg[1:].partition(" ")
        arg = arg.strip()
    if not arg:
        raise ConstraintError("usage: /json [@SCHEMA_FILE] MESSAGE")
    constraint = constraint_from_options(schema) if schema else Constraint.json_object()
    assert constraint is not None
    return constraint, arg


def _structured(session: ChatSession, text: str, constraint: Constraint) -> Iterator[Chunk]:
    """One turn whose reply is constrained; the session's parameters are restored after."""
    saved = session.params
    session.params = dataclasses.replace(saved, constraint=constraint)
    try:
        yield from session.send(text)
    finally:
        session.params = saved


def run_repl(session: ChatSession) -> None:
    read = make_reader()  # prompt_toolkit: bracketed paste, """ blocks, saved history
    click.echo(f"ondevice chat with {session.model.path.name} on {session.model.backend} "
               "(/help for commands)", err=True)
    while True:
        try:
            line = read()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(/quit or Ctrl-D to leave)")
            continue
        text = unwrap_block(line).strip()  # a pasted or """ block is one message
        if not text:
            continue
        once = None  # a constraint for this turn only (/json)
        if text == "/json" or text.startswith("/json "):
            try:
                once, text = _json_turn(text)
            except OndeviceError as err:
                click.echo(f"error: {err}", err=True)
                continue
        if text.startswith("/") and once is None:
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit", "/bye"):
                return
            if cmd == "/help":
                click.echo(HELP)
            elif cmd == "/reset":
                session.reset()
                click.echo("(conversation cleared)")
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.reset()
                click.echo("(system prompt set; conversation cleared)")
            elif cmd == "/stats":
                click.echo(stats_table(session.stats()))
            else:
                click.echo(f"unknown command {cmd} (/help lists them)")
            continue
        stream = session.send(text) if once is None else _structured(session, text, once)
        try:
            for chunk in stream:
                click.echo(chunk.text, nl=False)
            click.echo()
        except KeyboardInterrupt:
            stream.close()
            click.echo("\n(stopped)")
        except OndeviceError as err:
            click.echo(f"error: {err}", err=True)
            continue
        route = getattr(session.model, "last_route", None)  # a policy-routed model
        # The CLI prints a notice the moment a reply falls back; without that hook, say so here.
        if route is not None and route.fallback_from and \
                getattr(session.model, "on_fallback", None) is None:
            click.echo(f"(this reply ran on {route.describe()})", err=True)
        if session.last.dropped_messages:
            click.echo(f"(the conversation outgrew the context: dropped the oldest "
                       f"{session.last.dropped_messages} messages)", err=True)
