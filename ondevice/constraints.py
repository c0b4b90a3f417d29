"""Decoding constraints: a JSON schema, "any JSON object", a regular expression or a grammar.

A :class:`Constraint` is plain data that travels with a request in
:class:`~ondevice.sampling.SamplingParams`. The engine compiles it once per distinct text
(:class:`ConstraintCompiler`, an LRU cache) into a token-level matcher with llguidance
(`pip install 'ondevice[structured]'`), gives each sequence its own copy, and at every step
masks the logits of constrained rows to the tokens the matcher allows. End-of-sequence is
allowed only where the matcher accepts, so a reply that stops on its own is always complete.

llguidance is imported lazily: the core runs without it, and a constrained request without it
fails with one line naming the extra.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SamplingError

__all__ = ["CompiledConstraint", "Constraint", "ConstraintCompiler", "ConstraintError",
           "Matcher", "compute_masks", "constraint_from_options"]

KINDS = ("json_schema", "json_object", "regex", "grammar")

PARALLEL_MASK_MIN_CPUS = 8
"""Below this many CPUs the masks of a batch are computed one after another."""

MAX_SPEC_CHARS = 1 << 20
"""Largest schema, regex or grammar text accepted (1 Mi characters)."""

_EXTRA = "pip install 'ondevice[structured]'"

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is laid out: one line, ``{"a": 1, "b": [2, 3]}``. Free whitespace
lets a small model spend its whole budget on spaces and newlines; a schema may still ask for
another layout through its ``x-guidance`` key."""


class ConstraintError(SamplingError):
    """A schema, regex or grammar that cannot be used: invalid, unsupported, or one that can
    never match anything. ``field`` is ``"constraint"``."""

    def __init__(self, message: str):
        super().__init__(message, field="constraint")


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (bitmask helpers)
    except ImportError:
        raise ConstraintError(
            f"structured output (JSON schema, regex, grammar) needs llguidance: {_EXTRA}"
        ) from None
    return llguidance


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# The request side: plain data


@dataclass(frozen=True)
class Constraint:
    """What a reply must match.

    Attributes:
        kind: ``"json_schema"`` (``spec`` is the schema as JSON text), ``"json_object"``
            (any JSON object; ``spec`` is empty), ``"regex"`` (the whole reply matches
            ``spec``) or ``"grammar"`` (``spec`` is a Lark grammar as llguidance reads it, or a
            llama.cpp GBNF grammar, recognized by its ``::=``).
        spec: The schema, regex or grammar text.

    Build one with :meth:`json_schema`, :meth:`json_object`, :meth:`regex`, :meth:`grammar`
    or :meth:`from_response_format` (OpenAI's ``response_format``).
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"constraint kind must be one of {', '.join(KINDS)}, "
                                  f"got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ConstraintError(f"constraint spec must be a string, got "
                                  f"{type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ConstraintError(f"the {self.kind} is {len(self.spec)} characters; at most "
                                  f"{MAX_SPEC_CHARS} are accepted")
        if self.kind in ("regex", "grammar") and not self.spec:
            raise ConstraintError(f"the {self.kind} is empty")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> Constraint:
        """A JSON schema, as a dict or as JSON text. Property order is kept: it is the order
        in which the model writes the properties."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as err:
                raise ConstraintError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ConstraintError(f"a JSON schema must be an object (or a boolean), got "
                                  f"{type(schema).__name__}")
        try:
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as err:
            raise ConstraintError(f"the JSON schema cannot be serialized: {err}") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """The whole reply matches ``pattern`` (Rust regex syntax; no look-around)."""
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        """A Lark grammar (llguidance's dialect, ``start`` rule first) or a GBNF grammar."""
        return cls("grammar", text)

    @classmethod
    def from_response_format(cls, fmt: Mapping[str, Any] | None) -> Constraint | None:
        """OpenAI's ``response_format``: ``{"type": "text"}`` (None), ``{"type":
        "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ..., "schema":
        {...}, "strict": bool}}``. Strict or not, the schema is enforced."""
        if fmt is None:
            return None
        if not isinstance(fmt, Mapping):
            raise ConstraintError("response_format must be an object")
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping):
                raise ConstraintError("response_format.json_schema must be an object with a "
                                      "'schema'")
            schema = spec.get("schema", {})
            if not isinstance(schema, (Mapping, bool)):
                raise ConstraintError("response_format.json_schema.schema must be an object")
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise ConstraintError("response_format.json_schema.strict must be a boolean")
            return cls.json_schema(schema)
        raise ConstraintError(f"response_format.type must be text, json_object or json_schema, "
                              f"got {kind!r}")

    def describe(self) -> str:
        """A short label for messages: ``json_schema (312 chars)``."""
        return self.kind if self.kind == "json_object" else f"{self.kind} ({len(self.spec)} chars)"


