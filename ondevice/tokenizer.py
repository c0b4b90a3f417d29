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

import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

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
    except RecursionError:  # json's C decoder recurses once per nesting level
        raise TokenizerError(f"cannot read {path}: JSON nested too deeply") from None
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


# Limits of one chat-template render. A template ships inside the model directory (or GGUF
# metadata), so it is input like any other: it must not hang a request, pin a server thread
# or build a string that takes the process down. Real templates use a tiny fraction of each.
RENDER_TIME_LIMIT = 5.0
"""Seconds of wall-clock time a render may take (checked at every loop iteration, call,
attribute or item access, operator and output chunk)."""
MAX_TEMPLATE_LOOP_ITERATIONS = 1_000_000
"""``{% for %}`` iterations per render, all loops together."""
MAX_TEMPLATE_OUTPUT = 32 << 20
"""Characters a render may produce, and the largest string or list it may build on the way."""
MAX_INT_BITS = 1 << 16
"""Integer arithmetic beyond this many bits is refused (CPython's big-int math cannot be
interrupted once started)."""

# String methods and filters whose int arguments are output widths.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "tojson"})
_DIGITS = re.compile(r"\d{7,}")
_BUDGET = threading.local()  # the render in progress on this thread, if any


class _RenderBudget:
    """What one render has spent: loop iterations, against a wall-clock deadline."""

    __slots__ = ("deadline", "iterations")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_TIME_LIMIT
        self.iterations = 0


@contextmanager
def _render_budget() -> Iterator[_RenderBudget]:
    budget = _RenderBudget()
    outer = getattr(_BUDGET, "current", None)
    _BUDGET.current = budget
    try:
        yield budget
    finally:
        _BUDGET.current = outer


def _limit_error(what: str) -> TokenizerError:
    return TokenizerError(f"chat template stopped: {what}")


def _tick(loop: bool = False) -> None:
    """Spend from the current render's budget; outside a render (the compiler folding
    constants) there is nothing to spend."""
    budget = getattr(_BUDGET, "current", None)
    if budget is None:
        return
    if loop:
        budget.iterations += 1
        if budget.iterations > MAX_TEMPLATE_LOOP_ITERATIONS:
            raise _limit_error(f"more than {MAX_TEMPLATE_LOOP_ITERATIONS} loop iterations")
    if time.monotonic() > budget.deadline:
        raise _limit_error(f"rendering took longer than {RENDER_TIME_LIMIT:g} s")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_width(value: object) -> None:
    if _is_int(value) and value > MAX_TEMPLATE_OUTPUT:
        raise _limit_error(f"a width of {value} exceeds {MAX_TEMPLATE_OUTPUT} characters")


def _check_format(fmt: object) -> None:
    """A ``%`` or ``str.format`` format string must not ask for a wider field than the cap."""
    if isinstance(fmt, str):
        for digits in _DIGITS.findall(fmt[: 1 << 16]):
            _check_width(int(digits))


def _check_replace(text: object, old: object, new: object) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) \
            and len(new) > len(old):
        hits = text.count(old) if old else len(text) + 1
        if len(text) + hits * (len(new) - len(old)) > MAX_TEMPLATE_OUTPUT:
            raise _limit_error(f"replace() would exceed {MAX_TEMPLATE_OUTPUT} characters")


def _check_join(separator: object, items: object) -> None:
    if isinstance(separator, str) and hasattr(items, "__len__") \
            and len(separator) * len(items) > MAX_TEMPLATE_OUTPUT:
        raise _limit_error(f"join() would exceed {MAX_TEMPLATE_OUTPUT} characters")


def _check_size(value: Any) -> Any:
    """Strings and lists a template builds stay within the output cap."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_OUTPUT:
        raise _limit_error(f"a value of {len(value)} items exceeds {MAX_TEMPLATE_OUTPUT}")
    return value


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the budget: clock checked, width arguments and result size capped."""
    # Filters marked pass_context/pass_environment/pass_eval_context get that first, then
    # the value; the arguments after the value are the filter's own.
    skip = 2 if hasattr(func, "jinja_pass_arg") else 1

    @functools.wraps(func)  # keeps jinja's pass_* marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if name in _WIDTH_FILTERS:
            for value in (*args[skip:], *kwargs.values()):
                _check_width(value)
        if name == "format" and len(args) >= skip:
            _check_format(args[skip - 1])
        if name == "replace" and len(args) >= skip + 2:
            _check_replace(*args[skip - 1: skip + 2])
        if name == "join" and len(args) >= skip + 1:
            _check_join(args[skip], args[skip - 1])
        return _check_size(func(*args, **kwargs))

    return guarded


