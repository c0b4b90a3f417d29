"""Importing coremltools quietly.

On Linux, ``import coremltools`` logs "Failed to load _MLModelProxy ..." warnings because the
native prediction library is macOS-only; export and verification never need it, so that
noise is kept out of the CLI. Its graph-pass progress bars are hidden the same way (the
exporter shows its own).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from functools import cache
from types import ModuleType

from ...errors import OndeviceError
from ...settings import coreml_debug


class CoreMLToolsMissingError(OndeviceError):
    """coremltools is not installed."""


@cache
def coremltools() -> ModuleType:
    """The ``coremltools`` module, imported once with its import-time warnings silenced."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import coremltools as ct
    except ImportError as err:
        raise CoreMLToolsMissingError(
            f"Core ML export needs coremltools (pip install 'coremltools>=8.0'): {err}"
        ) from None
    finally:
        logger.setLevel(level)
    return ct


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide coremltools' own progress bars and chatty warnings for the duration."""
    import warnings

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    # tqdm picks sys.stderr when a bar is created, so swapping it hides the pass pipelines'
    # bars; the exporter's own bar keeps the real stream it captured earlier.
    saved = sys.stderr
    sys.stderr = io.StringIO() if not coreml_debug() else saved
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr = saved
        logger.setLevel(level)