def constraint_from_options(json_schema_file: str | None = None, regex: str | None = None,
                            grammar_file: str | None = None) -> Constraint | None:
    """The constraint of command-line style options: a JSON schema file, a regex, or a
    grammar file (one at most). Unreadable files are a one-line :class:`ConstraintError`."""
    given = [(k, v) for k, v in (("--json-schema", json_schema_file), ("--regex", regex),
                                 ("--grammar", grammar_file)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(f"{given[0][0]} and {given[1][0]} both constrain the reply; "
                              f"pass one")
    flag, value = given[0]
    if flag == "--regex":
        return Constraint.regex(value)
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read(MAX_SPEC_CHARS + 1)
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConstraintError(f"cannot read {flag} file {value}: {reason}") from None
    return Constraint.json_schema(text) if flag == "--json-schema" else Constraint.grammar(text)


# --------------------------------------------------------------------------------------------
# The engine side: compiled matchers


class Matcher:
    """One sequence's position in its constraint (an llguidance ``LLMatcher``)."""

    __slots__ = ("_m",)

    def __init__(self, matcher: Any):
        self._m = matcher

    def consume(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the constraint did not allow it."""
        return bool(self._m.consume_token(int(token_id)))

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last ``num_tokens`` consumed (rejected speculative tokens)."""
        return bool(self._m.rollback(int(num_tokens)))

    @property
    def is_stopped(self) -> bool:
        """Nothing more may follow: the reply is complete."""
        return bool(self._m.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """What was generated so far is a complete match (end-of-sequence is allowed)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None

    def copy(self) -> Matcher:
        return Matcher(self._m.deep_copy())


class CompiledConstraint:
    """A constraint compiled for one tokenizer: hands out fresh :class:`Matcher` copies of a
    pristine matcher (copying is microseconds; compiling can take much longer)."""

    def __init__(self, constraint: Constraint, template: Any, compile_seconds: float):
        self.constraint = constraint
        self._template = template
        self.compile_seconds = compile_seconds

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


class ConstraintCompiler:
    """Compiles constraints for one tokenizer, caching the results (LRU, by kind and text).

    Thread-safe: the API and the server compile on their own threads before submitting, so
    that the engine thread only finds the result in the cache.

    Args:
        tokenizer_json: The Hugging Face ``tokenizers`` JSON of the model's tokenizer.
        vocab_size: The model's vocabulary (logits row length); may exceed the tokenizer's.
        eos_token_ids: Tokens that end a sequence; allowed only where the matcher accepts.
        cache_size: Compiled constraints kept.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 *, cache_size: int = 128):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._llt: Any = None
        self._executor: Any = None
        self._width = self.vocab_size
        self._cache: OrderedDict[tuple[str, str], CompiledConstraint] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _tokenizer(self) -> Any:
        """The llguidance tokenizer, built on first use (~0.3 s for a 49k vocabulary)."""
        if self._llt is None:
            llg = _llguidance()
            with self._tok_lock:
                if self._llt is None:
                    from tokenizers import Tokenizer

                    n_tok = Tokenizer.from_str(self._tokenizer_json).get_vocab_size(True)
                    # The mask covers the larger of the two; rows are cut to vocab_size.
                    n_vocab = max(self.vocab_size, n_tok)
                    self._width = n_vocab
                    eos = self.eos_token_ids or None
                    try:
                        self._llt = llg.LLTokenizer(self._tokenizer_json, n_vocab=n_vocab,
                                                    eos_token=eos)
                    except Exception as err:  # noqa: BLE001  (llguidance's own errors)
                        raise ConstraintError(f"structured output cannot use this model's "
                                              f"tokenizer: {_one_line(err)}") from None
                    # Masks of a whole batch in parallel only where cores are plenty: a
                    # row's mask takes ~50 us here, and on a small machine the executor's
                    # worker threads would compete with the forward pass they overlap.
                    if (os.cpu_count() or 1) >= PARALLEL_MASK_MIN_CPUS:
                        self._executor = llg.LLExecutor()
        return self._llt

    def _grammar(self, c: Constraint) -> str:
        llg = _llguidance()
        M = llg.LLMatcher
        try:
            if c.kind == "json_object":
                return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
            if c.kind == "json_schema":
                return M.grammar_from_json_schema(c.spec, defaults=JSON_LAYOUT)
            if c.kind == "regex":
                return M.grammar_from_regex(c.spec)
            text = c.spec
            if "::=" in text:  # GBNF (llama.cpp); Lark uses ':' for rules
                from llguidance.gbnf_to_lark import gbnf_to_lark

                text = gbnf_to_lark(text)
            return M.grammar_from_lark(text)
        except Exception as err:  # noqa: BLE001  (ValueError and converter errors alike)
            raise ConstraintError(f"invalid {c.kind.replace('_', ' ')}: "
                                  f"{_one_line(err)}") from None

    def compile(self, c: Constraint) -> CompiledConstraint:
        """The compiled constraint, from the cache when it was compiled before.

        Raises:
            ConstraintError: llguidance missing; an invalid schema, regex or grammar; a schema
                keyword llguidance does not implement; a constraint nothing can match.
        """

        key = (c.kind, c.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        llg = _llguidance()
        t0 = time.perf_counter()
        llt = self._tokenizer()
        grammar = self._grammar(c)
        what = c.kind.replace("_", " ")
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, llt)
        if is_error:
            raise ConstraintError(f"invalid {what}: {_one_line(messages[0])}")
        template = llg.LLMatcher(llt, grammar, log_level=0)
        if template.is_error():
            raise ConstraintError(f"invalid {what}: {_one_line(template.get_error())}")
        # A constraint that admits nothing at all (e.g. the regex [^\s\S]): the first mask
        # allows no token but end-of-sequence, and the empty reply does not match either.
        first = compute_masks([Matcher(template)], self._width, self.vocab_size)[0]
        if not template.is_accepting():
            allowed = first.copy()
            allowed[[t for t in self.eos_token_ids if t < self.vocab_size]] = False
            if not allowed.any():
                raise ConstraintError(f"the {what} cannot match anything")
        compiled = CompiledConstraint(c, template, time.perf_counter() - t0)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def masks(self, matchers: Sequence[Matcher]) -> np.ndarray:
        """Allowed tokens of each matcher's next step, ``[len(matchers), vocab_size]`` bools,
        computed in parallel on llguidance's threads (without the GIL)."""
        self._tokenizer()
        return compute_masks(matchers, self._width, self.vocab_size, self._executor)


def compute_masks(matchers: Sequence[Matcher], width: int, vocab_size: int,
                  executor: Any = None) -> np.ndarray:
    """``[len(matchers), vocab_size]`` booleans: which tokens each matcher allows next.
    ``width`` is the vocabulary of the matchers' tokenizer (>= ``vocab_size``)."""
    import llguidance.numpy as lln

    if not matchers:
        return np.zeros((0, vocab_size), dtype=bool)
    bitmask = lln.allocate_token_bitmask(len(matchers), width)
    if executor is not None and len(matchers) > 1:
        lln.fill_next_token_bitmask_par(executor, [(m._m, i) for i, m in enumerate(matchers)],
                                        bitmask)
    else:
        for i, m in enumerate(matchers):
            lln.fill_next_token_bitmask(m._m, bitmask, i)
    # Bit t of the mask is bit t % 32 of word t // 32; in little-endian bytes that is bit
    # t % 8 of byte t // 8, which unpackbits(bitorder="little") lays out in token order.
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)