@jinja2.pass_context
def _loop_guard(context: Any, iterable: Any) -> Iterator[Any]:
    """Wrapped around every ``{% for %}`` iterable: each iteration spends from the budget.
    (``pass_context`` also keeps the compiler from calling it while folding constants.)"""
    for item in iterable:
        _tick(loop=True)
        yield item


@jinja2.pass_context
def _size_guard(context: Any, value: Any) -> Any:
    """Wrapped around every ``~`` concatenation, which the sandbox does not intercept."""
    _tick()
    return _check_size(value)


_LOOP_GUARD = "_ondevice_loop_guard"
_SIZE_GUARD = "_ondevice_size_guard"


class _Guards(NodeTransformer):
    """Rewrites a parsed template so that ``for x in E`` iterates ``E|_loop_guard`` and
    ``a ~ b`` becomes ``(a ~ b)|_size_guard``. (A template may name these filters itself;
    that only spends more of its own budget.)"""

    @staticmethod
    def _wrap(expr: jinja2.nodes.Expr, name: str) -> jinja2.nodes.Filter:
        return jinja2.nodes.Filter(expr, name, [], [], None, None, lineno=expr.lineno)

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.For:
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, _LOOP_GUARD)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Filter:
        return self._wrap(self.generic_visit(node), _SIZE_GUARD)


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with an unsafe attribute an error at once, and bounded.

    The stock sandbox returns an Undefined for ``obj.__class__`` that only fails when it is
    used further, so ``{{ ''.__class__ }}`` would render as an empty string. A chat template
    has no business touching those attributes, so we fail loudly instead.

    Bounded: every loop iteration, call, attribute or item access, operator and filter
    spends from the render's budget (:data:`MAX_TEMPLATE_LOOP_ITERATIONS`,
    :data:`RENDER_TIME_LIMIT`), and operators, filters and string methods that would build a
    value larger than :data:`MAX_TEMPLATE_OUTPUT` are refused *before* they allocate it.
    The budget lives in a thread-local, so one compiled template renders on many threads.
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = _Guards().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        receiver = getattr(method, "__self__", None)
        if isinstance(receiver, str):
            name = getattr(method, "__name__", "")
            if name in _WIDTH_METHODS:
                for value in (*args, *kwargs.values()):
                    _check_width(value)
            elif name in ("format", "format_map"):
                _check_format(receiver)
            elif name == "replace" and len(args) >= 2:
                _check_replace(receiver, args[0], args[1])
            elif name == "join" and args:
                _check_join(receiver, args[0])
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(times) \
                        and len(seq) * times > MAX_TEMPLATE_OUTPUT:
                    raise _limit_error(f"repeating {len(seq)} items {times} times exceeds "
                                       f"{MAX_TEMPLATE_OUTPUT}")
            if _is_int(left) and _is_int(right) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _limit_error(f"an integer product beyond {MAX_INT_BITS} bits")
        elif operator == "**":
            if _is_int(left) and _is_int(right) and abs(left) > 1 and \
                    right * left.bit_length() > MAX_INT_BITS:
                raise _limit_error(f"an integer power beyond {MAX_INT_BITS} bits")
        elif operator == "%":
            _check_format(left)
        return _check_size(super().call_binop(context, operator, left, right))


def _make_environment() -> jinja2.Environment:
    env = _ChatTemplateEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_GUARD] = _loop_guard
    env.filters[_SIZE_GUARD] = _size_guard
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _render_bounded(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """``template.render(**variables)`` within the render budget and the output cap."""
    parts: list[str] = []
    size = 0
    with _render_budget():
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_TEMPLATE_OUTPUT:
                raise _limit_error(f"output longer than {MAX_TEMPLATE_OUTPUT} characters")
            _tick()
            parts.append(part)
    return "".join(parts)


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
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates, e.g. undecodable bytes read as text
            raise TokenizerError(
                f"text is not valid Unicode (lone surrogate at index {err.start}; binary input?)"
            ) from None
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
            except RecursionError:  # e.g. thousands of nested {% if %}: the parser recurses
                raise TokenizerError("invalid chat template: nested too deeply") from None
            except Exception as err:  # e.g. Python's own compiler refusing the generated code
                raise TokenizerError(
                    f"invalid chat template: {type(err).__name__}: {_one_line(err)}"
                ) from None
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
            return _render_bounded(template, variables)
        except TokenizerError:
            raise  # raise_exception() from the template: its message is the message
        except SecurityError as err:
            raise TokenizerError(
                f"chat template rejected by the sandbox: {_one_line(err)}"
            ) from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template failed: {_one_line(err)}") from None
        except RecursionError:  # a macro calling itself without end
            raise TokenizerError("chat template failed: recursion too deep") from None
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
