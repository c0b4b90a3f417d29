"""Downloads from the Hugging Face Hub through ``huggingface_hub``.

The library does the transfer (``HF_ENDPOINT``, ``HF_TOKEN`` for gated repos,
``HF_HUB_OFFLINE``, retries that resume a dropped connection with a Range request, progress
bars); this module picks the files the runtime needs, checks every downloaded byte against
the checksums the Hub lists (sha256 for LFS files, the git blob id for the others) and turns
the library's exceptions into one-line errors.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OndeviceError
from .catalog import HubName, gguf_tag

# What a safetensors (or mlx-community quantized) checkpoint needs to load; nothing else
# (no PyTorch .bin, no ONNX, no README) is downloaded.
SAFETENSORS_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
    "chat_template.json", "special_tokens_map.json",
]
# A GGUF repo without a tag: the quantization llama.cpp's `-hf` picks too.
DEFAULT_GGUF_TAGS = ("Q4_K_M", "Q4_0", "Q8_0")


class PullError(OndeviceError):
    """A pull that failed (gated, missing, network, checksum): the store is left unchanged."""


class ChecksumError(PullError):
    """Downloaded bytes that differ from what the Hub lists."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of the others


@dataclass(frozen=True)
class RepoPlan:
    """What to download from one repo at one commit."""

    repo: str
    commit: str
    layout: str  # "gguf" or "safetensors"
    files: tuple[RemoteFile, ...]
    tag: str | None = None

    @property
    def gguf(self) -> str | None:
        return self.files[0].name if self.layout == "gguf" else None

    @property
    def bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def plan(name: HubName) -> RepoPlan:
    """Ask the Hub what ``name`` is (one metadata request) and choose the files."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name.repo, revision=name.revision, files_metadata=True)
    except Exception as err:  # noqa: BLE001 - mapped to one line or re-raised
        raise hub_error(err, name.repo, name.revision) from None
    files = {s.rfilename: RemoteFile(s.rfilename, s.size, _lfs_sha(s), s.blob_id)
             for s in info.siblings or []}
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if name.tag or (ggufs and "config.json" not in files):
        chosen = _pick_gguf(name, ggufs)
        return RepoPlan(name.repo, info.sha, "gguf", (files[chosen],), gguf_tag(chosen))
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise PullError(f"{name.repo} has neither safetensors weights with a config.json nor "
                        "GGUF files: nothing this runtime can load")
    # Top-level files only; Mistral's consolidated.safetensors repeats model.safetensors.
    wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in SAFETENSORS_FILES)
              and "/" not in f and not f.startswith("consolidated")]
    return RepoPlan(name.repo, info.sha, "safetensors", tuple(files[f] for f in sorted(wanted)))


def _lfs_sha(sibling: Any) -> str | None:
    lfs = getattr(sibling, "lfs", None)
    if lfs is None:
        return None
    return lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)


def _pick_gguf(name: HubName, ggufs: list[str]) -> str:
    if not ggufs:
        raise PullError(f"{name.repo} has no GGUF files (drop ':{name.tag}' to pull its "
                        "safetensors)")
    tags = {f: gguf_tag(f) for f in ggufs}
    # Split GGUFs (model-00001-of-00003.gguf) are not read by the converter.
    whole = [f for f in ggufs if "-of-" not in f]
    if name.tag:
        hits = [f for f in whole if (tags[f] or "").upper() == name.tag.upper()]
        if not hits:
            have = sorted({t for t in tags.values() if t})
            raise PullError(f"{name.repo} has no {name.tag} GGUF file (it has: "
                            f"{', '.join(have) or ', '.join(ggufs)})")
        return hits[0]
    for tag in DEFAULT_GGUF_TAGS:
        hits = [f for f in whole if tags[f] == tag]
        if hits:
            return hits[0]
    if len(whole) == 1:
        return whole[0]
    raise PullError(f"{name.repo} has several GGUF files: add a tag, e.g. "
                    f"{name.repo}:{next((t for t in tags.values() if t), 'Q4_K_M')}")


def download(p: RepoPlan, dest: Path, quiet: bool = False) -> Path:
    """Download the planned files into ``dest`` (files already there are not fetched again)
    and verify them. A checksum mismatch deletes the bad file and raises."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {}
    if quiet:
        kwargs["tqdm_class"] = _silent_tqdm()
    try:
        snapshot_download(p.repo, revision=p.commit, local_dir=dest,
                          allow_patterns=[f.name for f in p.files], **kwargs)
    except Exception as err:  # noqa: BLE001 - mapped to one line or re-raised
        raise hub_error(err, p.repo, p.commit) from None
    for f in p.files:
        verify(dest / f.name, f)
    return dest


def verify(path: Path, remote: RemoteFile) -> None:
    """Check a downloaded file against the Hub's size and checksum."""
    if not path.is_file():
        raise PullError(f"{remote.name} was not downloaded")
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        path.unlink()
        raise ChecksumError(f"{remote.name}: {size} bytes downloaded, the Hub lists "
                            f"{remote.size}: deleted it, pull again")
    if remote.sha256:
        algo, expected, h = "sha256", remote.sha256.lower(), hashlib.sha256()
    elif remote.blob_id:
        # A git blob id: sha1 over "blob <size>\0" and the content.
        algo, expected, h = "git sha1", remote.blob_id.lower(), hashlib.sha1()
        h.update(f"blob {size}\0".encode())
    else:
        return
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        path.unlink()
        raise ChecksumError(f"checksum mismatch for {remote.name} ({algo} {h.hexdigest()[:12]}, "
                            f"the Hub lists {expected[:12]}): deleted it, pull again")


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):  # a progress bar that never draws
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses."""
    out: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, attr in (("httpx", "TransportError"), ("httpx2", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            out.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def hub_error(err: BaseException, repo: str, revision: str | None = None) -> BaseException:
    """One line for what went wrong talking to the Hub (unknown exceptions pass through)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(err, "response", None), "status_code", None)
    offline = constants.HF_HUB_OFFLINE or isinstance(err, OfflineModeIsEnabled)
    if offline:
        return PullError(f"{repo} is not in the store and HF_HUB_OFFLINE is set: pull it while "
                         "online first")
    if isinstance(err, GatedRepoError):
        return PullError(f"{repo} is gated ({status or 401}): accept its licence on the Hub, then "
                         "set HF_TOKEN to a token of that account")
    if isinstance(err, RevisionNotFoundError):
        return PullError(f"{repo} has no revision {revision!r} (404)")
    if isinstance(err, RepositoryNotFoundError):
        return PullError(f"{repo}: no such model on the Hub ({status or 404}; a private repo "
                         "needs HF_TOKEN)")
    if isinstance(err, LocalEntryNotFoundError | EntryNotFoundError):
        cause = err.__cause__ or err.__context__
        if cause is not None and not isinstance(cause, LocalEntryNotFoundError):
            return hub_error(cause, repo, revision)
        return PullError(f"cannot reach the Hub to pull {repo} (network error); run the same "
                         "command again to resume")
    if isinstance(err, HfHubHTTPError):
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return PullError(f"the Hub refused {repo}: {line}")
    if isinstance(err, _network_errors()) or (isinstance(err, OSError) and err.errno is None):
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        return PullError(f"network error while pulling {repo} ({detail}); run the same command "
                         "again to resume")
    return err
