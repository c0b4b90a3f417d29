"""The model store on disk: one directory per model and storage format under
``<ondevice home>/store``, each with a manifest saying what it is and where it came from.

An entry appears only complete: it is assembled in ``store/.partial/`` and renamed into place
in one step, so an interrupted pull never leaves a half-written model that ``list`` shows or
``load`` opens. A process that serves a model holds a pid file in ``store/.locks/<entry>/``,
which ``rm`` honours.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OndeviceError
from ..settings import home_dir

MANIFEST = "ondevice-store.json"
PARTIAL = ".partial"
LOCKS = ".locks"


class StoreError(OndeviceError):
    """A store operation that cannot be done (unknown name, model in use, ...)."""


def store_root() -> Path:
    """Where the store lives: ``<ondevice home>/store``."""
    return home_dir() / "store"


def dir_name(name: str) -> str:
    """A file-system-safe directory name for an entry name (``:`` and ``/`` are not)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"


def source_key(source: dict[str, Any]) -> tuple:
    """What makes two sources the same download (a second pull of it is not a second copy)."""
    kind = source.get("kind")
    if kind == "hub":
        return ("hub", source["repo"].lower(), (source.get("file") or "").lower())
    if kind == "package":
        return ("package", source["package"])
    if kind == "file":
        return ("file", source["path"], source.get("size"), source.get("mtime"))
    return (kind, json.dumps(source, sort_keys=True))


