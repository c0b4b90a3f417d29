"""The OpenAI wire format: request parsing, error bodies and response/chunk builders.

Nothing here touches HTTP or the engine. Parsing turns a decoded JSON body into frozen
dataclasses and raises :class:`APIError` (status 400, naming the offending parameter) for
anything malformed, so that bad input never reaches the engine as an exception it would
report as a server error.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constraints import Constraint, ConstraintError
from ..errors import SamplingError
from ..sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16
"""Most completions one request may ask for (``n``); each is a sequence in the batch."""

MAX_PROMPTS = 64
"""Most prompts one ``/v1/completions`` request may batch."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for ``/v1/completions``. Chat defaults to the rest of the
context instead, as OpenAI does."""

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# --------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error to return to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _show(value: object) -> str:
    # Enough of the value to recognize it, never a whole (possibly huge) prompt.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# Field readers: each returns the default for a missing or null field (clients send explicit
# nulls for unset options) and raises a 400 naming the field for a value of the wrong type.


def _int(body: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 16.0 from a client that only has floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer, got {_show(value)}")
    return value


def _number(body: Mapping[str, Any], name: str, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"'{name}' must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a finite number, got {_show(value)}")
    return float(value)


OPENAI_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
"""OpenAI's documented ranges. The engine accepts wider ones (any temperature >= 0); over
HTTP a client written against OpenAI gets the same 400 it would get there."""


def _ranged(body: Mapping[str, Any], name: str, default: float) -> float:
    value = _number(body, name, default)
    assert value is not None
    lo, hi = OPENAI_RANGES[name]
    if not lo <= value <= hi:
        raise invalid(name, f"'{name}' must be between {lo:g} and {hi:g}, got {_show(value)}")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {_show(value)}")
    return value


def _str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string, got {_show(value)}")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {_show(value)}")
    return tuple(value)


def _unsupported(body: Mapping[str, Any], name: str, what: str) -> None:
    raise invalid(name, f"'{name}' is not supported by this server ({what})")


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class GenerationOptions:
    """The options both endpoints share, type-checked but not yet range-checked (that is
    :class:`SamplingParams`' job, see :meth:`sampling_params`)."""

    model: str | None
    max_tokens: int | None
    max_tokens_param: str  # "max_tokens" or "max_completion_tokens": which one the client sent
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None  # top-N alternatives, or None for no logprobs
    logprobs_param: str  # the client's name for it: "top_logprobs" (chat) or "logprobs"
    stream: bool
    include_usage: bool
    # Extensions many local servers accept (vLLM, llama.cpp), e.g. through openai's extra_body.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None  # from response_format (or a forced tool call)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters; an invalid value raises a 400 that names the field the
        way the client spelled it."""
        try:
            return SamplingParams(
                max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
                logprobs=self.logprobs, n=self.n, logit_bias=self.logit_bias,
                constraint=self.constraint,
            )
        except SamplingError as err:
            # The error names its field; report it the way the client spelled it.
            name = err.field
            renamed = {"max_tokens": self.max_tokens_param, "logprobs": self.logprobs_param}
            param = renamed.get(name, name) if name is not None else None
            message = str(err)
            if name is not None and param != name and message.startswith(name):
                message = param + message[len(name):]
            raise invalid(param, message) from None


def _options(body: Mapping[str, Any], *, chat: bool) -> GenerationOptions:
    model = _str(body, "model")
    max_tokens, max_param = _int(body, "max_tokens"), "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        # The newer name wins: OpenAI deprecated max_tokens for chat in its favour.
        max_tokens, max_param = _int(body, "max_completion_tokens"), "max_completion_tokens"

    n = _int(body, "n", 1)
    assert n is not None
    if n > MAX_N:
        raise invalid("n", f"'n' must be at most {MAX_N}, got {n}")

    if chat:
        wants = _bool(body, "logprobs")
        top = _int(body, "top_logprobs")
        if top is not None and not wants:
            raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")
        logprobs = (top or 0) if wants else None
        logprobs_param = "top_logprobs"
    else:
        logprobs = _int(body, "logprobs")
        logprobs_param = "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(logprobs_param,
                      f"'{logprobs_param}' must be in [0, {MAX_LOGPROBS}], got {logprobs}")

    stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise invalid("stream_options", "'stream_options' must be an object")
        include_usage = _bool(stream_options, "include_usage")

    return GenerationOptions(
        model=model, max_tokens=max_tokens, max_tokens_param=max_param,
        temperature=_ranged(body, "temperature", 1.0), top_p=_ranged(body, "top_p", 1.0),
        n=n, stop=_stop(body), seed=_int(body, "seed"),
        presence_penalty=_ranged(body, "presence_penalty", 0.0),
        frequency_penalty=_ranged(body, "frequency_penalty", 0.0),
        logprobs=logprobs, logprobs_param=logprobs_param, stream=stream,
        include_usage=include_usage, top_k=_int(body, "top_k", 0),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        ignore_eos=_bool(body, "ignore_eos"),
        logit_bias=_logit_bias(body), constraint=_response_format(body),
    )


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` (range-checked here; the vocabulary at submission)."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias", "'logit_bias' must map token ids to numbers")
    try:
        return SamplingParams(logit_bias=value).logit_bias
    except SamplingError as err:
        raise invalid("logit_bias", str(err)) from None


EXTRA_CONSTRAINTS = {"json_schema": Constraint.json_schema, "guided_json": Constraint.json_schema,
                     "regex": Constraint.regex, "guided_regex": Constraint.regex,
                     "grammar": Constraint.grammar, "guided_grammar": Constraint.grammar}
"""Constraint fields other servers take beside ``response_format`` (llama-server's
``json_schema``/``grammar``, vLLM's ``guided_*``), e.g. through openai's ``extra_body``."""


def _response_format(body: Mapping[str, Any]) -> Constraint | None:
    given = [k for k in ("response_format", *EXTRA_CONSTRAINTS) if body.get(k) is not None]
    if not given:
        return None
    name = given[0]
    if len(given) > 1:
        raise invalid(given[1], f"'{given[0]}' and '{given[1]}' both constrain the reply; "
                                f"send one")
    try:
        if name == "response_format":
            return Constraint.from_response_format(body[name])
        value = body[name]
        if name in ("regex", "guided_regex", "grammar", "guided_grammar") \
                and not isinstance(value, str):
            raise invalid(name, f"'{name}' must be a string")
        return EXTRA_CONSTRAINTS[name](value)
    except ConstraintError as err:
        raise invalid(name, str(err)) from None


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # role, content; tool_calls / tool_call_id / name if sent
    options: GenerationOptions


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str | list[int]]  # several prompts: one batch, choices grouped per prompt
    options: GenerationOptions


def _content(i: int, role: str, content: object) -> str:
    if content is None:
        if role == "assistant":  # an assistant turn that only called tools
            return ""
        raise invalid("messages", f"messages[{i}] needs a 'content'")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid("messages", f"messages[{i}].content: only text parts are "
                                          f"supported, got {_show(kind)}")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")


def parse_chat(body: object) -> ChatRequest:
    """Parse a ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid("messages", f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise invalid("messages", f"messages[{i}].role must be one of "
                                      f"{', '.join(sorted(CHAT_ROLES))}; got {_show(role)}")
        # "developer" is OpenAI's new name for the system prompt; chat templates know "system".
        parsed.append({"role": "system" if role == "developer" else role,
                       "content": _content(i, role, m.get("content")),
                       **_tool_fields(i, role, m)})
    # tools / tool_choice are read by the server (server/tools.py), next to this.
    return ChatRequest(parsed, _options(body, chat=True))


def _tool_fields(i: int, role: str, m: Mapping[str, Any]) -> dict[str, Any]:
    """An assistant's ``tool_calls`` (arguments kept as the client's string) and a tool
    message's ``tool_call_id`` and ``name``."""
    out: dict[str, Any] = {}
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise invalid("messages", f"messages[{i}].tool_calls must be a list")
        parsed = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments") or "", str):
                raise invalid("messages", f"messages[{i}].tool_calls[{j}] needs function.name "
                                          f"and function.arguments (a string)")
            parsed.append({"id": str(c.get("id") or ""), "type": "function",
                           "function": {"name": fn["name"],
                                        "arguments": fn.get("arguments") or "{}"}})
        out["tool_calls"] = parsed
    if role == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str):
            raise invalid("messages", f"messages[{i}] (role tool) needs a 'tool_call_id'")
        out["tool_call_id"] = tid
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def _prompts(value: object) -> list[str | list[int]]:
    def is_ids(x: object) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value]
    if is_ids(value):
        return [list(value)]  # type: ignore[arg-type]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value) or all(is_ids(p) for p in value):
            if len(value) > MAX_PROMPTS:
                raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request, "
                                        f"got {len(value)}")
            return list(value)
    raise invalid("prompt", "'prompt' must be a string, a list of strings, a list of token ids "
                            "or a list of such lists (non-empty)")


