"""Tokenizer, chat templates and streaming detokenization for a Hugging Face model directory.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from ``tokenizer.json`` and reads the special
tokens and chat template the way ``transformers`` does (``tokenizer_config.json``,
``chat_template.jinja``, ``generation_config.json``). Chat templates run in Jinja's immutable
sandbox with the globals and filters Hugging Face templates rely on; anything that goes wrong
while compiling or rendering one is reported as a one-line `TokenizerError`.

`IncrementalDetokenizer` turns generated token ids into text deltas that are safe to stream:
it never emits half of a UTF-8 character and never emits a stop string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ondevice.errors import TokenizerError

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
"""Chat end-of-turn markers (ChatML, Llama 3, Phi-3, Gemma) that also end generation when the
vocabulary has them as added tokens, even if the model's config lists only the base EOS."""

_REPLACEMENT_CHAR = "\ufffd"


def _one_line(text: object) -> str:
    """Collapse a message to one line: the CLI prints errors on a single line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Config file helpers


def _read_json(path: Path) -> dict[str, Any] | None:
    """Parse an optional JSON object file; None if it does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"cannot read {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"cannot read {path}: expected a JSON object")
    return data


def _token_content(value: object, field: str, path: Path) -> str | None:
    """A special token from tokenizer_config: a string or a serialized AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {field} must be a string or a dict with 'content'")


def _pick_chat_template(value: object, path: Path) -> str | None:
    """tokenizer_config's chat_template: a string, or HF's list of {name, template} dicts."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for item in value:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerError(
                    f"{path}: chat_template list entries must be {{name, template}} strings"
                )
            named[item["name"]] = item["template"]
        # Only the "default" template is used; others (e.g. "tool_use", "rag") are opt-in in
        # transformers and have no caller here.
        return named.get("default")
    raise TokenizerError(f"{path}: chat_template must be a string or a list of templates")


# --------------------------------------------------------------------------------------------
# Chat template environment


