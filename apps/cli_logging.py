"""What the CLI shows of the package's logging: ``-v``/``-vv``/``--log-level`` on the group
and on every subcommand (``ondevice -v chat`` and ``ondevice chat -v`` mean the same).

Library code logs through named loggers under ``ondevice`` and never prints; this module is
the one place that decides what reaches the terminal: one handler on the ``ondevice`` logger,
writing to stderr, at WARNING unless asked otherwise (``serve`` defaults to INFO, where the
address it listens on and the requests it refuses are worth seeing).
"""

from __future__ import annotations

import logging
import sys

import click

LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "warning"

_state: dict[str, object] = {"handler": None, "explicit": None}


class _Format(logging.Formatter):
    """``ondevice.server: serving ...`` for INFO and below, the level in front otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.name}: {text}"
        return f"{record.name}: {text}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (click's test runner
    and pytest swap it), never to a stream closed since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: str) -> None:
    """Show the package's log records at ``level`` and above on stderr."""
    logger = logging.getLogger("ondevice")
    handler = _state["handler"]
    if handler is None or handler not in logger.handlers:
        handler = _Stderr()
        handler.setFormatter(_Format("%(message)s"))
        logger.addHandler(handler)
        _state["handler"] = handler
    logger.setLevel(level.upper())
    handler.setLevel(level.upper())  # type: ignore[union-attr]


def explicit_level() -> str | None:
    """The level the user asked for with -v or --log-level, if any."""
    return _state["explicit"]  # type: ignore[return-value]


def _level(verbose: int | None, log_level: str | None) -> str | None:
    if log_level:
        return log_level
    if verbose:
        return "info" if verbose == 1 else "debug"
    return None


def _on_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    # --log-level is eager (parsed first) and wins over -v wherever each was given.
    if value and not _state.get("by_name"):
        _state["explicit"] = _level(value, None)
        configure(str(_state["explicit"]))


def _on_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        _state["explicit"] = value
        _state["by_name"] = True
        configure(value)


def logging_options() -> list[click.Option]:
    """Fresh ``-v/--verbose`` and ``--log-level`` options (one set per command)."""
    return [
        click.Option(["--verbose", "-v"], count=True, expose_value=False, callback=_on_verbose,
                     help="Show more of what happens: -v info, -vv debug (logging of the "
                          "whole ondevice package, on stderr)."),
        click.Option(["--log-level"], type=click.Choice(LEVELS, case_sensitive=False),
                     default=None, expose_value=False, callback=_on_log_level,
                     # Parsed before -v, so that it wins whatever the order on the line.
                     is_eager=True,
                     help=f"Log level of the ondevice package [{DEFAULT_LEVEL}; serve: info]."),
    ]


def reset() -> None:
    """Forget an explicit level (a new command line in the same process, e.g. tests)."""
    _state["explicit"] = None
    _state["by_name"] = False
    configure(DEFAULT_LEVEL)