def parse_completion(body: object) -> CompletionRequest:
    """Parse a ``/v1/completions`` body."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    if body.get("prompt") is None:
        raise invalid("prompt", "'prompt' is required")
    prompts = _prompts(body["prompt"])
    if _bool(body, "echo"):
        _unsupported(body, "echo", "echoing the prompt")
    if body.get("suffix"):
        _unsupported(body, "suffix", "insertion")
    options = _options(body, chat=False)
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != options.n:
        _unsupported(body, "best_of", "server-side ranking; use n")
    return CompletionRequest(prompts, options)


# --------------------------------------------------------------------------------------------
# Token text for logprobs


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 style) inverted: each of the 256 byte values is
    spelled by one printable character; printable Latin-1 bytes stand for themselves and the
    others are shifted, in order, to code points from 256 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 256
    kept = set(printable)
    for b in range(256):
        if b not in kept:
            table[chr(shifted)] = b
            shifted += 1
    return table


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """Text and UTF-8 bytes of single token ids, as OpenAI's logprobs report them.

    A token can be part of a multi-byte character: its ``bytes`` are exact, its ``text`` then
    shows U+FFFD for the incomplete part (decoding one id on its own cannot do better).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
        self._byte_level = _byte_level_table() if decoder == "ByteLevel" else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _raw(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's visible space
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def finite(logprob: float) -> float:
    """JSON has no -Infinity; OpenAI reports impossible tokens as -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprob_entry(tokens: TokenStrings, token_id: int, logprob: float,
                       top: Sequence[tuple[int, float]] | None) -> dict[str, Any]:
    """One element of a chat choice's ``logprobs.content``."""
    text, raw = tokens.get(token_id)
    alternatives = []
    for tid, lp in top or ():
        t, b = tokens.get(tid)
        alternatives.append({"token": t, "logprob": finite(lp), "bytes": b})
    return {"token": text, "logprob": finite(logprob), "bytes": raw,
            "top_logprobs": alternatives}


@dataclass
class CompletionLogprobs:
    """The legacy ``/v1/completions`` logprobs object, filled token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    _offset: int = 0

    def add(self, tokens: TokenStrings, token_id: int, logprob: float,
            top: Sequence[tuple[int, float]] | None) -> None:
        text = tokens.text(token_id)
        self.tokens.append(text)
        self.token_logprobs.append(finite(logprob))
        self.top_logprobs.append({tokens.text(t): finite(lp) for t, lp in top or ()})
        self.text_offset.append(self._offset)
        self._offset += len(text)

    def last(self) -> dict[str, Any]:
        """The object for the newest token alone (one streamed chunk)."""
        return {"tokens": self.tokens[-1:], "token_logprobs": self.token_logprobs[-1:],
                "top_logprobs": self.top_logprobs[-1:], "text_offset": self.text_offset[-1:]}

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


# --------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class ResponseHeader:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, prefix: str, model: str, fingerprint: str) -> ResponseHeader:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, fingerprint)

    def fields(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}


def chat_chunk(head: ResponseHeader, choices: list[dict[str, Any]],
               include_usage: bool) -> dict[str, Any]:
    chunk = head.fields("chat.completion.chunk") | {"choices": choices}
    if include_usage:
        chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
    return chunk


def completion_chunk(head: ResponseHeader, choices: list[dict[str, Any]],
                     include_usage: bool) -> dict[str, Any]:
    chunk = head.fields("text_completion") | {"choices": choices}
    if include_usage:
        chunk["usage"] = None
    return chunk