@dataclass
class Entry:
    """One stored model: its directory and manifest."""

    name: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest.get("source", {})

    @property
    def size(self) -> int:
        """Bytes on disk (the manifest included)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    def origin(self) -> str:
        """Where it came from, in one short phrase."""
        s = self.source
        if s.get("kind") == "hub":
            what = s["repo"] + (f" {s['file']}" if s.get("file") else "")
            rev = s.get("commit", "")[:8]
            return f"hf:{what}" + (f"@{rev}" if rev else "")
        if s.get("kind") == "package":
            return f"pypi:{s['package']}" + (f"=={s['version']}" if s.get("version") else "")
        if s.get("kind") == "file":
            return f"file:{s['path']}"
        return str(s.get("kind", "?"))

    def summary(self) -> dict[str, Any]:
        """The row ``ondevice list`` shows (and ``list --json`` prints)."""
        m = self.manifest
        return {
            "name": self.name, "family": m.get("family"), "parameters": m.get("parameters"),
            "format": m.get("format"), "quantization": m.get("quantization"),
            "size_bytes": self.size, "context_length": m.get("context_length"),
            "source": self.origin(), "licence": m.get("licence"), "created": m.get("created"),
            "path": str(self.path),
        }


class Store:
    """The entries under ``root`` (default: ``<ondevice home>/store``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else store_root()

    # -- reading ---------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            try:
                manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a damaged manifest: not an entry `list` can vouch for
            if isinstance(manifest, dict) and isinstance(manifest.get("name"), str):
                out.append(Entry(manifest["name"], d, manifest))
        return out

    def get(self, name: str) -> Entry | None:
        for e in self.entries():
            if e.name == name or e.name.lower() == name.lower():
                return e
        return None

    def find(self, source: dict[str, Any]) -> Entry | None:
        """The entry pulled from ``source`` (same repo and file, same package, same file)."""
        key = source_key(source)
        return next((e for e in self.entries() if source_key(e.source) == key), None)

    def entry_of(self, path: str | os.PathLike) -> Entry | None:
        """The entry whose directory is ``path``, if it is one."""
        try:
            p = Path(path).resolve()
        except OSError:
            return None
        if p.parent != self.root.resolve() or not (p / MANIFEST).is_file():
            return None
        return next((e for e in self.entries() if e.path.resolve() == p), None)

    # -- writing ---------------------------------------------------------------------------
    def staging(self, key: str) -> Path:
        """A work directory for one pull, outside the entries (kept for a resumed pull)."""
        path = self.root / PARTIAL / dir_name(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def install(self, built: Path, name: str, manifest: dict[str, Any]) -> Entry:
        """Make the complete model directory ``built`` the entry ``name`` in one rename.

        An entry of that name is replaced (a newer revision of the same source); a model
        directory is never half there.
        """
        manifest = {"name": name, "created": int(time.time()), **manifest}
        manifest.update(describe_model_dir(built))
        (built / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
        dest = self.root / dir_name(name)
        old = None
        if dest.exists():
            other = self.entry_of(dest)
            if other is not None and other.name != name:
                raise StoreError(f"store directory {dest} already holds {other.name!r}")
            if other is not None:
                self.check_unused(other)
            old = self.root / PARTIAL / f"{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(built, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Entry(name, dest, manifest)

    def remove(self, entry: Entry) -> int:
        """Delete an entry (refused while a running process holds it); returns bytes freed."""
        self.check_unused(entry)
        size = entry.size
        # Renamed away first so that a reader never sees a directory losing its files.
        trash = self.root / PARTIAL / f"{entry.path.name}.rm-{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.root / LOCKS / entry.path.name, ignore_errors=True)
        return size

    def clean_partial(self) -> int:
        """Delete unfinished pulls; returns bytes freed."""
        part = self.root / PARTIAL
        if not part.is_dir():
            return 0
        size = sum(p.stat().st_size for p in part.rglob("*") if p.is_file())
        shutil.rmtree(part, ignore_errors=True)
        return size

    # -- in use ------------------------------------------------------------------------------
    def users(self, entry: Entry) -> list[int]:
        """Ids of the running processes that hold ``entry`` (stale pid files are dropped)."""
        lock_dir = self.root / LOCKS / entry.path.name
        if not lock_dir.is_dir():
            return []
        pids = []
        for f in lock_dir.iterdir():
            if f.name.isdigit() and _alive(int(f.name), f):
                pids.append(int(f.name))
            else:  # its process is gone (a killed server cannot clean up after itself)
                f.unlink(missing_ok=True)
        return sorted(pids)

    def check_unused(self, entry: Entry) -> None:
        pids = self.users(entry)
        if pids:
            raise StoreError(f"{entry.name} is in use by a running process (pid "
                             f"{', '.join(map(str, pids))}, e.g. `ondevice serve`): stop it first")

    @contextlib.contextmanager
    def hold(self, path: str | os.PathLike) -> Iterator[Entry | None]:
        """While inside, the entry at ``path`` (if ``path`` is one) counts as in use."""
        entry = self.entry_of(path)
        if entry is None:
            yield None
            return
        lock = self.root / LOCKS / entry.path.name / str(os.getpid())
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(f"{entry.name}\n{_started(os.getpid())}\n")
        try:
            yield entry
        finally:
            lock.unlink(missing_ok=True)


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int, lock: Path) -> bool:
    """Whether the process that wrote ``lock`` still runs (not a later one with its pid)."""
    started = _started(pid)
    if started is None:
        return False
    try:
        recorded = float(lock.read_text().split("\n")[1])
    except (OSError, IndexError, ValueError):
        return True  # cannot tell: err on the side of keeping the model
    return abs(recorded - started) < 1.0


def describe_model_dir(path: Path) -> dict[str, Any]:
    """Family, parameters, quantization and context length of a model directory."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"family": config.get("model_type")}
    q = config.get("quantization")
    if isinstance(q, dict) and "bits" in q:
        out["quantization"] = f"{q['bits']}-bit, group {q.get('group_size', 64)}"
    else:
        out["quantization"] = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(
            str(config.get("torch_dtype")), "f32")
    try:
        from ..config import ModelConfig
        from ..models.llama import weight_specs

        mc = ModelConfig.from_dict(config)
        params = sum(math.prod(s.shape) for s in weight_specs(mc).values())
        out["parameters"] = _count(params)
        out["context_length"] = mc.context_length
    except OndeviceError:
        out["context_length"] = config.get("max_position_embeddings")
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