def _raise_exception(message: object) -> None:
    raise TokenizerError(_one_line(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ' (it is meant for <script> tags);
    # chat templates need the plain JSON that transformers produces.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant spans with it
    (for training masks). Rendering only needs the body, so the tag is transparent here."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute is an error at once.

    The stock sandbox returns an Undefined for ``obj.__class__`` that only fails when it is
    used further, so ``{{ ''.__class__ }}`` would render as an empty string. A chat template
    has no business touching those attributes, so we fail loudly instead.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _make_environment() -> jinja2.Environment:
    env = _ChatTemplateEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _validate_messages(messages: object) -> list[Mapping[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise TokenizerError(f"messages[{i}] needs a string {key!r}")
    return list(messages)


# --------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of a model.

    Build it with `Tokenizer.from_dir` for a model directory, or directly from a loaded
    `tokenizers.Tokenizer` and already-parsed settings.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        extra_special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        """Wrap ``backend``.

        Args:
            backend: The loaded fast tokenizer.
            chat_template: Jinja chat template source, or None if the model has none.
            bos_token: BOS token text (available to templates as ``bos_token``).
            eos_token: EOS token text (``eos_token`` in templates; its id ends generation).
            eos_token_ids: Further ids that end generation (generation_config's).
            add_bos_token: Prepend BOS in ``encode(add_special_tokens=True)`` if the
                tokenizer's post-processor does not already do it.
            extra_special_tokens: Other special tokens exposed to templates by name
                (e.g. ``{"pad_token": "<pad>"}``), as transformers does.
        """
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self._template_vars = dict(extra_special_tokens or {})
        self._compiled: jinja2.Template | None = None

        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None

        eos = {int(i) for i in eos_token_ids}
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        # End-of-turn markers: chat models stop on them even when generation_config only lists
        # the pretraining EOS (e.g. an instruct model whose eos is <|endoftext|>). Only added
        # tokens count: a plain vocabulary entry spelled the same is ordinary text. The bare
        # <|endoftext|> is deliberately not in the list: in ChatML models it can be a document
        # separator, so it ends generation only when the config says it is the EOS.
        added = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items()}
        eos.update(added[name] for name in END_OF_TURN_TOKENS if name in added)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of a Hugging Face-layout model directory.

        Reads ``tokenizer.json`` (required) and, when present, ``tokenizer_config.json``,
        ``chat_template.jinja`` (preferred over the config's template, as in transformers)
        and ``generation_config.json``.

        Raises:
            TokenizerError: A required file is missing, or any of them cannot be parsed.
        """
        root = Path(path)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"tokenizer file not found: {tok_path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as err:  # tokenizers raises a bare Exception for parse errors
            raise TokenizerError(f"cannot load {tok_path}: {_one_line(err)}") from None

        cfg_path = root / "tokenizer_config.json"
        cfg = _read_json(cfg_path) or {}
        chat_template = _pick_chat_template(cfg.get("chat_template"), cfg_path)
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                chat_template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise TokenizerError(f"cannot read {jinja_path}: {_one_line(err)}") from None

        bos_token = _token_content(cfg.get("bos_token"), "bos_token", cfg_path)
        eos_token = _token_content(cfg.get("eos_token"), "eos_token", cfg_path)
        extra = {}
        for name in ("pad_token", "unk_token"):
            content = _token_content(cfg.get(name), name, cfg_path)
            if content is not None:
                extra[name] = content
        add_bos = cfg.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{cfg_path}: add_bos_token must be true or false")

        gen_path = root / "generation_config.json"
        gen = _read_json(gen_path) or {}
        eos_ids = gen.get("eos_token_id")
        if eos_ids is None:
            eos_ids = []
        elif isinstance(eos_ids, int) and not isinstance(eos_ids, bool):
            eos_ids = [eos_ids]
        if not (
            isinstance(eos_ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids)
        ):
            raise TokenizerError(f"{gen_path}: eos_token_id must be an integer or a list of them")

        return cls(
            backend,
            chat_template=chat_template,
            bos_token=bos_token,
            eos_token=eos_token,
            eos_token_ids=eos_ids,
            add_bos_token=add_bos,
            extra_special_tokens=extra,
        )

    # ---------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token's text form, or None if the vocabulary has no such token."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Text form of a token id (as stored in the vocabulary), or None if unknown."""
        return self.backend.id_to_token(int(token_id))

    # -------------------------------------------------------------------------- encode/decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        Special tokens written in the text (e.g. ``<|im_end|>``) are recognized, as in
        transformers. ``add_special_tokens`` runs the tokenizer's post-processor (e.g. BOS)
        and, if the config asks for ``add_bos_token`` and the post-processor did not add it,
        prepends BOS.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as err:
            raise TokenizerError(f"cannot encode text: {_one_line(err)}") from None
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids.

        Ids the vocabulary does not contain decode to nothing (the `tokenizers` behavior; a
        model's embedding table is often padded past the tokenizer's vocabulary).
        """
        try:
            return self.backend.decode(
                [int(i) for i in ids], skip_special_tokens=skip_special_tokens
            )
        except Exception as err:  # negative ids raise OverflowError, bad types TypeError
            raise TokenizerError(f"cannot decode token ids: {_one_line(err)}") from None

    # ------------------------------------------------------------------------- chat template

    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template; pass a raw prompt or provide chat_template.jinja"
            )
        if self._compiled is None:
            try:
                self._compiled = _make_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as err:
                raise TokenizerError(
                    f"invalid chat template (line {err.lineno}): {_one_line(err.message)}"
                ) from None
            except jinja2.TemplateError as err:
                raise TokenizerError(f"invalid chat template: {_one_line(err)}") from None
        return self._compiled

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template, like transformers does.

        Args:
            messages: ``[{"role": str, "content": str}, ...]``; other keys are passed through.
            add_generation_prompt: Append the header that starts the assistant's turn.
            **extra: Further template variables (``tools``, ``documents``, ...).

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``,
        ``eos_token`` (and ``pad_token``/``unk_token`` when configured), ``**extra``, the
        ``raise_exception`` and ``strftime_now`` globals and a ``tojson`` filter.

        Raises:
            TokenizerError: No chat template, invalid messages, an invalid template, a
                template that raises or fails, or one that tries to leave the sandbox.
        """
        template = self._template()
        variables: dict[str, Any] = dict(self._template_vars)
        # Unset tokens are left undefined (rendering as ""), not None (rendering as "None").
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(extra)
        variables["messages"] = _validate_messages(messages)
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return template.render(**variables)
        except TokenizerError:
            raise  # raise_exception() from the template: its message is the message
        except SecurityError as err:
            raise TokenizerError(
                f"chat template rejected by the sandbox: {_one_line(err)}"
            ) from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template failed: {_one_line(err)}") from None
        except Exception as err:  # e.g. TypeError from `1 + 'a'` inside the template
            raise TokenizerError(
                f"chat template failed: {type(err).__name__}: {_one_line(err)}"
            ) from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> list[int]:
        """Render ``messages`` with the chat template and encode the result.

        Encodes without adding special tokens: the template already writes BOS where the model
        wants it (transformers' ``apply_chat_template(tokenize=True)`` does the same).
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------
# Streaming detokenization


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas that are safe to show.

    Each `add` decodes a small window of recent tokens rather than the whole output: the window
    starts a little before the text that is new, so that decoders which depend on context
    (SentencePiece's leading-space rule, byte-level BPE characters split over tokens) render the
    new text exactly as a full decode would, and the new text is the window's decode minus the
    decode of its already-emitted head. While the window's text ends in U+FFFD (an incomplete
    UTF-8 sequence) nothing is emitted: the next tokens complete it.

    Stop strings: any tail that could be the start of a stop string is held back until it is
    clear. When one completes, only the text before it is returned, `stopped` becomes True and
    `stop_reason` is that stop string; nothing after it is ever emitted and later `add` calls
    return "".

    Attributes:
        stopped: A stop string was found.
        stop_reason: The stop string found, or None.
        output_ids: The generated token ids added so far.
    """

    # Prompt tokens kept as left context, so that the first generated token is decoded the way
    # it reads after the prompt (a SentencePiece "▁word" keeps its space).
    _PROMPT_CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
        stop: Sequence[str] = (),
    ) -> None:
        """Start a stream.

        Args:
            tokenizer: The model's tokenizer.
            prompt_ids: The prompt's token ids (only the last few are used, as context).
            skip_special_tokens: Leave special tokens (e.g. ``<|im_end|>``) out of the text.
            stop: Stop strings; empty strings are ignored.
        """
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: tuple[str, ...] = tuple(
            s for s in ([stop] if isinstance(stop, str) else stop) if s
        )
        self.stopped = False
        self.stop_reason: str | None = None
        self.output_ids: list[int] = []

        context = list(prompt_ids or ())[-self._PROMPT_CONTEXT :]
        self._ids: list[int] = [int(i) for i in context]
        # _ids[_prefix:_read] is context whose text was already accounted for; the text of
        # _ids[_read:] has not been emitted yet.
        self._prefix = 0
        self._read = len(self._ids)
        self._pending = ""  # decoded but held back (possible start of a stop string)
        self._emitted: list[str] = []
        self._max_stop = max((len(s) for s in self.stop), default=0)

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        return "".join(self._emitted)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self, final: bool) -> str:
        """Text of the tokens past ``_read``; "" while it would end in a partial character."""
        if self._read >= len(self._ids):
            return ""
        head = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if not final and full.endswith(_REPLACEMENT_CHAR):
            return ""
        if len(full) <= len(head):
            # e.g. a skipped special token: nothing new; keep the window where it is.
            if final:
                self._read = len(self._ids)
            return ""
        self._prefix = self._read
        self._read = len(self._ids)
        return full[len(head) :]

    def _release(self, new: str, final: bool) -> str:
        """Apply stop strings to freshly decoded text; return what may be emitted now."""
        text = self._pending + new
        if not self.stop:
            self._pending = ""
            out = text
        else:
            hit = min(
                ((text.find(s), i) for i, s in enumerate(self.stop) if s in text),
                default=None,
            )
            if hit is not None:
                pos, which = hit
                out = text[:pos]
                self._pending = ""
                self.stopped = True
                self.stop_reason = self.stop[which]
            else:
                hold = 0 if final else self._held_length(text)
                out = text[: len(text) - hold]
                self._pending = text[len(text) - hold :]
        if out:
            self._emitted.append(out)
        return out

    def _held_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to emit (maybe "")."""
        if self.stopped:
            return ""
        token_id = int(token_id)
        self.output_ids.append(token_id)
        self._ids.append(token_id)
        return self._release(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """End of generation (for a reason other than a stop string): return the rest.

        This includes held-back text and tokens still waiting to complete a character (which
        then decode with U+FFFD, as a full decode of the output would).
        """
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)
